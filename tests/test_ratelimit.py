"""Per-source REGISTER limits at the AS (issue 8's abuse limits): a flood from one address
gets 503 with Retry-After and takes no enrolment state; a real device beside it enrols."""

from __future__ import annotations

import os

from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest

from mpay.auth import wire
from mpay.auth.ratelimit import SourceRateLimiter
from mpay.sip.message import Request, parse
from mpay.sip.transport import UDP_RCVBUF_BYTES, raise_receive_buffer
from tests.flow import MpayFixture

FLOOD = 2_000
BURST = 20
FLOODER = "127.0.0.2"          # another loopback address: Linux answers all of 127/8
NUMBER = "+886912345678"


class SourceRateLimiterTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.limiter = SourceRateLimiter(2.0, 3, self.clock.seconds, exempt=["10.0.0.9"],
                                         max_sources=2)

    def test_a_burst_then_the_sustained_rate(self):
        self.assertEqual([self.limiter.allow("10.0.0.1") for _ in range(4)],
                         [True, True, True, False])
        self.assertEqual(self.limiter.retry_after_s("10.0.0.1"), 1)
        self.clock.advance(0.5)                       # one token back at 2 per second
        self.assertEqual([self.limiter.allow("10.0.0.1") for _ in range(2)], [True, False])
        self.clock.advance(60)                        # never more than the burst
        self.assertEqual(sum(self.limiter.allow("10.0.0.1") for _ in range(10)), 3)

    def test_sources_are_limited_apart_and_exempt_ones_never(self):
        for _ in range(3):
            self.limiter.allow("10.0.0.1")
        self.assertFalse(self.limiter.allow("10.0.0.1"))
        self.assertTrue(self.limiter.allow("10.0.0.2"))
        self.assertTrue(all(self.limiter.allow("10.0.0.9") for _ in range(100)))

    def test_the_table_is_bounded_least_recently_seen_first_out(self):
        for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
            self.limiter.allow(host)
        self.assertEqual(len(self.limiter), 2)

    def test_limits_must_be_sane(self):
        for rate, burst in ((0, 1), (1, 0)):
            with self.assertRaises(ValueError):
                SourceRateLimiter(rate, burst, self.clock.seconds)


class _Flooder(protocol.DatagramProtocol):
    """Collects the AS's answers (and the REFERs it sends the claims it admitted)."""

    def __init__(self):
        self.answers = []
        self.refers = 0

    def datagramReceived(self, data, addr):
        message = parse(data)
        if isinstance(message, Request):
            self.refers += 1
        else:
            self.answers.append(message)


def claim(index: int, port: int) -> bytes:
    """An enrolment claim for a number of its own: without a limit, each one would hold
    a half-open enrolment, a REFER and a caller-ID window."""
    number = f"+8869{index:08d}"
    return (f"REGISTER sip:mpay.test SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {FLOODER}:{port};branch=z9hG4bK-flood-{index}\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:{number}@mpay.test>;tag=f{index}\r\n"
            f"To: <sip:{number}@mpay.test>\r\nCall-ID: flood-{index}@x\r\n"
            f"CSeq: 1 REGISTER\r\n"
            f"{wire.KEY_SHARE_HEADER}: {wire.key_share(os.urandom(32))}\r\n"
            f"{wire.NONCE_HEADER}: {wire.nonce(os.urandom(16))}\r\n"
            f"{wire.SIGNING_KEY_HEADER}: {wire.signing_key(os.urandom(32))}\r\n"
            f"Content-Length: 0\r\n\r\n").encode()


class RegisterFloodTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_flood_from_one_address_is_refused_and_a_device_still_enrols(self):
        mpay = MpayFixture(self, "as.rate_limit_exempt=", f"as.register_burst_per_source={BURST}",
                           "as.register_rate_per_source_s=1")
        yield mpay.start()
        flooder = _Flooder()
        port = reactor.listenUDP(0, flooder, interface=FLOODER)
        self.addCleanup(port.stopListening)
        raise_receive_buffer(port.socket, UDP_RCVBUF_BYTES)   # 2,000 answers come back fast
        as_addr = mpay.address("as")
        for index in range(FLOOD):
            port.write(claim(index, port.getHost().port), as_addr)
            if index % 100 == 99:
                yield task.deferLater(reactor, 0.01, lambda: None)   # let the AS keep up

        device, _ = mpay.device(NUMBER)                     # from 127.0.0.1, meanwhile
        yield device.enroll()
        yield device.get_ticket()
        yield mpay.eventually(lambda: len(flooder.answers) >= FLOOD, tries=200)
        statuses = [answer.status for answer in flooder.answers]
        self.assertGreaterEqual(statuses.count(401), BURST)          # the burst was served
        self.assertLessEqual(statuses.count(401), BURST + 5)         # ... and little more
        refused = [a for a in flooder.answers if a.status == 503]
        self.assertEqual(len(refused), FLOOD - statuses.count(401))
        self.assertEqual(refused[0].reason, "Too Many Requests From This Address")
        self.assertGreaterEqual(int(refused[0].headers.get("Retry-After")), 1)
        self.assertLessEqual(flooder.refers, 4 * (BURST + 5), "REFERs (retransmitted) only for the burst")
        limiter = mpay.as_core.limiter
        self.assertEqual(len(limiter), 2, "two sources tracked: the flooder and the device")
        flood_state = set(mpay.as_core.pending) - {NUMBER}
        self.assertLessEqual(len(flood_state), BURST + 5, "half-open enrolments stay bounded")

"""Two PS instances serving one population of devices (issue 8, scale-out).

Both share one Redis (locations, OTCNs, guess blocking, replay cache) and one
ledger; each has a UDP port of its own here, so which instance holds which
device's flow is known, and every cross case is exercised for sure: a
payer served by one instance pays a payee whose flow the other holds (OUT
frames), the payee's answer comes back through the holder (IN frames), and
a consumer's BYE reaches the instance that holds the timed session.  The
last class puts both on one port with SO_REUSEPORT, as `--workers` does.
"""

from __future__ import annotations

import socket

from hypothesis import given, settings, strategies as st
from twisted.internet import defer
from twisted.trial import unittest

from mpay.load.backends import Backends
from mpay.sip import peers
from mpay.payment.otcn import new_otcn
from mpay.sip.message import parse
from mpay.sip.peers import FrameError, PeerRelay, Relayed, decode_frame, encode_frame

import tap
from tests.flow import MpayFixture

PAYER = "+886912000101"
PAYEE = "+886912000202"
CONSUMER = "+886912000303"
MERCHANT = "+886223000404"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FrameTests(unittest.TestCase):
    def test_a_frame_round_trips(self):
        frame = encode_frame(b"IN", "ps2", "TCP", "10.0.0.7", 40123, "10.0.0.1:5060", b"SIP/2.0 200 OK\r\n\r\n")
        self.assertEqual(decode_frame(frame),
                         (b"IN", "ps2", "TCP", "10.0.0.7", 40123, "10.0.0.1:5060", b"SIP/2.0 200 OK\r\n\r\n"))

    @given(st.binary(max_size=300))
    @settings(max_examples=300, deadline=None)
    def test_any_datagram_is_a_frame_or_a_frame_error(self, data):
        try:
            decode_frame(data)
        except FrameError:
            pass

    def test_markers(self):
        self.assertEqual(peers.owner_marker("z9hG4bKabc~ps2"), "ps2")
        self.assertIsNone(peers.owner_marker("z9hG4bKabc"))
        self.assertIsNone(peers.owner_marker("~ps2"))
        self.assertIsNone(peers.owner_marker(None))

    def test_peers_list(self):
        self.assertEqual(peers.parse_peers("ps1=127.0.0.1:5161, ps2=[::1]:5162"),
                         {"ps1": ("127.0.0.1", 5161), "ps2": ("::1", 5162)})
        for bad in ("ps1", "ps1=127.0.0.1", "p~s=127.0.0.1:1", "ps1=h:70000"):
            self.assertRaises(ValueError, peers.parse_peers, bad)

    def test_frames_from_strangers_or_naming_another_sender_are_dropped(self):
        class Endpoint:
            received = []

            def datagram_received(self, data, addr, relayed=False):
                self.received.append((data, addr))

        endpoint = Endpoint()
        relay = PeerRelay("ps1", {"ps1": ("127.0.0.1", 1), "ps2": ("127.0.0.1", 2)}, endpoint)
        frame = encode_frame(b"IN", "ps2", "UDP", "10.0.0.7", 5000, "127.0.0.1:5060", b"x")
        relay.frame_received(frame, ("127.0.0.1", 9))
        relay.frame_received(encode_frame(b"IN", "ps3", "UDP", "10.0.0.7", 5000, "", b"x"),
                             ("127.0.0.1", 2))
        relay.frame_received(b"garbage", ("127.0.0.1", 2))
        self.assertEqual(endpoint.received, [])
        self.assertEqual(relay.counts["dropped_stranger"], 2)
        self.assertEqual(relay.counts["dropped_malformed"], 1)
        relay.frame_received(frame, ("127.0.0.1", 2))
        [(data, addr)] = endpoint.received
        self.assertEqual((data, addr), (b"x", ("10.0.0.7", 5000)))
        self.assertIsInstance(addr, Relayed)
        self.assertEqual((addr.via, addr.local, addr.transport), ("ps2", "127.0.0.1:5060", "UDP"))


class TwoInstances:
    """Instance ``psa`` (with the AS) and ``psb``, one Redis prefix, one SQLite ledger."""

    def __init__(self, testcase, *settings: str, reuse_port: bool = False):
        self.testcase = testcase
        self.backends = Backends.named(("redis",), label="peers")
        self.prefix = self.backends.redis_prefix
        relays = {"psa": free_udp_port(), "psb": free_udp_port()}
        peer_list = ", ".join(f"{name}=127.0.0.1:{port}" for name, port in relays.items())
        shared = ["location.backend=redis", f"location.redis_prefix={self.prefix}",
                  f"ps.peers={peer_list}", "ps.checkpoint_s=0.2", *settings]
        own = {name: [f"ps.instance_id={name}", f"ps.relay_listen=udp:{port}:interface=127.0.0.1"]
               for name, port in relays.items()}
        listen = {}
        if reuse_port:   # one fixed port, which both bind
            shared.append("ps.reuse_port=true")
            listen["ps_listen"] = f"udp:{free_udp_port()}:interface=127.0.0.1"
        self.a = MpayFixture(testcase, *shared, *own["psa"], **listen)
        options = tap.Options()
        options.parseOptions(self.a.args + ["--role", "ps"] +
                             [arg for setting in own["psb"] for arg in ("--set", setting)])
        self.b = tap.makeService(options)
        testcase.addCleanup(self.backends.cleanup)

    @defer.inlineCallbacks
    def start(self):
        yield self.a.start()
        self.b.startService()
        self.testcase.addCleanup(lambda: self.b.stopService() if self.b.running else None)

    def cores(self):
        return {"psa": self.a.ps_core, "psb": self.b.cores["ps"]}

    def relay(self, name):
        return (self.a.top if name == "psa" else self.b).endpoints["ps"].relay

    def address(self, name):
        top = self.a.top if name == "psa" else self.b
        return ("127.0.0.1", top.listeners["ps"].port)

    @defer.inlineCallbacks
    def ready_at(self, name, number):
        """A device enrolled at the AS and registered through instance *name*."""
        device, recorder = self.a.device(number)
        device.ps_addr = self.address(name)
        yield device.enroll()
        yield device.get_ticket()
        yield device.register()
        return device, recorder


class CrossInstanceTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.two = TwoInstances(self, "ps.transfer_timer_a_s=5")
        yield self.two.start()
        self.ledger = self.two.a.top.ledger

    @defer.inlineCallbacks
    def test_a_payee_held_by_one_instance_is_paid_through_the_other(self):
        payer, _ = yield self.two.ready_at("psb", PAYER)
        payee, payee_wire = yield self.two.ready_at("psa", PAYEE)
        yield self.ledger.cash_in(PAYER, 1_000, "fund-payer")
        response, receipt = yield payer.transfer(PAYEE, 250)
        self.assertEqual((response.status, response.reason), (200, "OK"))
        self.assertEqual((receipt.payee, receipt.amount), (PAYEE, 250))
        self.assertEqual((yield self.ledger.balance(PAYEE)).available, 250)
        self.assertIn(("<", "MESSAGE"), payee_wire.flow())
        # psb sent the notice through psa, which holds the payee's flow; the answer came back.
        self.assertEqual(self.two.relay("psb").counts["out_sent"], 1)
        self.assertEqual(self.two.relay("psa").counts["out_received"], 1)
        self.assertEqual(self.two.relay("psa").counts["in_sent"], 1)
        self.assertEqual(self.two.relay("psb").counts["in_received"], 1)
        report = yield self.ledger.audit()
        self.assertTrue(report.ok, report.format())

    @defer.inlineCallbacks
    def session_held_by_psb(self):
        """A consumer at psa, a merchant at psb, and a timed session between them: (consumer,
        the merchant's 200)."""
        consumer, _ = yield self.two.ready_at("psa", CONSUMER)
        merchant, _ = yield self.two.ready_at("psb", MERCHANT)
        consumer.charge_policy = lambda asked: 200
        yield self.ledger.cash_in(CONSUMER, 10_000, "fund-consumer")
        response = yield merchant.charge(CONSUMER, rate=10)
        self.assertEqual(response.status, 200)
        return consumer, response

    @defer.inlineCallbacks
    def test_a_timed_session_held_by_one_instance_is_ended_by_a_bye_through_the_other(self):
        consumer, _ = yield self.session_held_by_psb()
        holder = self.two.cores()["psb"].charges
        self.assertEqual(len(holder.by_consumer_call), 1)
        [consumer_call] = list(holder.by_consumer_call)
        [device_call] = list(consumer.sessions)
        self.assertEqual(device_call, consumer_call)
        yield consumer.end_session(consumer_call)
        yield self.two.a.eventually(lambda: not holder.sessions.members and not holder.live)
        self.assertGreaterEqual(self.two.relay("psa").counts["in_sent"], 1)   # the BYE
        report = yield self.ledger.audit()
        self.assertTrue(report.ok, report.format())
        consumer_balance = yield self.ledger.balance(CONSUMER)
        merchant_balance = yield self.ledger.balance(MERCHANT)
        self.assertEqual(consumer_balance.held, 0)
        self.assertEqual(consumer_balance.available + merchant_balance.available, 10_000)
        self.assertEqual((yield self.ledger.open_sessions()), [])

    @defer.inlineCallbacks
    def test_the_sessions_of_an_instance_that_will_not_return_are_settled_by_another(self):
        consumer, _ = yield self.session_held_by_psb()
        [session] = yield self.ledger.open_sessions()
        self.assertEqual(session.owner, "psb")
        yield self.two.b.stopService()                      # psb is retired with it open
        settled = yield self.two.cores()["psa"].charges.sessions.recover(("psb",))
        self.assertEqual(settled, 1)
        self.assertEqual((yield self.ledger.open_sessions()), [])
        self.assertEqual((yield self.ledger.balance(CONSUMER)).held, 0)
        yield self.two.a.eventually(lambda: not consumer.sessions)   # told with a BYE
        report = yield self.ledger.audit()
        self.assertTrue(report.ok, report.format())


class SharedPortTests(unittest.TestCase):
    """Both instances on one UDP port (SO_REUSEPORT): the kernel picks, the relay mends."""

    DEVICES = 16   # both instances get some: all on one has probability 2 ** -15

    @defer.inlineCallbacks
    def test_a_ring_of_transfers_among_devices_spread_by_the_kernel(self):
        two = TwoInstances(self, "ps.transfer_timer_a_s=5", reuse_port=True)
        yield two.start()
        self.assertEqual(two.address("psa"), two.address("psb"))
        ledger = two.a.top.ledger
        numbers = [f"+8869120005{index:02d}" for index in range(self.DEVICES)]
        devices = []
        for number in numbers:
            device, _ = yield two.ready_at("psa", number)
            devices.append(device)
            yield ledger.cash_in(number, 100, f"fund-{number}")
        registers = {name: top.endpoints["ps"].requests["REGISTER"]
                     for name, top in (("psa", two.a.top), ("psb", two.b))}
        self.assertTrue(all(registers.values()), registers)
        answers = yield defer.gatherResults([
            device.transfer(numbers[(index + 1) % len(numbers)], 10)
            for index, device in enumerate(devices)])
        self.assertEqual({response.status for response, _ in answers}, {200})
        for number in numbers:
            self.assertEqual((yield ledger.balance(number)).available, 100)
        relayed = sum(two.relay(name).counts["in_received"] for name in ("psa", "psb"))
        self.assertGreater(relayed, 0)
        report = yield ledger.audit()
        self.assertTrue(report.ok, report.format())


class SharedReplayCacheTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_request_copied_to_the_other_instance_is_refused_as_a_replay(self):
        two = TwoInstances(self)
        yield two.start()
        consumer, _ = yield two.ready_at("psa", CONSUMER)
        copies = []
        authenticate = consumer.authenticate

        def copying(request):
            request = authenticate(request)        # as it goes to the PS
            copies.append(parse(request.to_bytes()))
            return request

        consumer.authenticate = copying
        grant = yield consumer.request_otcn()          # an OTCN: no ledger key makes it idempotent
        self.assertIn("otcn", grant)
        # The copy comes from the consumer's IP (another port), to the instance that has not seen it.
        attacker, _ = two.a.device("+886912000999")
        replayed = yield attacker.endpoint.send_request(copies[-1], two.address("psb"))
        self.assertEqual((replayed.status, replayed.reason), (403, "Authenticator Replayed"))

    @defer.inlineCallbacks
    def test_a_transfer_copied_to_the_other_instance_gets_the_first_answer(self):
        two = TwoInstances(self)
        yield two.start()
        payer, _ = yield two.ready_at("psa", PAYER)
        yield two.ready_at("psa", PAYEE)
        yield two.a.top.ledger.cash_in(PAYER, 1_000, "fund-payer")
        request = payer.transfer_request(PAYEE, 100)
        copy = parse(request.to_bytes())
        response = yield payer.endpoint.send_request(request, two.address("psa"))
        self.assertEqual(response.status, 200)
        attacker, _ = two.a.device("+886912000999")
        replayed = yield attacker.endpoint.send_request(copy, two.address("psb"))
        self.assertEqual(replayed.status, 200)
        self.assertEqual(payer.verified_receipt(replayed, PAYEE, 100).journal_id,
                         payer.verified_receipt(response, PAYEE, 100).journal_id)
        self.assertEqual((yield two.a.top.ledger.balance(PAYEE)).available, 100)


class SharedRulesTests(unittest.TestCase):
    """OTCN single use, guess blocking and session holds, each split across the two."""

    @defer.inlineCallbacks
    def setUp(self):
        self.two = TwoInstances(self)
        yield self.two.start()
        self.ledger = self.two.a.top.ledger
        self.consumer, _ = yield self.two.ready_at("psa", CONSUMER)
        self.consumer.charge_policy = lambda asked: 200
        self.merchant, _ = yield self.two.ready_at("psa", MERCHANT)
        yield self.ledger.cash_in(CONSUMER, 1_000, "fund-consumer")

    def through(self, device, name):
        """*device* sends its next requests to instance *name* (one ticket serves both)."""
        device.ps_addr = self.two.address(name)
        return device

    @defer.inlineCallbacks
    def test_an_otcn_used_through_one_instance_is_unknown_to_the_other(self):
        grant = yield self.consumer.request_otcn()
        first = yield self.through(self.merchant, "psa").charge(grant["otcn"], 100)
        again = yield self.through(self.merchant, "psb").charge(grant["otcn"], 100)
        self.assertEqual((first.status, again.status), (200, 404))
        self.assertEqual((yield self.ledger.balance(MERCHANT)).available, 100)

    @defer.inlineCallbacks
    def test_guesses_spread_over_both_instances_add_up_to_one_block(self):
        statuses = []
        for index in range(6):
            merchant = self.through(self.merchant, "psa" if index % 2 else "psb")
            statuses.append((yield merchant.charge(new_otcn(), 10)).status)
        self.assertEqual(statuses, [404] * 5 + [403])
        grant = yield self.consumer.request_otcn()
        blocked = yield self.through(self.merchant, "psa").charge(grant["otcn"], 10)
        self.assertEqual((blocked.status, blocked.reason), (403, "Too Many Unknown OTCNs"))

    @defer.inlineCallbacks
    def test_funds_held_by_a_session_on_one_instance_cannot_be_spent_through_the_other(self):
        payee, _ = yield self.two.ready_at("psb", PAYEE)
        response = yield self.through(self.merchant, "psb").charge(CONSUMER, rate=1)
        self.assertEqual(response.status, 200)                    # the session lives in psb
        self.assertEqual(len(self.two.cores()["psb"].charges.by_consumer_call), 1)
        refused = yield self.through(self.consumer, "psa").transfer(PAYEE, 500).addErrback(
            lambda failure: failure.value)
        self.assertIn("402", str(refused))
        self.assertEqual((yield self.ledger.balance(PAYEE)).balance, 0)
        yield self.merchant.end_session(response.call_id)
        paid, _ = yield self.consumer.transfer(PAYEE, 500)
        self.assertEqual(paid.status, 200, "released once the session ended")
        report = yield self.ledger.audit()
        self.assertTrue(report.ok, report.format())

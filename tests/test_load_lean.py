"""The lean load generator (``mpay.load.lean``): the payee's 200 made of bytes, the payer's
matching and retransmission on a task.Clock, and a short ``mpay-load --generator lean`` run
against the real server whose every transfer must succeed with the books right."""

from __future__ import annotations

import csv
import io
import json
import os
import sys

from hypothesis import given, settings, strategies as st
from twisted.internet import defer, reactor, task
from twisted.internet.testing import FakeDatagramTransport
from twisted.trial import unittest

from mpay.cli import load
from mpay.load import devices, lean
from mpay.load.lean import LeanClient, NoticeAnswerer, ok_for, peek_response, prepare
from mpay.payment.transfer import NOTICE_CONTENT_TYPE
from mpay.sip.endpoint import SIPEndpoint
from mpay.sip.message import Response, make_response, parse
from mpay.sip.transport import SIPDatagramProtocol
from mpay.sip.useragent import build_request
from mpay.timewheel import TimeWheel
from mpay.timewheel_service import TimeWheelService

PS = ("127.0.0.1", 5070)
PAYEE = ("127.0.0.1", 40001)
KEY = b"k" * 16
TICK_S = 2 ** -6
"""The test's retransmission tick: a binary fraction, so that the clock's sums are exact."""
NOTICE_TYPE = NOTICE_CONTENT_TYPE.encode()


def notice(call_id: str = "c1@127.0.0.1", cseq: int = 7, to_tag: str | None = None,
           body: bytes | None = None, **fields) -> bytes:
    """A notice as the PS sends it, with a second Via as a proxy would add."""
    if body is None:
        body = json.dumps({"journal_id": 5, "from": "+886910000001", "amount": 1,
                           "currency": "TWD", "created": 1, "receipt": "r", **fields}).encode()
    request = build_request(
        "MESSAGE", f"sip:+886920000001@{PAYEE[0]}:{PAYEE[1]}", sent_by=PS,
        from_uri="sip:ps@mpay.test", to_uri="sip:+886920000001@mpay.test", call_id=call_id,
        cseq=cseq, to_tag=to_tag, body=body, content_type=NOTICE_CONTENT_TYPE)
    request.headers.add("Via", "SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bKproxy")
    return request.to_bytes()


class OkForTests(unittest.TestCase):
    def test_echoes_vias_from_call_id_cseq_and_tags_to(self):
        data = notice()
        response, destination = ok_for(data, PS, KEY, NOTICE_TYPE)
        request, ours = parse(data), parse(response)
        self.assertIsInstance(ours, Response)
        self.assertEqual((ours.status, ours.body), (200, b""))
        self.assertEqual(ours.headers.get("Content-Length"), "0")
        expected = make_response(request, 200, to_tag=ours.to_addr.tag)
        for name in ("Via", "From", "To", "Call-ID", "CSeq"):
            self.assertEqual(ours.headers.getall(name), expected.headers.getall(name), name)
        self.assertEqual(len(ours.vias), 2)
        self.assertEqual(len(ours.to_addr.tag), 2 * lean.TO_TAG_BYTES)
        self.assertEqual(destination, PS)        # the Via asks rport: back to the source

    def test_a_retransmitted_notice_gets_the_identical_200(self):
        data = notice()
        self.assertEqual(ok_for(data, PS, KEY), ok_for(data, PS, KEY))
        tags = {parse(ok_for(notice(call_id=f"c{n}"), PS, key)[0]).to_addr.tag
                for n in range(3) for key in (KEY, b"other key")}
        self.assertEqual(len(tags), 6, "the tag is per Call-ID and per payee")

    def test_a_to_tag_already_there_is_kept(self):
        response, _ = ok_for(notice(to_tag="theirs"), PS, KEY)
        self.assertEqual(parse(response).to_addr.tag, "theirs")

    def test_compact_and_folded_headers(self):
        data = (b"MESSAGE sip:p@h SIP/2.0\r\nv: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKa\r\n"
                b"f: <sip:ps@h>\r\n ;tag=1\r\nt: <sip:p@h;tag=inside-the-uri>\r\ni: cid\r\n"
                b"CSeq: 1\r\n\tMESSAGE\r\nc: Application/Vnd.Mpay.Notice+JSON; charset=utf-8\r\n"
                b"l: 0\r\n\r\n")
        response, destination = ok_for(data, ("127.0.0.1", 999), KEY, NOTICE_TYPE)
        ours = parse(response)
        self.assertEqual((ours.call_id, ours.cseq, ours.from_addr.tag),
                         ("cid", (1, "MESSAGE"), "1"))
        self.assertIsNotNone(ours.to_addr.tag)
        self.assertNotEqual(ours.to_addr.tag, "inside-the-uri")
        self.assertEqual(destination, ("127.0.0.1", 5070))     # no rport: the Via's port

    def test_where_the_200_goes(self):
        def to(via: bytes):
            data = notice().replace(b";rport", b"", 1).replace(
                b"SIP/2.0/UDP 127.0.0.1:5070;branch=", via + b";branch=", 1)
            answer = ok_for(data, ("10.1.1.1", 4444), KEY)
            return answer and answer[1]

        self.assertEqual(to(b"SIP/2.0/UDP 127.0.0.1:5070"), ("10.1.1.1", 5070))
        self.assertEqual(to(b"SIP/2.0/UDP ps.example"), ("10.1.1.1", 5060))
        self.assertEqual(to(b"SIP/2.0/UDP [::1]:5071"), ("10.1.1.1", 5071))
        self.assertEqual(to(b"SIP/2.0/UDP 127.0.0.1:5070;rport=4444"), ("10.1.1.1", 4444))
        self.assertIsNone(to(b"SIP/2.0/TCP 127.0.0.1:5070"))
        self.assertIsNone(to(b"SIP/2.0/UDP 127.0.0.1:99999"))

    def test_malformed_or_not_ours_gives_none(self):
        data = notice()
        head, body = data.split(b"\r\n\r\n", 1)
        broken = [
            head,                                                     # no end of head
            data.replace(b"MESSAGE sip:", b"ACK sip:", 1),            # an ACK is not answered
            data.replace(b" MESSAGE\r\n", b" NOTIFY\r\n", 1),         # CSeq of another method
            data.replace(b"\r\nCall-ID:", b"\r\nX-Call-ID:", 1),      # no Call-ID
            data.replace(b"\r\nCSeq: 7", b"\r\nCSeq: x7", 1),
            head + b"\r\nTo: <sip:again@h>\r\n\r\n" + body,           # two To headers
            data.replace(b"SIP/2.0\r\n", b"SIP/3.0\r\n", 1),
            data.replace(b"\r\nFrom: <", b"\r\nFrom: \r<", 1),        # a bare CR in a line
            data.replace(b"\r\nFrom: <", b"\r\nFrom: \n<", 1),        # a bare LF in a line
            data.replace(b"\r\nFrom: <", b"\r\nFrom: \x00<", 1),      # a NUL in a line
            data.replace(b"\r\nFrom:", b"\r\r\nFrom:", 1),            # a line ending CR CR LF
            b"SIP/2.0 200 OK\r\n" + data.split(b"\r\n", 1)[1],        # a response
            b"",
        ]
        for each in broken:
            self.assertIsNone(ok_for(each, PS, KEY), each[:60])
        other_type = data.replace(NOTICE_TYPE, b"text/plain")
        self.assertIsNone(ok_for(other_type, PS, KEY, NOTICE_TYPE))
        self.assertIsNotNone(ok_for(other_type, PS, KEY))

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=600))
    def test_fuzz_any_bytes_never_raise(self, data):
        answer = ok_for(data, PS, KEY)
        if answer is not None:
            self.assertTrue(answer[0].startswith(b"SIP/2.0 200 OK\r\n"))

    @settings(max_examples=500, deadline=None)
    @given(st.data())
    def test_fuzz_mutated_notices_never_raise_nor_inject(self, draw):
        data = bytearray(notice())
        for _ in range(draw.draw(st.integers(1, 4))):
            at = draw.draw(st.integers(0, len(data)))
            action = draw.draw(st.sampled_from(("insert", "delete", "replace")))
            piece = draw.draw(st.sampled_from([b"\r\n", b"\r", b"\n", b":", b";", b" ", b"\x00",
                                               b",", b"\r\n\r\n", b"\xff", b"Via: x", b"t"]))
            if action == "insert":
                data[at:at] = piece
            elif action == "delete":
                del data[at:at + len(piece)]
            else:
                data[at:at + len(piece)] = piece
        answer = ok_for(bytes(data), PS, KEY, NOTICE_TYPE)
        if answer is None:
            return
        response, destination = answer
        head, _, rest = response.partition(b"\r\n\r\n")
        self.assertEqual(rest, b"")
        self.assertTrue(head.endswith(b"\r\nContent-Length: 0"))
        for line in head.split(b"\r\n"):
            self.assertFalse(b"\r" in line or b"\n" in line or b"\x00" in line)
        self.assertEqual(ok_for(bytes(data), PS, KEY, NOTICE_TYPE), answer)

    @settings(max_examples=200, deadline=None)
    @given(call_id=st.from_regex(r"[A-Za-z0-9.!%*_+`'~\-]{1,40}(@[a-z0-9.]{1,20})?",
                                 fullmatch=True),
           cseq=st.integers(0, 2**31 - 1), port=st.integers(1, 65535))
    def test_fuzz_well_formed_requests_are_answered_as_the_stack_would(self, call_id, cseq, port):
        request = build_request("MESSAGE", "sip:p@h", sent_by=("127.0.0.1", port),
                                from_uri="sip:ps@h", to_uri="sip:p@h", call_id=call_id,
                                cseq=cseq, content_type=NOTICE_CONTENT_TYPE)
        response, _ = ok_for(request.to_bytes(), PS, KEY, NOTICE_TYPE)
        ours = parse(response)
        expected = make_response(request, 200, to_tag=ours.to_addr.tag)
        for name in ("Via", "From", "To", "Call-ID", "CSeq"):
            self.assertEqual(ours.headers.getall(name), expected.headers.getall(name))


class _Core:
    def __init__(self):
        self.seen = []
        self.handlers = {"MESSAGE": self.message}

    def message(self, txn, request):
        self.seen.append(request)
        txn.respond_with(415)

    def ack_received(self, request, addr):
        pass


class NoticeAnswererTests(unittest.TestCase):
    def setUp(self):
        self.core = _Core()
        timers = TimeWheelService(TimeWheel(tick_s=0.1), reactor=task.Clock())
        self.endpoint = SIPEndpoint("dmd", self.core, timers)
        self.wire = SIPDatagramProtocol(self.endpoint)
        self.wire.transport = FakeDatagramTransport()
        self.endpoint.udp_write = self.wire.transport.write
        self.answerer = NoticeAnswerer(self.endpoint, NOTICE_CONTENT_TYPE, KEY)
        self.answerer.install()

    def test_notices_are_answered_on_the_devices_socket_and_nothing_else_is(self):
        data = notice()
        self.wire.datagramReceived(data, PS)
        self.wire.datagramReceived(data, PS)                  # retransmitted
        (first, to_first), (second, to_second) = self.wire.transport.written
        self.assertEqual((first, to_first), (second, to_second))
        self.assertEqual(to_first, PS)
        self.assertEqual(parse(first).status, 200)
        self.assertEqual(self.core.seen, [])                  # the stack never saw them
        self.wire.datagramReceived(data.replace(NOTICE_TYPE, b"text/plain"), PS)
        self.assertEqual(len(self.core.seen), 1)              # another MESSAGE: the stack's
        self.assertEqual(parse(self.wire.transport.written[-1][0]).status, 415)
        self.assertEqual((self.answerer.answered, self.answerer.passed), (2, 1))

    def test_a_notice_the_sim_dmd_would_refuse_goes_to_the_stack(self):
        for number, bad in enumerate((b"not json", b"[1]", json.dumps({"journal_id": 1}).encode())):
            self.wire.datagramReceived(notice(call_id=f"bad-{number}", body=bad), PS)
        self.assertEqual(len(self.core.seen), 3)
        self.assertEqual((self.answerer.answered, self.answerer.passed), (0, 3))

    def test_uninstalled_the_stack_has_everything_again(self):
        self.answerer.uninstall()
        self.wire.datagramReceived(notice(), PS)
        self.assertEqual(len(self.core.seen), 1)
        self.assertEqual(self.answerer.answered, 0)


def final(prepared, status: int, body: bytes = b"", cseq: bytes | None = None) -> bytes:
    return (f"SIP/2.0 {status} Whatever\r\nVia: SIP/2.0/UDP 127.0.0.1:1;branch=z9hG4bKx\r\n"
            f"Call-ID: {prepared.call_id.decode()}\r\n"
            f"CSeq: {(cseq or prepared.cseq).decode()}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def transfer(number: int) -> lean.Prepared:
    request = build_request("MESSAGE", "sip:+886920000001@mpay.test", sent_by=("127.0.0.1", 1),
                            from_uri="sip:+886910000001@mpay.test",
                            to_uri="sip:+886920000001@mpay.test", call_id=f"call-{number}",
                            cseq=number, body=b'{"amount": 1}')
    return prepare(request)


class LeanClientTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.transport = FakeDatagramTransport()
        self.outcomes = []
        self.client = LeanClient(self.clock.seconds, self.outcomes.append)
        self.sends = []             # (time, datagram) of every write

    def run_until(self, until_s: float) -> None:
        """Tick as the sender's LoopingCall does, recording when each datagram left."""
        loop = task.LoopingCall(self.client.tick)
        loop.clock = self.clock
        loop.start(TICK_S, now=False)
        seen = len(self.transport.written)
        while self.clock.seconds() < until_s:
            self.clock.advance(TICK_S)
            for packet, _ in self.transport.written[seen:]:
                self.sends.append((self.clock.seconds(), packet))
            seen = len(self.transport.written)
        loop.stop()

    def test_timer_e_doubles_from_t1_to_t2_and_timer_f_gives_up(self):
        prepared = transfer(1)
        self.client.send(0, prepared, lag=0.003, write=self.transport.write)
        self.assertEqual(self.transport.written, [(prepared.data, FakeDatagramTransport.noAddr)])
        self.run_until(40.0)
        times = [at for at, packet in self.sends]
        self.assertEqual({packet for _, packet in self.sends}, {prepared.data})
        self.assertEqual(times, [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5])
        self.assertEqual(self.client.resent, 10)
        self.assertEqual(self.outcomes, [lean.Outcome(0, None, None, 0.003)])
        self.assertEqual(self.client.pending, {})

    def test_timer_f_gives_up_at_64_t1_after_the_first_send(self):
        self.client.send(0, transfer(1), lag=0.0, write=self.transport.write)
        self.run_until(lean.TIMER_F_S - TICK_S)
        self.assertEqual(self.outcomes, [])
        self.run_until(lean.TIMER_F_S)
        self.assertEqual(self.outcomes, [lean.Outcome(0, None, None, 0.0)])

    def test_a_final_response_is_matched_by_call_id_and_cseq_and_stops_the_timer(self):
        one, two = transfer(1), transfer(2)
        self.client.send(0, one, lag=0.0, write=self.transport.write)
        self.clock.advance(0.125)
        self.client.send(1, two, lag=0.001, write=self.transport.write)
        self.clock.advance(0.25)
        self.client.response_received(final(two, 200, body=b'{"journal_id": 42}'))
        self.client.response_received(final(one, 200, cseq=b"1 REGISTER"))   # not its CSeq
        self.client.response_received(b"garbage")
        self.assertEqual(self.outcomes, [lean.Outcome(1, 200, 0.25, 0.001, 42)])
        self.assertEqual(self.client.stray, 2)
        self.run_until(1.0)
        self.assertEqual([at for at, _ in self.sends], [0.5])   # only the unanswered one
        self.client.response_received(final(one, 503))
        self.client.response_received(final(one, 503))        # retransmitted: absorbed
        self.assertEqual(self.outcomes[1], lean.Outcome(0, 503, 1.0, 0.0, None))
        self.assertEqual((len(self.outcomes), self.client.stray), (2, 3))
        self.run_until(10.0)
        self.assertEqual(len(self.sends), 1)

    def test_each_request_leaves_and_is_retransmitted_from_its_payers_socket(self):
        mine, theirs = FakeDatagramTransport(), FakeDatagramTransport()
        one, two = transfer(1), transfer(2)
        self.client.send(0, one, lag=0.0, write=mine.write)
        self.client.send(1, two, lag=0.0, write=theirs.write)
        self.run_until(1.0)                                     # one Timer E each
        self.assertEqual([packet for packet, _ in mine.written], [one.data, one.data])
        self.assertEqual([packet for packet, _ in theirs.written], [two.data, two.data])
        self.client.response_received(final(two, 200))          # matched whatever socket
        self.client.response_received(final(one, 200))
        self.assertEqual(sorted(outcome.index for outcome in self.outcomes), [0, 1])
        self.assertEqual((self.client.resent, self.client.pending), (2, {}))

    def test_a_provisional_response_is_no_outcome_and_slows_retransmission_to_t2(self):
        prepared = transfer(1)
        self.client.send(0, prepared, lag=0.0, write=self.transport.write)
        self.client.response_received(final(prepared, 100))
        self.assertEqual((self.outcomes, self.client.provisional), ([], 1))
        self.run_until(9.0)
        self.assertEqual([at for at, _ in self.sends], [0.5, 4.5, 8.5])

    def test_a_journal_id_only_from_a_200_body_and_compact_headers_are_read(self):
        prepared = transfer(3)
        self.client.send(0, prepared, lag=0.0, write=self.transport.write)
        compact = final(prepared, 202, body=b'{"journal_id": 9}').replace(b"Call-ID:", b"i:")
        self.client.response_received(compact)
        self.assertEqual(self.outcomes, [lean.Outcome(0, 202, 0.0, 0.0, None)])
        self.assertEqual(peek_response(final(prepared, 200, body=b"not json"))[0], 200)
        self.assertIsNone(lean.journal_id_of(b"not json"))
        self.assertIsNone(peek_response(b"SIP/2.0 2x0 OK\r\n\r\n"))


class LeanSweepTests(unittest.TestCase):
    """``mpay-load --generator lean`` against the real server (its own twistd process)."""

    timeout = 120    # seconds; a run takes about 15

    @defer.inlineCallbacks
    def test_every_transfer_confirmed_by_lean_payees_and_in_the_books(self):
        count = 150
        table = os.path.abspath(self.mktemp())
        answerers = []
        answer_notices = devices.SimDevices.answer_notices

        def keep(sim_devices, device):
            answerers.append((device, answer_notices(sim_devices, device)))
            return answerers[-1][1]

        self.patch(devices.SimDevices, "answer_notices", keep)
        args = load.parse_args(["--rates", "6000", "--count", str(count), "--payers", "2",
                                "--payees", "2", "--workers", "2", "--generator", "lean",
                                "--csv", table])
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        status = yield load.run(reactor, args)
        self.assertEqual(status, load.EXIT_OK, out.getvalue())
        self.assertIn("books: every audit passed, every 200 is in the journal", out.getvalue())
        with open(table, encoding="utf-8") as stream:
            (row,) = list(csv.DictReader(stream))
        self.assertEqual((row["generator"], row["statuses"], row["audit_ok"]),
                         ("lean", f"200:{count}", "true"))
        self.assertEqual((row["journal_checked"], row["journal_missing"]), (str(count), "0"))
        self.assertIn("generator (lean) CPU", out.getvalue())
        self.assertEqual(len(answerers), 2)
        self.assertGreaterEqual(sum(answerer.answered for _, answerer in answerers), count)
        for device, answerer in answerers:
            self.assertEqual(device.notices, [], "the payees' stacks saw no notice")

"""Overload control (mpay/sip/overload.py): the reactor's lag decides, with hysteresis; new work
is refused with 503 and Retry-After, what finishes work never is."""

from __future__ import annotations

import socket

from twisted.internet import task
from twisted.trial import unittest

from mpay.sip.message import parse
from mpay.sip.overload import (
    RESUME_QUEUE_BYTES, SHED_QUEUE_BYTES, LagMonitorService, OverloadGuard, receive_queue_bytes,
)
from mpay.sip.transaction import TransactionLayer
from mpay.timewheel import TimeWheel


def request(method: str, branch: str, cseq: int = 1) -> bytes:
    return (f"{method} sip:ps@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK{branch}\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:a@x>;tag=a\r\nTo: <sip:ps@x>\r\n"
            f"Call-ID: c-{branch}@x\r\nCSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n").encode()


class OverloadGuardTests(unittest.TestCase):
    def test_sheds_above_the_high_mark_until_below_the_low_one(self):
        guard = OverloadGuard(0.25, 0.1, smoothing=1.0)
        guard.sample(0.2)
        self.assertFalse(guard.refuses("MESSAGE"))
        guard.sample(0.3)
        self.assertTrue(guard.refuses("MESSAGE"))
        guard.sample(0.15)                      # between the marks: still shedding
        self.assertTrue(guard.refuses("RECEIVE"))
        self.assertFalse(guard.refuses("BYE"), "what ends work is never refused")
        self.assertFalse(guard.refuses("ACK"))
        guard.sample(0.05)
        self.assertFalse(guard.refuses("MESSAGE"))
        self.assertEqual((guard.episodes, guard.shed), (1, 2))

    def test_one_late_tick_does_not_start_shedding(self):
        guard = OverloadGuard(0.25, 0.1, smoothing=0.3)
        guard.sample(0.5)
        self.assertFalse(guard.shedding)
        for _ in range(5):
            guard.sample(0.5)
        self.assertTrue(guard.shedding)

    def test_a_receive_queue_backlog_sheds_until_it_drains(self):
        guard = OverloadGuard(0.25, 0.1, smoothing=1.0)
        guard.sample_queue(SHED_QUEUE_BYTES + 1)
        self.assertTrue(guard.refuses("MESSAGE"))
        guard.sample(0.0)                          # the reactor is punctual: still the queue
        self.assertTrue(guard.shedding)
        guard.sample_queue(RESUME_QUEUE_BYTES + 1)
        self.assertTrue(guard.shedding)
        guard.sample_queue(RESUME_QUEUE_BYTES - 1)
        self.assertFalse(guard.shedding)
        self.assertEqual(guard.episodes, 1)

    def test_the_receive_queue_is_read_from_the_socket(self):
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sink.close)
        self.addCleanup(sender.close)
        sink.bind(("127.0.0.1", 0))
        self.assertEqual(receive_queue_bytes(sink), 0)
        for _ in range(20):
            sender.sendto(b"x" * 500, sink.getsockname())
        queued = receive_queue_bytes(sink)
        self.assertGreaterEqual(queued, 20 * 500)     # each datagram's kernel size, at least
        for _ in range(20):   # Linux releases UDP receive memory in batches: read them all
            sink.recv(1000)
        self.assertLess(receive_queue_bytes(sink), queued)

    def test_marks_must_be_ordered(self):
        with self.assertRaises(ValueError):
            OverloadGuard(0.1, 0.2)

    def test_the_monitor_measures_how_late_the_reactor_runs(self):
        clock = task.Clock()
        guard = OverloadGuard(0.25, 0.1, smoothing=1.0)
        monitor = LagMonitorService(guard, clock, probe_s=0.05)
        monitor.startService()
        clock.advance(0.05)
        self.assertEqual(guard.lag_s, 0.0)
        clock.advance(0.45)                     # the reactor was busy for 0.4 s too long
        self.assertAlmostEqual(guard.lag_s, 0.4)
        self.assertTrue(guard.shedding)
        monitor.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])


class _TU:
    def __init__(self):
        self.requests = []

    def request_received(self, txn, request):
        self.requests.append(request.method)

    def ack_received(self, request, addr):
        pass


class SheddingTests(unittest.TestCase):
    def setUp(self):
        self.sent = []
        self.tu = _TU()
        self.layer = TransactionLayer(TimeWheel(), lambda data, addr: self.sent.append(parse(data)),
                                      self.tu)
        self.layer.guard = self.guard = OverloadGuard(0.25, 0.1, smoothing=1.0)

    def receive(self, data: bytes):
        self.layer.receive_request(parse(data), ("127.0.0.1", 5999))

    def test_new_work_gets_503_with_retry_after_and_no_transaction(self):
        self.receive(request("MESSAGE", "admitted"))
        self.guard.sample(1.0)
        self.receive(request("MESSAGE", "refused"))
        self.receive(request("MESSAGE", "admitted"))      # a retransmission: still absorbed
        self.receive(request("BYE", "ending"))
        self.assertEqual(self.tu.requests, ["MESSAGE", "BYE"])
        [refusal] = [r for r in self.sent if r.status == 503]
        self.assertEqual((refusal.call_id, refusal.headers.get("Retry-After")), ("c-refused@x", "1"))
        self.assertEqual(self.layer.stats["overload_refusals"], 1)
        self.assertNotIn("c-refused@x", [t.request.call_id for t in self.layer.server.values()])

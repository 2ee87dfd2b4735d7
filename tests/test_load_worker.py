"""The payer simulator, both generators, against a stand-in PS on loopback.

The stand-in answers each MESSAGE 200 with a journal id, and records what
came: the simulator must send every request of its share once, each with a
ticket, an authenticator and the payer's signature, and build them no more
than PRECOMPUTE_AHEAD_S before they are due (here made tiny, so that most
are built while sending).  A stand-in that loses each request's first copy
shows the retransmission.  No timing is asserted beyond "after Timer E".
"""

from __future__ import annotations

import base64
import gc
import json
import os

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from mpay.auth.tickets import AUTHENTICATOR_HEADER, TICKET_HEADER
from mpay.load import schedule, worker
from mpay.load.stats import Outcome
from mpay.payment.receipt import SIGNATURE_HEADER
from mpay.sim.device import DeviceState
from mpay.sip.message import make_response, parse
from mpay.sip.timing import T1_S

PAYERS = ("+886910000001", "+886910000002")
PAYEES = ["+886920000001"]
RATE_PER_MIN = 6_000
COUNT = 40


class StandInPS(protocol.DatagramProtocol):
    """Answers every MESSAGE 200 with the next journal id; keeps each request seen.

    *drop_first*: the first copy of every request is lost (as if the network dropped it).
    """

    def __init__(self, drop_first: bool = False):
        self.requests = []
        self.sources: dict[str, set] = {}      # payer URI -> the addresses its requests came from
        self.drop_first = drop_first
        self._seen: set[str] = set()

    def datagramReceived(self, data: bytes, addr) -> None:
        request = parse(data)
        if self.drop_first and request.call_id not in self._seen:
            self._seen.add(request.call_id)
            return
        self.requests.append(request)
        self.sources.setdefault(request.from_addr.uri, set()).add(addr)
        body = json.dumps({"journal_id": len(self.requests)}).encode()
        self.transport.write(make_response(request, 200, body=body).to_bytes(), addr)


def payer_state(number: str) -> dict:
    state = DeviceState.new(number)
    state.ticket = "ticket-of-" + number
    state.k_c_ps = base64.b64encode(os.urandom(32)).decode()
    return state.__dict__


class PayerSimulatorTests(unittest.TestCase):
    """The stack generator; :class:`LeanPayerSimulatorTests` runs the same on the lean one."""

    generator = worker.STACK

    def simulator(self, ps: StandInPS, count: int = COUNT):
        port = reactor.listenUDP(0, ps, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        share = schedule.split(schedule.uniform(RATE_PER_MIN, count), 1)[0]
        plan = {"ps_addr": ["127.0.0.1", port.getHost().port], "domain": "mpay.test",
                "payers": [payer_state(number) for number in PAYERS], "payees": PAYEES,
                "amount_minor": 1, "timeout_s": 5.0, "schedule": share,
                "generator": self.generator}
        simulator = worker.SIMULATORS[self.generator](reactor, plan, lambda report: None)
        self.addCleanup(simulator.close)
        self.addCleanup(gc.enable)                     # the sender pauses its collector
        return simulator

    @defer.inlineCallbacks
    def test_every_request_sent_once_signed_and_built_ahead_of_its_time(self):
        self.patch(worker, "PRECOMPUTE_AHEAD_S", 0.05)
        ps = StandInPS()
        simulator = self.simulator(ps)
        ready = simulator.prepare()
        self.assertLess(ready["ready"], COUNT)         # the rest is built while sending
        result = yield simulator.go(reactor.seconds())

        outcomes = [Outcome(*entry) for entry in result["result"]]
        self.assertEqual([outcome.index for outcome in outcomes], list(range(COUNT)))
        self.assertEqual({outcome.status for outcome in outcomes}, {200})
        self.assertEqual(sorted(outcome.journal_id for outcome in outcomes),
                         list(range(1, COUNT + 1)))
        self.assertEqual(len({request.call_id for request in ps.requests}), COUNT)
        for request in ps.requests:
            for header in (TICKET_HEADER, AUTHENTICATOR_HEADER, SIGNATURE_HEADER):
                self.assertTrue(request.headers.get(header), header)
        senders = {request.from_addr.uri for request in ps.requests}
        self.assertEqual(len(senders), len(PAYERS))
        self.assert_a_socket_per_payer(ps)
        self.assertGreater(result["cpu_s"], 0.0)
        self.assertEqual(result["generator"], self.generator)

    @defer.inlineCallbacks
    def test_a_lost_request_is_retransmitted_and_answered(self):
        count = 3
        ps = StandInPS(drop_first=True)
        simulator = self.simulator(ps, count)
        simulator.prepare()
        result = yield simulator.go(reactor.seconds())
        outcomes = [Outcome(*entry) for entry in result["result"]]
        self.assertEqual([outcome.status for outcome in outcomes], [200] * count)
        self.assertEqual(result["resent"], count)
        for outcome in outcomes:
            self.assertGreater(outcome.latency_s, T1_S / 2)     # it waited for Timer E
        self.assert_a_socket_per_payer(ps)                      # retransmitted from it too

    def assert_a_socket_per_payer(self, ps: StandInPS) -> None:
        """Each payer sends from one address of its own, as a phone does (so that the
        kernel's SO_REUSEPORT hash spreads payers over PS processes)."""
        ports = [port for sources in ps.sources.values() for _, port in sources]
        self.assertEqual(len(ports), len(ps.sources), "one source address per payer")
        self.assertEqual(len(set(ports)), len(ports), "no two payers share a socket")


class LeanPayerSimulatorTests(PayerSimulatorTests):
    generator = worker.LEAN

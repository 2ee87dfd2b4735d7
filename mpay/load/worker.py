"""The payer simulator: one sender process of ``mpay-load`` (``python -m mpay.load.worker``).

It is given (one JSON line on stdin) the PS's address, some enrolled payers
(their device state: ticket, session key, Ed25519 key) and its share of the
run's schedule.  It binds one socket per payer, a phone's own address: the
kernel picks among PS processes sharing a port (SO_REUSEPORT) by a hash of
the source address, so one socket would put a sender's whole share on one
process.  It builds the first PRECOMPUTE_AHEAD_S of signed, authenticated
transfer requests -- the expensive part, done before the clock starts -- and
says ``ready``; on ``start_at`` (a wall-clock time shared by all senders) it
sends each request at its offset, building the later ones in its idle time
so that no authenticator is older than PRECOMPUTE_AHEAD_S when it leaves
(the PS allows 300 s of skew).  It reports progress, then every request's
outcome and its own CPU, one JSON line each on stdout.

The plan's ``generator`` says how requests go: ``stack`` through a real SIP
client transaction (:class:`PayerSimulator`), ``lean`` as bytes serialised
ahead from a plain UDP socket per payer, matched and retransmitted by
``mpay.load.lean`` (:class:`LeanPayerSimulator`), or ``sipp`` all built ahead and sent
by SIPp (``mpay.load.sipp_sender``): the same requests every way.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
from collections import deque
from typing import Any, Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.application.service import MultiService
from twisted.internet import defer, stdio, task
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver

from mpay.load.devices import LOOPBACK, NoRequests
from mpay.load.lean import RETRANSMIT_TICK_S, LeanClient, Prepared, journal_id_of, prepare
from mpay.load.sender import (
    LEAN, PRECOMPUTE_AHEAD_S, PROGRESS_EVERY_S, SIPP, STACK, cpu_s, payer_device,
)
from mpay.load.sipp_sender import SippPayerSimulator
from mpay.load.stats import Outcome
from mpay.sim.device import Device, DeviceState
from mpay.sip.endpoint import SIPEndpoint
from mpay.sip.message import Request
from mpay.sip.transport import UDPListenerService
from mpay.timewheel import TimeWheel
from mpay.timewheel_service import TimeWheelService

PRECOMPUTE_BATCH = 100
"""Requests built per reactor turn while sending, so a due request never waits behind many."""

MAX_CONTROL_LINE_BYTES = 64 * 1024 * 1024
"""Bound on one control line (the plan carries the whole schedule share)."""

SENDER_TICK_S = 0.1
"""The stack sender's time wheel (retransmission timers)."""

log = Logger()


class _Simulator:
    """Sends one share of a run; *emit* gets each report (a dict) for the parent.

    The schedule, the building ahead, the outcomes and the reports; a
    generator's subclass makes each payer's own endpoint (``_endpoint()``, what
    its Device builds with: an address of its own), binds them (``_listen()``),
    keeps a built request its way (``_prepared(request, endpoint)``), sends it
    from its payer's endpoint (``_send(built, index, lag)``), records each
    :class:`Outcome` with ``_record``, counts its retransmissions (``_resent()``) and closes
    (``close()``, a Deferred).
    """

    generator = ""

    def __init__(self, reactor, plan: dict, emit: Callable[[dict], None]):
        self.reactor = reactor
        self.emit = emit
        self.ps_addr = tuple(plan["ps_addr"])
        self.payees: list[str] = plan["payees"]
        self.amount: int = plan["amount_minor"]
        self.timeout_s: float = plan["timeout_s"]
        self.schedule: list[tuple[int, float]] = [tuple(entry) for entry in plan["schedule"]]
        self.payers = [self._payer(DeviceState(**state), plan["domain"])
                       for state in plan["payers"]]
        self.built = 0                            # requests of the share built so far
        self.waiting: deque[Any] = deque()        # built, not yet sent, in schedule order
        self.sent = 0
        self.outcomes: dict[int, Outcome] = {}
        self.start_at = 0.0
        self.finished: defer.Deferred = defer.Deferred()
        self._cpu_at_start = 0.0
        self._precompute_cpu_s = 0.0
        self._wake: Any = None
        self._deadline: Any = None
        self._progress: task.LoopingCall | None = None

    def _payer(self, state: DeviceState, domain: str) -> tuple[Device, Ed25519PrivateKey]:
        return payer_device(self.reactor, state, domain, self.ps_addr, self._endpoint())

    def prepare(self) -> dict:
        """Bind, build what the first PRECOMPUTE_AHEAD_S need; the ``ready`` report."""
        self._listen()
        started = cpu_s()
        self._build_until(PRECOMPUTE_AHEAD_S, limit=len(self.schedule))
        self._precompute_cpu_s = cpu_s() - started
        return {"ready": self.built, "precompute_cpu_s": self._precompute_cpu_s}

    def _build_until(self, offset_s: float, limit: int) -> None:
        """Build the requests due before *offset_s* from the start, at most *limit* now."""
        schedule = self.schedule
        while limit > 0 and self.built < len(schedule) and schedule[self.built][1] < offset_s:
            index = schedule[self.built][0]
            device, key = self.payers[self.built % len(self.payers)]
            payee = self.payees[index % len(self.payees)]
            self.waiting.append(self._prepared(
                device.transfer_request(payee, self.amount, signing_key=key), device.endpoint))
            self.built += 1
            limit -= 1

    def go(self, start_at: float) -> defer.Deferred:
        """Send on the schedule from *start_at*; fires with the ``result`` report."""
        self.start_at = start_at
        self._cpu_at_start = cpu_s()
        gc.disable()      # no collector pause of ours in a latency; the process ends after the run
        self._progress = task.LoopingCall(self._report_progress)
        self._progress.clock = self.reactor
        self._progress.start(PROGRESS_EVERY_S, now=False)
        self._wake = self.reactor.callLater(max(0.0, start_at - self.reactor.seconds()), self._run)
        return self.finished

    def _run(self) -> None:
        self._wake = None
        now = self.reactor.seconds()
        schedule = self.schedule
        while self.sent < len(schedule) and self.start_at + schedule[self.sent][1] <= now:
            if not self.waiting:                  # running late: build on demand
                self._build_until(math.inf, limit=1)
            index, offset = schedule[self.sent]
            self.sent += 1
            self._send(self.waiting.popleft(), index, now - (self.start_at + offset))
        horizon = now - self.start_at + PRECOMPUTE_AHEAD_S
        self._build_until(horizon, limit=PRECOMPUTE_BATCH)
        if self.sent == len(schedule):
            self._deadline = self.reactor.callLater(self.timeout_s, self._finish)
            self._maybe_finish()
            return
        # More to build: come back after the reactor's other work; else when the next is due.
        more = self.built < len(schedule) and schedule[self.built][1] < horizon
        delay = 0.0 if more else self.start_at + schedule[self.sent][1] - self.reactor.seconds()
        self._wake = self.reactor.callLater(max(0.0, delay), self._run)

    def _record(self, outcome: Outcome) -> None:
        self.outcomes[outcome.index] = outcome
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.sent == len(self.schedule) and len(self.outcomes) == len(self.schedule):
            self._finish()

    def _report_progress(self) -> None:
        self.emit({"answered": len(self.outcomes), "sent": self.sent})

    def _finish(self) -> None:
        if self.finished.called:
            return
        for handle in (self._wake, self._deadline):
            if handle is not None and handle.active():
                handle.cancel()
        if self._progress is not None and self._progress.running:
            self._progress.stop()
        self._stop_sending()
        run_cpu_s = cpu_s() - self._cpu_at_start
        outcomes = [self.outcomes.get(index) or Outcome(index, None, None, 0.0)
                    for index, _ in self.schedule]
        self.finished.callback({"result": [list(outcome) for outcome in outcomes],
                                "cpu_s": run_cpu_s, "precompute_cpu_s": self._precompute_cpu_s,
                                "resent": self._resent(), "generator": self.generator})

    def _stop_sending(self) -> None:
        """The run is over: no more retransmissions (the stack's layer keeps its own)."""


class PayerSimulator(_Simulator):
    """The stack generator: each request through a real SIP client transaction.

    Every payer has an endpoint and a listener of its own; they share one time wheel.
    """

    generator = STACK

    def __init__(self, reactor, plan: dict, emit: Callable[[dict], None]):
        self.services = MultiService()          # the time wheel, then each payer's listener
        self.timers = TimeWheelService(TimeWheel(tick_s=SENDER_TICK_S), reactor=reactor)
        self.timers.setServiceParent(self.services)
        self.endpoints: list[SIPEndpoint] = []
        super().__init__(reactor, plan, emit)

    def _endpoint(self) -> SIPEndpoint:
        endpoint = SIPEndpoint("payer", NoRequests(), self.timers)
        UDPListenerService(f"udp:0:interface={LOOPBACK}", endpoint,
                           reactor=self.reactor).setServiceParent(self.services)
        self.endpoints.append(endpoint)
        return endpoint

    def _listen(self) -> None:
        self.services.startService()

    def _prepared(self, request: Request, endpoint: SIPEndpoint) -> tuple[Request, SIPEndpoint]:
        return request, endpoint

    def _send(self, built: tuple[Request, SIPEndpoint], index: int, lag: float) -> None:
        request, endpoint = built
        sent_at = self.reactor.seconds()
        answer = endpoint.send_request(request, self.ps_addr)
        answer.addCallbacks(self._answered, self._unanswered,
                            callbackArgs=(index, sent_at, lag), errbackArgs=(index, lag))

    def _answered(self, response: Any, index: int, sent_at: float, lag: float) -> None:
        journal_id = journal_id_of(response.body) if response.status == 200 else None
        self._record(Outcome(index, response.status, self.reactor.seconds() - sent_at, lag,
                             journal_id))

    def _unanswered(self, failure: Any, index: int, lag: float) -> None:
        self._record(Outcome(index, None, None, lag))

    def _resent(self) -> int:
        return sum(endpoint.layer.stats["requests_resent"] for endpoint in self.endpoints)

    def close(self) -> defer.Deferred:
        if not self.services.running:
            return defer.succeed(None)
        return defer.maybeDeferred(self.services.stopService)


class _PayerSocket(DatagramProtocol):
    """One payer's connected socket: what its Device builds with (``sent_by``), the
    writes of its requests, and its responses to the shared client."""

    def __init__(self, simulator: "LeanPayerSimulator"):
        self.simulator = simulator
        self.sent_by: tuple[str, int] | None = None
        self.port: Any = None

    def listen(self, reactor, ps_addr: tuple[str, int]) -> None:
        self.port = reactor.listenUDP(0, self, interface=LOOPBACK)
        self.port.connect(*ps_addr)
        host = self.port.getHost()
        self.sent_by = (host.host, host.port)

    def write(self, data: bytes) -> None:
        try:
            self.transport.write(data)
        except OSError as exc:            # a full buffer is lost like a dropped datagram
            log.warn("lean sender: send failed: {error}", error=exc)

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.simulator.client.response_received(data)

    def connectionRefused(self) -> None:
        self.simulator.refused += 1       # ICMP port unreachable: the server is not there

    def close(self) -> defer.Deferred:
        port, self.port = self.port, None
        return defer.succeed(None) if port is None else defer.maybeDeferred(port.stopListening)


class LeanPayerSimulator(_Simulator):
    """The lean generator: the same requests serialised ahead, sent by ``lean.LeanClient``
    from each payer's own socket."""

    generator = LEAN

    def __init__(self, reactor, plan: dict, emit: Callable[[dict], None]):
        self.client = LeanClient(reactor.seconds, self._record)
        self.sockets: list[_PayerSocket] = []
        self.refused = 0
        self._retransmitter = task.LoopingCall(self.client.tick)
        self._retransmitter.clock = reactor
        super().__init__(reactor, plan, emit)

    def _endpoint(self) -> _PayerSocket:
        self.sockets.append(_PayerSocket(self))
        return self.sockets[-1]

    def _listen(self) -> None:
        for payer_socket in self.sockets:
            payer_socket.listen(self.reactor, self.ps_addr)
        self._retransmitter.start(RETRANSMIT_TICK_S, now=False)

    def _prepared(self, request: Request,
                  payer_socket: _PayerSocket) -> tuple[Prepared, Callable[[bytes], None]]:
        return prepare(request), payer_socket.write

    def _send(self, built: tuple[Prepared, Callable[[bytes], None]], index: int,
              lag: float) -> None:
        self.client.send(index, built[0], lag, built[1])

    def _resent(self) -> int:
        return self.client.resent

    def _stop_sending(self) -> None:
        if self._retransmitter.running:
            self._retransmitter.stop()

    def close(self) -> defer.Deferred:
        self._stop_sending()
        return defer.gatherResults([payer_socket.close() for payer_socket in self.sockets])


SIMULATORS = {STACK: PayerSimulator, LEAN: LeanPayerSimulator, SIPP: SippPayerSimulator}


class _Control(LineReceiver):
    """The parent's two lines (the plan, then ``start_at``); reports go back one a line.

    The result is written through the transport (stdout is non-blocking under
    StandardIO) and the process ends once it has all left: ``done`` fires on
    connectionLost, after the last byte.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_CONTROL_LINE_BYTES

    def __init__(self, reactor):
        self.reactor = reactor
        self.simulator: _Simulator | None = None
        self.done: defer.Deferred = defer.Deferred()

    def emit(self, report: dict) -> None:
        self.sendLine(json.dumps(report).encode())

    def lineReceived(self, line: bytes) -> None:
        message = json.loads(line)
        if self.simulator is None:
            if message.get("nice"):
                os.nice(message["nice"])    # SIPp, started from here, inherits it
            simulator = SIMULATORS[message.get("generator", STACK)]
            self.simulator = simulator(self.reactor, message, self.emit)
            self.emit(self.simulator.prepare())
            return
        self.simulator.go(message["start_at"]).addCallbacks(self._result, self._failed)

    def _result(self, report: dict) -> None:
        self.emit(report)
        self.transport.loseConnection()

    def _failed(self, failure: Any) -> None:
        """The run could not be made: said on stderr, which the parent shows, and the
        process ends without a result."""
        sys.stderr.write(f"mpay.load.worker: {failure.getErrorMessage()}\n")
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(None)


def main() -> None:
    """The process entry point: serve the parent's plan, report, exit."""
    def run(reactor):
        control = _Control(reactor)
        stdio.StandardIO(control, reactor=reactor)
        return control.done

    task.react(run)


if __name__ == "__main__":
    main()

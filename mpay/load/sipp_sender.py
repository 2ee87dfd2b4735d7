"""The SIPp generator's payer process (``mpay.load.worker`` with ``generator: sipp``).

The whole share is built ahead into SIPp's injection file, then one SIPp sends it at
the share's rate, and its call log becomes the share's outcomes (``mpay.load.sipp``).
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
from typing import Callable

from twisted.internet import defer, task

from mpay.load import sipp
from mpay.load.devices import LOOPBACK
from mpay.load.sender import PRECOMPUTE_AHEAD_S, PROGRESS_EVERY_S, cpu_s, payer_device
from mpay.load.stats import Outcome
from mpay.sim.device import DeviceState

SIPP_OUTPUT_SHOWN_BYTES = 4000
"""The tail of SIPp's output shown when it did not run."""


class _SippSocket:
    """What a payer's Device builds with under SIPp: SIPp's address (its own port is SIPp's
    choice, and only the IP is in an authenticator)."""

    def __init__(self) -> None:
        self.sent_by = (LOOPBACK, sipp.ANY_PORT)


class SippPayerSimulator:
    """The SIPp generator's sender, with the other senders' interface (``prepare``, ``go``,
    ``close``).

    SIPp keeps its own pace from its own start: a call's lag is against SIPp's
    first send, not against ``start_at`` (SIPp's start-up, reading the file,
    is not the server's doing).  The CPU reported is this process's and SIPp's.
    """

    generator = sipp.SIPP

    def __init__(self, reactor, plan: dict, emit: Callable[[dict], None]):
        self.reactor = reactor
        self.emit = emit
        self.ps_addr = tuple(plan["ps_addr"])
        self.domain = plan["domain"]
        self.payees: list[str] = plan["payees"]
        self.amount: int = plan["amount_minor"]
        self.timeout_s: float = plan["timeout_s"]
        self.rate_per_min: float = plan["rate_per_min"]
        self.schedule: list[tuple[int, float]] = [tuple(entry) for entry in plan["schedule"]]
        self.run_tag = plan["run_tag"]
        self.sipp = sipp.require()
        # The parent refused a longer one (run.check_schedule): all of it is built ahead.
        assert not self.schedule or self.schedule[-1][1] <= PRECOMPUTE_AHEAD_S, self.schedule[-1]
        self.payers = [payer_device(reactor, DeviceState(**state), self.domain, self.ps_addr,
                                    _SippSocket()) for state in plan["payers"]]
        self.directory = tempfile.mkdtemp(prefix="mpay-sipp-")
        self.process: sipp.SippProcess | None = None
        self.finished: defer.Deferred = defer.Deferred()
        self._precompute_cpu_s = 0.0
        self._cpu_at_start = 0.0
        self._progress: task.LoopingCall | None = None

    def prepare(self) -> dict:
        started = cpu_s()
        lines, body = [], b""
        for built, (index, _) in enumerate(self.schedule):
            device, key = self.payers[built % len(self.payers)]
            payee = self.payees[index % len(self.payees)]
            request = device.transfer_request(
                payee, self.amount, signing_key=key, body_end=sipp.BODY_END,
                call_id=sipp.call_id(self.run_tag, built + 1, LOOPBACK))
            assert not body or request.body == body, "the scenario has one body for all"
            body = request.body
            lines.append(sipp.call_fields(request, payee, device.state.number, self.domain).line())
        files = {"calls.csv": sipp.injection_file(lines),
                 "uac.xml": sipp.uac_scenario(self.domain, body or sipp.BODY_END)}
        for name, text in files.items():
            with open(os.path.join(self.directory, name), "w") as out:
                out.write(text)
        self._precompute_cpu_s = cpu_s() - started
        return {"ready": len(lines), "precompute_cpu_s": self._precompute_cpu_s}

    def go(self, start_at: float) -> defer.Deferred:
        self._cpu_at_start = cpu_s()
        self.reactor.callLater(max(0.0, start_at - self.reactor.seconds()), self._start)
        return self.finished

    def _start(self) -> None:
        command = sipp.uac_command(self.sipp, self.directory, self.ps_addr, host=LOOPBACK,
                                   run_tag=self.run_tag, calls=len(self.schedule),
                                   rate_per_min=self.rate_per_min, timeout_s=self.timeout_s)
        self.process = sipp.SippProcess()
        self.reactor.spawnProcess(self.process, command[0], command, env=dict(os.environ),
                                  path=self.directory)
        self._progress = task.LoopingCall(self._report_progress)
        self._progress.clock = self.reactor
        self._progress.start(PROGRESS_EVERY_S, now=False)
        self.process.ended.addCallback(self._ended)

    def _read(self, name: str) -> str:
        try:
            with open(os.path.join(self.directory, name)) as stream:
                return stream.read()
        except FileNotFoundError:
            return ""

    def _report_progress(self) -> None:
        try:
            size = os.path.getsize(os.path.join(self.directory, "calls.log"))
        except OSError:
            size = 0
        # A line is about 60 bytes: progress need not be exact, the result is.
        self.emit({"answered": min(len(self.schedule), size // sipp.LOG_LINE_BYTES), "sent": 0})

    def _ended(self, code: int | None) -> None:
        if self._progress is not None and self._progress.running:
            self._progress.stop()
        calls = sipp.read_calls(self._read("calls.log").splitlines())
        resent = sipp.retransmissions(self._read("stats.csv"))
        shutil.rmtree(self.directory, ignore_errors=True)
        if not calls and self.schedule:
            # Not a server that answered nothing (that is failures, logged by SIPp one by one):
            # SIPp itself did not run (a port, a file, a version), and the run cannot be measured.
            assert self.process is not None
            output = bytes(self.process.output[-SIPP_OUTPUT_SHOWN_BYTES:]).decode("utf-8", "replace")
            self.finished.errback(RuntimeError(f"sipp exited {code} and logged no call: {output}"))
            return
        first_sent = min((call.sent_s for call in calls.values()), default=0.0)
        first_offset = self.schedule[0][1] if self.schedule else 0.0
        outcomes = []
        for number, (index, offset) in enumerate(self.schedule, start=1):
            call = calls.get(number)
            if call is None:
                outcomes.append(Outcome(index, None, None, 0.0))
                continue
            lag = call.sent_s - (first_sent + offset - first_offset)
            outcomes.append(Outcome(index, call.status, call.latency_s, max(0.0, lag),
                                    call.journal_id))
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        run_cpu_s = cpu_s() - self._cpu_at_start + children.ru_utime + children.ru_stime
        self.finished.callback({"result": [list(outcome) for outcome in outcomes],
                                "cpu_s": run_cpu_s, "precompute_cpu_s": self._precompute_cpu_s,
                                "resent": resent, "generator": self.generator})

    def close(self) -> defer.Deferred:
        shutil.rmtree(self.directory, ignore_errors=True)
        if self.process is None:
            return defer.succeed(None)
        return self.process.stop(self.reactor)

"""One load test: the server, the payees, and a run of payer processes per arrival rate.

This process enrols every device (through the server's simulated modem),
tops the payers up with ``mpay-admin``, and keeps the payees: real Sim-DMDs
registered at the PS, confirming each notice with 200 (through their SIP
stack, or with ``--generator lean`` on bytes: ``mpay.load.lean``).  For each rate it
deals the schedule to WORKERS payer processes (``mpay.load.worker``), lets
them build their signed requests, starts them together, and collects every
request's outcome.  Then the books are checked, on whichever ledger the
server has (``mpay.load.books``): ``mpay-admin audit`` must pass and every
journal id the payers were given in a 200 must be in the journal.  The
server's CPU comes from ``/proc/<pid>/stat``, summed over its processes (a
``--workers N`` server is N of them); on the production backends so
does theirs (the PostgreSQL backends serving the server, the redis-server);
the generator's is the senders' own (``getrusage``) plus this process's, so
a reader can tell whether the load generator was the bottleneck.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Callable

from twisted.internet import defer, protocol, threads
from twisted.logger import Logger

from mpay.load import schedule as schedules
from mpay.load import sipp
from mpay.load.backends import Backends
from mpay.load.books import LedgerRef
from mpay.load.devices import LOOPBACK, SimDevices
from mpay.load.server import (
    REPO, SINGLE_NAME, cpu_used, processes_cpu_s, run_admin, tree_cpu_s, worker_names,
)
from mpay.load.stats import Outcome, RunStats
from mpay.load.sender import LEAN, PRECOMPUTE_AHEAD_S, SIPP, cpu_s

DEFAULT_COUNT_PER_RATE = 1_000
DEFAULT_PAYERS = 8
DEFAULT_PAYEES = 8
DEFAULT_WORKERS = 2
RESPONSE_TIMEOUT_S = 2.0
"""A request answered later than this failed.  Far beyond the 50 ms a payer should see, and
short against a sustained run (``--seconds``), so a server that does not keep up fails."""

TRANSFER_AMOUNT_MINOR = 1
TOP_UP_MINOR = 10**11
"""Each payer's funds: far more than any sweep spends, so no request meets 402."""

ENROL_CONCURRENCY = 4
"""Devices enrolled at once (each places a "call" through the one simulated modem line)."""

START_DELAY_S = 0.3
"""From the last sender's ``ready`` to the common start: time for the line to reach each."""

WORKER_OUTPUT_KEPT_BYTES = 16 * 1024
"""The tail of a sender's stderr kept for the error message when it fails."""

PAYER_PREFIX = "+88691"
PAYEE_PREFIX = "+88692"

log = Logger()


@dataclass(frozen=True)
class Target:
    """Where the servers are and the files a load run needs of them."""

    as_addr: tuple[str, int]
    ps_addr: tuple[str, int]
    modem_control: str
    as_key_path: str
    ledger: LedgerRef
    pid: int | None = None           # the server process, for its CPU (None: not measured)
    backends: Backends | None = None  # its production stores, for their CPU (None: not measured)

    @classmethod
    def of(cls, server: Any, backends: Backends | None = None) -> "Target":
        """The target of a running :class:`~mpay.load.server.ServerProcess`."""
        return cls(server.as_addr, server.ps_addr, server.modem_control, server.path("as.pub"),
                   server.ledger, server.pid, backends)


@dataclass(frozen=True)
class LoadSettings:
    count: int = DEFAULT_COUNT_PER_RATE
    arrival: str = schedules.UNIFORM
    seed: int = 0
    payers: int = DEFAULT_PAYERS
    payees: int = DEFAULT_PAYEES
    workers: int = DEFAULT_WORKERS
    timeout_s: float = RESPONSE_TIMEOUT_S
    min_seconds: float = 0.0         # each rate runs at least this long (more than ``count``)
    generator: str = LEAN            # the load generator: lean (bytes), or the SIP stack
    nice: int = 0                    # the senders' (and SIPp's) niceness

    def count_for(self, rate_per_min: float) -> int:
        """Requests for *rate_per_min*: ``count``, or more to keep it up ``min_seconds``."""
        return max(self.count, math.ceil(rate_per_min * self.min_seconds / 60))


@dataclass(frozen=True)
class RateReport:
    """One rate's statistics and what the books said afterwards."""

    stats: RunStats
    audit_ok: bool
    audit_output: str
    journal_checked: int             # journal ids of 200s looked up
    journal_missing: int             # ... of which not in the journal (must be 0)
    resent: int                      # requests the senders had to retransmit
    payee_cpu_pct: float = math.nan          # this process: the payees (and the bookkeeping)
    busiest_sender_cpu_pct: float = math.nan  # a sender near 100 % was the bottleneck itself
    precompute_us: float = math.nan          # sender CPU to build one signed request
    backend_cpu_pct: float = math.nan        # PostgreSQL backends + redis-server (if used)
    server_cpu_by_process: tuple[tuple[str, float], ...] = ()   # (PS name, CPU %) each
    devices_by_process: tuple[tuple[str, int, int], ...] = ()   # (PS name, payers, payees)

    @property
    def server_processes(self) -> int:
        """The server's processes whose CPU was summed (``--workers N``: N PS processes
        and the signature process of each)."""
        return len(self.server_cpu_by_process)

    @property
    def books_ok(self) -> bool:
        return self.audit_ok and self.journal_missing == 0


def check_schedule(settings: LoadSettings, offsets: list[float]) -> None:
    """Refuse (RuntimeError) a schedule its generator cannot keep honestly: SIPp's
    senders build every request before the start, and an authenticator must leave
    within PRECOMPUTE_AHEAD_S of being made."""
    if settings.generator == SIPP and offsets and offsets[-1] > PRECOMPUTE_AHEAD_S:
        raise RuntimeError(
            f"--generator sipp builds every request before the start: {len(offsets)} take"
            f" {offsets[-1]:.0f} s, and an authenticator must leave within"
            f" {PRECOMPUTE_AHEAD_S:.0f} s of being made (fewer, faster, or --generator lean)")


class _Sender(protocol.ProcessProtocol):
    """One payer process: its reports, one JSON line each, to *on_report*."""

    def __init__(self, on_report: Callable[["_Sender", dict], None]):
        self.on_report = on_report
        self.ready: defer.Deferred = defer.Deferred()
        self.result: defer.Deferred = defer.Deferred()
        self.progress = 0
        self._buffer = b""
        self._stderr = bytearray()

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            report = json.loads(line)
            if "ready" in report:
                self.ready.callback(report)
            elif "result" in report:
                self.result.callback(report)
            else:
                self.progress = report["answered"]
                self.on_report(self, report)

    def errReceived(self, data: bytes) -> None:
        self._stderr += data
        del self._stderr[:-WORKER_OUTPUT_KEPT_BYTES]

    def send(self, message: dict) -> None:
        self.transport.write(json.dumps(message).encode() + b"\n")

    def processEnded(self, reason: Any) -> None:
        for waiting in (self.ready, self.result):
            if not waiting.called:
                text = bytes(self._stderr).decode("utf-8", "replace")
                waiting.errback(RuntimeError(
                    f"a payer process ended early: {reason.value}\n{text}"))


class LoadRunner:
    """Devices enrolled against *target*; :meth:`run_rate` measures one arrival rate.

    *progress(answered, count)* is called as the senders report.
    """

    def __init__(self, reactor, target: Target, settings: LoadSettings = LoadSettings(),
                 progress: Callable[[int, int], None] | None = None):
        assert settings.payers >= settings.workers >= 1 and settings.payees >= 1
        self.reactor = reactor
        self.target = target
        self.settings = settings
        self.progress = progress or (lambda answered, count: None)
        self.devices = SimDevices(reactor, as_addr=target.as_addr, ps_addr=target.ps_addr,
                                  modem_control=target.modem_control,
                                  as_key_path=target.as_key_path, ps_key_path=None)
        self.payers: list[Any] = []
        self.payees: list[Any] = []
        self._redis_pid: int | None = None
        self.holders: dict[str, str | None] = {}   # number -> the PS process holding it
        self.payee_sipp: sipp.SippProcess | None = None  # --generator sipp: the payees' SIPp
        self._sipp_directory: str | None = None

    @defer.inlineCallbacks
    def prepare(self):
        """Enrol, ticket and register every device; fund the payers."""
        numbers = ([f"{PAYER_PREFIX}{index:07d}" for index in range(self.settings.payers)]
                   + [f"{PAYEE_PREFIX}{index:07d}" for index in range(self.settings.payees)])
        limit = defer.DeferredSemaphore(ENROL_CONCURRENCY)
        devices = yield defer.gatherResults(
            [limit.run(self.devices.ready, number) for number in numbers], consumeErrors=True)
        self.payers = devices[:self.settings.payers]
        self.payees = devices[self.settings.payers:]
        funded = yield defer.gatherResults(
            [run_admin(self.target.ledger, "topup", payer.state.number, str(TOP_UP_MINOR))
             for payer in self.payers], consumeErrors=True)
        for code, output in funded:
            if code != 0:
                raise RuntimeError(f"mpay-admin topup failed: {output}")
        if self.target.backends is not None:
            self._redis_pid = yield self.target.backends.redis_pid()
            if self.target.backends.redis is not None:
                self.holders = yield self.target.backends.holders(numbers)
        if self.settings.generator == LEAN:
            for payee in self.payees:
                self.devices.answer_notices(payee)
        elif self.settings.generator == SIPP:
            yield self._start_payee_sipp()

    @defer.inlineCallbacks
    def _start_payee_sipp(self):
        """Every payee registered from one port, and a SIPp answering its notices there."""
        binary = sipp.require()
        port = yield self.devices.register_together(self.payees)
        self._sipp_directory = tempfile.mkdtemp(prefix="mpay-sipp-payees-")
        with open(os.path.join(self._sipp_directory, "uas.xml"), "w") as scenario:
            scenario.write(sipp.uas_scenario())
        command = sipp.uas_command(binary, self._sipp_directory, LOOPBACK, port)
        if self.settings.nice:
            command = ["nice", "-n", str(self.settings.nice), *command]
        self.payee_sipp = sipp.SippProcess()
        self.reactor.spawnProcess(self.payee_sipp, command[0], command, env=dict(os.environ),
                                  path=self._sipp_directory)
        # Its socket is bound before it reads the scenario's first message: wait for it to be
        # listening (or to have failed) before the first notice can come.
        yield sipp.until_bound(self.reactor, LOOPBACK, port, self.payee_sipp)

    def devices_by_process(self) -> tuple[tuple[str, int, int], ...]:
        """(PS name, payers, payees) it holds, from the Redis bindings (empty without Redis)."""
        counts: dict[str, list[int]] = {}
        for group, devices in enumerate((self.payers, self.payees)):
            for device in devices:
                holder = self.holders.get(device.state.number)
                if holder is not None:      # "": a PS without peers, the one process
                    counts.setdefault(holder or SINGLE_NAME, [0, 0])[group] += 1
        return tuple((name, *counts[name]) for name in sorted(counts))

    @defer.inlineCallbacks
    def stop(self):
        if self.payee_sipp is not None:
            yield self.payee_sipp.stop(self.reactor)
            self.payee_sipp = None
        if self._sipp_directory is not None:
            shutil.rmtree(self._sipp_directory, ignore_errors=True)
            self._sipp_directory = None
        yield self.devices.stop()

    def _plan(self, worker: int, share: list[tuple[int, float]], rate_per_min: float) -> dict:
        payers = self.payers[worker::self.settings.workers]
        return {"ps_addr": list(self.target.ps_addr), "domain": self.devices.domain,
                "rate_per_min": rate_per_min / self.settings.workers, "nice": self.settings.nice,
                "run_tag": f"{os.urandom(6).hex()}-{worker}",
                "payers": [asdict(payer.state) for payer in payers],
                "payees": [payee.state.number for payee in self.payees],
                "amount_minor": TRANSFER_AMOUNT_MINOR, "timeout_s": self.settings.timeout_s,
                "schedule": share, "generator": self.settings.generator}

    @defer.inlineCallbacks
    def run_rate(self, rate_per_min: float):
        """Send ``count`` transfers at *rate_per_min*; fires with a :class:`RateReport`."""
        settings = self.settings
        count = settings.count_for(rate_per_min)
        offsets = schedules.arrivals(settings.arrival, rate_per_min, count, settings.seed)
        check_schedule(settings, offsets)
        shares = schedules.split(offsets, settings.workers)
        senders = []

        def reported(sender: _Sender, report: dict) -> None:
            self.progress(sum(each.progress for each in senders), count)

        for worker, share in enumerate(shares):
            sender = _Sender(reported)
            self.reactor.spawnProcess(sender, sys.executable,
                                      [sys.executable, "-m", "mpay.load.worker"],
                                      env=dict(os.environ), path=REPO)
            sender.send(self._plan(worker, share, rate_per_min))
            senders.append(sender)
        readies = yield defer.gatherResults([sender.ready for sender in senders],
                                            consumeErrors=True)
        backend_cpu_before = processes_cpu_s((yield threads.deferToThread(self._backend_pids)))
        start_at = self.reactor.seconds() + START_DELAY_S
        server_cpu_before = self._server_cpu()
        own_cpu_before = cpu_s() + self._payee_sipp_cpu_s()
        for sender in senders:
            sender.send({"start_at": start_at})
        # The payees' own collector pauses (gen2 took 50-90 ms here) would be charged to
        # the server's p99: none while the clock runs; reference counting frees the rest.
        gc.disable()
        try:
            results = yield defer.gatherResults([sender.result for sender in senders],
                                                consumeErrors=True)
        finally:
            gc.enable()
        duration_s = self.reactor.seconds() - start_at
        server_cpu = cpu_used(server_cpu_before, self._server_cpu())
        server_cpu_s = sum(server_cpu.values()) if server_cpu else math.nan
        backend_cpu_after = processes_cpu_s(list(backend_cpu_before))
        backend_cpu_s = sum(backend_cpu_after[pid] - backend_cpu_before[pid]
                            for pid in backend_cpu_after)
        payee_cpu_s = cpu_s() + self._payee_sipp_cpu_s() - own_cpu_before
        generator_cpu_s = payee_cpu_s + sum(result["cpu_s"] for result in results)
        self.progress(count, count)
        outcomes = [Outcome(*entry) for result in results for entry in result["result"]]
        stats = RunStats.from_outcomes(
            rate_per_min, outcomes, settings.timeout_s, offsets, duration_s=duration_s,
            server_cpu_pct=100 * server_cpu_s / duration_s,
            generator_cpu_pct=100 * generator_cpu_s / duration_s, generator=settings.generator)
        journal_ids = [outcome.journal_id for outcome in outcomes if outcome.journal_id is not None]
        missing = yield threads.deferToThread(self.target.ledger.missing_from_journal,
                                              journal_ids)
        code, output = yield run_admin(self.target.ledger, "audit")
        built = sum(ready["ready"] for ready in readies)
        return RateReport(
            stats, code == 0, output.strip(), len(journal_ids), missing,
            sum(result["resent"] for result in results),
            payee_cpu_pct=100 * payee_cpu_s / duration_s,
            busiest_sender_cpu_pct=max(100 * result["cpu_s"] / duration_s for result in results),
            precompute_us=1e6 * sum(ready["precompute_cpu_s"] for ready in readies) / max(built, 1),
            backend_cpu_pct=(100 * backend_cpu_s / duration_s if backend_cpu_before
                             else math.nan),
            server_cpu_by_process=self._by_name(server_cpu, duration_s),
            devices_by_process=self.devices_by_process())

    def _payee_sipp_cpu_s(self) -> float:
        """The payees' SIPp's CPU seconds so far (0 without one)."""
        if self.payee_sipp is None or self.payee_sipp.pid is None:
            return 0.0
        return processes_cpu_s([self.payee_sipp.pid]).get(self.payee_sipp.pid, 0.0)

    def _server_cpu(self) -> dict[int, float]:
        """CPU seconds of each of the server's processes (none when its pid is not known)."""
        return tree_cpu_s(self.target.pid) if self.target.pid is not None else {}

    def _by_name(self, seconds: dict[int, float], duration_s: float) -> tuple:
        names = worker_names(self.target.pid, list(seconds)) if seconds else {}
        return tuple(sorted((names[pid], 100 * used / duration_s)
                            for pid, used in seconds.items()))

    def _backend_pids(self) -> list[int]:
        """The production backends' processes now (a PostgreSQL backend per connection;
        blocking: a query)."""
        if self.target.backends is None:
            return []
        pids = self.target.backends.postgres_pids()
        return pids + ([self._redis_pid] if self._redis_pid is not None else [])

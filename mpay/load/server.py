"""The real server as a child process: ``twistd --nodaemon mpay`` on loopback.

A load run and a crash test both need the server exactly as an operator runs
it -- the twistd plugin with its writer thread, its ledger (a SQLite file,
or PostgreSQL when the settings say so) and its simulated modem -- in a
process of its own: ``kill -9`` must hit only the
server, and the server's CPU must be measurable apart from the load
generator's (``/proc/<pid>/stat``; with ``--workers`` summed over worker 1
and its children).  Every file lives in one directory.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sqlite3
import sys
import time
from typing import Any, Callable

from twisted.internet import defer, protocol, task, utils
from twisted.internet.error import ProcessExitedAlready
from twisted.logger import Logger

from mpay.load.books import LedgerRef
from mpay.ledger.writer_process import CHILD_MODULE as WRITER_MODULE
from mpay.payment.signatures import CHILD_MODULE
from mpay.sip.message import Response, parse
from mpay.sip.useragent import build_request, new_call_id

# The checkout: twistd finds tap.py and twisted/plugins/mpay_plugin.py from here.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")
MPAY_ADMIN = os.path.join(BIN, "mpay-admin")
LOOPBACK = "127.0.0.1"

READY_TIMEOUT_S = 30.0
"""Bound on a server start (imports, keys, ledger migration) before giving up."""

READY_POLL_S = 0.05
"""Pause between two looks for the workers' relay ports while the server starts."""

PROBE_INTERVAL_S = 0.1
"""How often the readiness probe re-sends its OPTIONS while the server is not up."""

STOP_TIMEOUT_S = 10.0
"""How long a SIGTERM'd server may take to shut down before it gets SIGKILL."""

OUTPUT_KEPT_BYTES = 64 * 1024
"""The tail of the server's stdout/stderr kept for failure messages."""

PROC = "/proc"

SINGLE_NAME = "ps"
WORKER_ONE_NAME = "ps1"
"""The server's PS name alone, and worker 1's under ``--workers`` (default ``[ps] instance_id``)."""

INSTANCE_SETTING = "ps.instance_id="
"""How a child worker's command line names it (``mpay.ops.workers.child_command``)."""

log = Logger()


def free_udp_ports(count: int) -> list[int]:
    """*count* distinct UDP ports free on loopback now; a server may be restarted on them."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _stat_fields(pid: int, proc: str) -> list[bytes]:
    """The fields of ``/proc/<pid>/stat`` after the command name (which may hold spaces)."""
    with open(f"{proc}/{pid}/stat", "rb") as stat:
        return stat.read().rsplit(b")", 1)[1].split()


def process_cpu_s(pid: int, proc: str = PROC) -> float:
    """User + system CPU seconds of process *pid*, all its threads (``/proc/<pid>/stat``)."""
    fields = _stat_fields(pid, proc)
    # After the ")" closing the command name, utime and stime are fields 12 and 13.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int, proc: str = PROC) -> list[int]:
    """*pid* and its descendants now, from every process's parent in ``/proc/*/stat``.

    A ``--workers N`` server is worker 1 and its N - 1 children (started by its
    ProcessMonitor), so its CPU is the sum over this tree, not worker 1's alone.
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir(proc):
        if entry.isdigit():
            try:
                parent = int(_stat_fields(int(entry), proc)[1])
            except (OSError, IndexError, ValueError):
                continue        # ended while we looked
            children.setdefault(parent, []).append(int(entry))
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending += children.get(current, [])
    return sorted(tree)


def processes_cpu_s(pids: list[int], proc: str = PROC) -> dict[int, float]:
    """CPU seconds so far of each of *pids* still running (one that has ended is left out)."""
    seconds = {}
    for pid in pids:
        try:
            seconds[pid] = process_cpu_s(pid, proc)
        except (OSError, IndexError, ValueError):
            pass
    return seconds


def tree_cpu_s(pid: int, proc: str = PROC) -> dict[int, float]:
    """CPU seconds so far of each process in *pid*'s tree."""
    return processes_cpu_s(process_tree(pid, proc), proc)


def cpu_used(before: dict[int, float], after: dict[int, float]) -> dict[int, float]:
    """Per process, the CPU seconds between two :func:`tree_cpu_s` readings.

    A process that started in between (a worker restarted) counts whole; one
    that ended is missing from *after* and its last seconds are lost.
    """
    return {pid: after[pid] - before.get(pid, 0.0) for pid in after}


def worker_names(root: int, pids: list[int], proc: str = PROC) -> dict[int, str]:
    """Each of *pids* by its PS name: a child's ``ps.instance_id`` from its command line;
    *root*, whose name is not on its command line, ``ps1`` beside such children, else ``ps``."""
    names = {}
    workers = False
    for pid in pids:
        try:
            with open(f"{proc}/{pid}/cmdline", "rb") as cmdline:
                args = cmdline.read().decode("utf-8", "replace").split("\0")
        except OSError:
            args = []
        named = [arg[len(INSTANCE_SETTING):] for arg in args if arg.startswith(INSTANCE_SETTING)]
        if named:
            names[pid] = named[-1]
            workers = workers or pid != root
        elif CHILD_MODULE in args:      # a PS's child that checks payer signatures
            names[pid] = f"signatures{pid}"
        elif WRITER_MODULE in args:     # the ledger's group-commit writer
            names[pid] = f"writer{pid}"
        else:
            names[pid] = f"pid{pid}"
    if root in names:
        names[root] = WORKER_ONE_NAME if workers else SINGLE_NAME
    return names


class _ServerOutput(protocol.ProcessProtocol):
    """Keeps the tail of what the child wrote; ``ended`` fires once it is reaped."""

    def __init__(self):
        self.output = bytearray()
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self._keep(data)

    errReceived = outReceived

    def _keep(self, data: bytes) -> None:
        self.output += data
        del self.output[:-OUTPUT_KEPT_BYTES]

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value)


def udp_port_taken(port: int) -> bool:
    """True once some process has bound *port* on loopback (we cannot, without SO_REUSEPORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((LOOPBACK, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


class ServerProcess:
    """``twistd --nodaemon mpay`` with every file in *directory*, on fixed loopback ports.

    *settings* are more ``--set SECTION.KEY=VALUE`` for the configuration;
    *workers* > 1 runs that many PS processes (``--workers``), relaying from
    *relay_port* up.
    """

    def __init__(self, reactor, directory: str, as_port: int, ps_port: int, logfile: str,
                 settings: tuple[str, ...] = (), workers: int = 1, relay_port: int | None = None):
        assert workers == 1 or relay_port, "--workers needs the first worker's relay port"
        self.workers = workers
        self.relay_ports = [relay_port + k for k in range(workers)] if workers > 1 else []
        self.reactor = reactor
        self.directory = directory
        self.as_addr = (LOOPBACK, as_port)
        self.ps_addr = (LOOPBACK, ps_port)
        self.logfile = logfile
        self.settings = tuple(settings)
        self._process: Any = None
        self._output: _ServerOutput | None = None

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    @property
    def modem_control(self) -> str:
        return self.path("modem.sock")

    @property
    def ledger_path(self) -> str:
        return self.path("ledger.sqlite3")

    @property
    def ledger(self) -> LedgerRef:
        """The server's ledger: its SQLite file, or what ``--set ledger.*`` chose instead."""
        section = {"backend": "sqlite", "sqlite_path": self.ledger_path}
        for setting in self.settings:
            key, _, value = setting.partition("=")
            if key.startswith("ledger."):
                section[key[len("ledger."):]] = value
        return LedgerRef(section)

    def argv(self) -> list[str]:
        argv = [TWISTD, "--nodaemon", "--pidfile=", f"--logfile={self.logfile}", "mpay",
                "--as-listen", f"udp:{self.as_addr[1]}:interface={LOOPBACK}",
                "--ps-listen", f"udp:{self.ps_addr[1]}:interface={LOOPBACK}",
                "--metrics-listen", ""]
        for setting in (f"as.signing_key={self.path('as.pem')}",
                        f"as.master_keys={self.path('master.keys')}",
                        f"tickets.k_ps_keys={self.path('k_ps.keys')}",
                        f"callerid.sim_control={self.modem_control}",
                        f"ps.signing_key={self.path('ps.pem')}",
                        f"ledger.sqlite_path={self.ledger_path}", *self.settings):
            argv += ["--set", setting]
        if self.workers > 1:
            argv += ["--workers", str(self.workers), "--set",
                     f"ps.relay_listen=udp:{self.relay_ports[0]}:interface={LOOPBACK}"]
        return argv

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Rows of *sql* on the ledger file, read-only (also while the server runs or is dead)."""
        connection = sqlite3.connect(f"file:{self.ledger_path}?mode=ro", uri=True)
        try:
            return connection.execute(sql, params).fetchall()
        finally:
            connection.close()

    @property
    def running(self) -> bool:
        return self._output is not None and not self._output.ended.called

    @property
    def pid(self) -> int:
        assert self.running, "the server is not running"
        return self._process.pid

    def cpu_s(self) -> float:
        """CPU seconds the server process has used so far (every thread)."""
        return process_cpu_s(self.pid)

    @property
    def output(self) -> str:
        """What the child wrote outside its log file (start-up errors, tracebacks)."""
        return bytes(self._output.output).decode("utf-8", "replace") if self._output else ""

    def start(self) -> None:
        assert not self.running, "one server process at a time"
        self._output = _ServerOutput()
        self._process = self.reactor.spawnProcess(
            self._output, TWISTD, self.argv(), env=dict(os.environ), path=REPO)

    @defer.inlineCallbacks
    def wait_ready(self):
        """Until both listeners answer OPTIONS; fails if the child dies or the time is up."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        try:
            for addr in (self.as_addr, self.ps_addr):
                yield probe_options(self.reactor, addr, deadline, lambda: not self.running)
            while not all(map(udp_port_taken, self.relay_ports)):   # --workers: all are up
                if not self.running or time.monotonic() > deadline:
                    raise RuntimeError("not every worker's relay port was bound")
                yield task.deferLater(self.reactor, READY_POLL_S, lambda: None)
        except RuntimeError as exc:
            state = "running" if self.running else "exited"
            raise RuntimeError(f"{exc}; the server has {state}, its log is {self.logfile};"
                               f" it wrote:\n{self.output}") from None

    def kill(self) -> defer.Deferred:
        """``kill -9`` now; fires once the process is reaped (its modem lock is then stale)."""
        os.kill(self.pid, signal.SIGKILL)
        return self._output.ended

    @defer.inlineCallbacks
    def stop(self):
        """SIGTERM (a clean shutdown), SIGKILL after STOP_TIMEOUT_S; for cleanups, idempotent."""
        if not self.running:
            return None
        ended = self._output.ended
        try:
            self._process.signalProcess("TERM")
        except ProcessExitedAlready:
            pass
        timer = self.reactor.callLater(STOP_TIMEOUT_S, self._force)
        reason = yield ended
        if timer.active():
            timer.cancel()
        return reason

    def _force(self) -> None:
        log.warn("mpay server ignored SIGTERM for {s} s: SIGKILL", s=STOP_TIMEOUT_S)
        try:
            self._process.signalProcess("KILL")
        except ProcessExitedAlready:
            pass


@defer.inlineCallbacks
def run_admin(ledger: LedgerRef | str, *args: str):
    """``mpay-admin ARGS`` on *ledger* (a SQLite file's path, or any ledger):
    (exit status, its output)."""
    where = (LedgerRef.sqlite(ledger) if isinstance(ledger, str) else ledger).admin_args()
    out, err, code = yield utils.getProcessOutputAndValue(
        MPAY_ADMIN, [*where, *args], env=dict(os.environ), path=REPO)
    return code, (out + err).decode("utf-8", "replace")


class _Prober(protocol.DatagramProtocol):
    def __init__(self, answered: defer.Deferred):
        self.answered = answered

    def datagramReceived(self, data: bytes, addr) -> None:
        try:
            message = parse(data)
        except Exception:
            return
        if isinstance(message, Response) and message.status == 200 and not self.answered.called:
            self.answered.callback(None)


@defer.inlineCallbacks
def probe_options(reactor, addr: tuple[str, int], deadline: float,
                  gave_up: Callable[[], bool] = lambda: False):
    """Send OPTIONS to *addr* every PROBE_INTERVAL_S until a 200 comes back.

    A plain socket rather than a client transaction: a transaction would back
    off to T2 (4 s) between retransmissions and time out after 64 x T1.
    """
    answered: defer.Deferred = defer.Deferred()
    port = reactor.listenUDP(0, _Prober(answered), interface=LOOPBACK)
    host = port.getHost()
    data = build_request("OPTIONS", f"sip:{addr[0]}:{addr[1]}", sent_by=(host.host, host.port),
                         from_uri="sip:probe@mpay.test", to_uri="sip:probe@mpay.test",
                         call_id=new_call_id(host.host), cseq=1).to_bytes()

    def send() -> None:
        if answered.called:
            return
        if gave_up() or time.monotonic() > deadline:
            answered.errback(RuntimeError(f"no answer to OPTIONS from {addr[0]}:{addr[1]}"))
            return
        try:
            port.write(data, addr)
        except OSError:
            pass    # the server's port is not bound yet

    loop = task.LoopingCall(send)
    loop.clock = reactor
    loop.start(PROBE_INTERVAL_S)
    try:
        yield answered
    finally:
        loop.stop()
        yield port.stopListening()

"""The crash test's machinery: the real server as a child process, Sim-DMDs in this one.

The server must be a separate process so that ``kill -9`` hits exactly what an
operator's ``kill -9`` would: the twistd plugin with its writer thread, its
SQLite connection and its simulated modem, nothing of the test's reactor.  The
devices stay in the test process (they outlive the server) and drive their
own time wheel, since the server's wheel dies with it.  The machinery itself
is library code (``mpay.load``), shared with ``mpay-load``; this module ties
it to a test's cleanups.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.internet import defer, task

from mpay.load.devices import SimDevices
from mpay.load.server import (  # noqa: F401  (free_udp_ports, run_admin: for the crash tests)
    ServerProcess, free_udp_ports, run_admin,
)


class ServerRuns:
    """One test's server processes, one after another, on the same ports and files.

    Each is stopped in the test's cleanup, even if the test fails; their logs go
    to the test's ``_trial_temp`` directory, which outlives it, for a post-mortem.
    """

    def __init__(self, testcase, reactor, settings: tuple[str, ...] = ()):
        self.testcase = testcase
        self.reactor = reactor
        self.settings = tuple(settings)
        # Short and private: the modem's UNIX socket path must stay under 108 bytes.
        self.directory = tempfile.mkdtemp(prefix="mpay-")
        testcase.addCleanup(shutil.rmtree, self.directory, True)
        self.ports = free_udp_ports(2)
        self.logs = os.path.abspath(testcase.mktemp())
        os.makedirs(self.logs)
        self.processes: list[ServerProcess] = []

    @property
    def current(self) -> ServerProcess:
        return self.processes[-1]

    @defer.inlineCallbacks
    def start(self):
        """A new process on the same ports and files; fires with it once it answers."""
        logfile = os.path.join(self.logs, f"server-{len(self.processes) + 1}.log")
        server = ServerProcess(self.reactor, self.directory, *self.ports, logfile=logfile,
                               settings=self.settings)
        self.processes.append(server)
        server.start()
        self.testcase.addCleanup(server.stop)
        yield server.wait_ready()
        return server

    def admin(self, *args: str) -> defer.Deferred:
        """``mpay-admin --db sqlite:LEDGER ARGS``: (exit status, its output)."""
        return run_admin(self.current.ledger_path, *args)


@defer.inlineCallbacks
def eventually(reactor, predicate, tries: int, every_s: float, what: str):
    """Until *predicate()* is true, looking *tries* times *every_s* apart; else AssertionError."""
    for _ in range(tries):
        if predicate():
            return
        yield task.deferLater(reactor, every_s, lambda: None)
    if not predicate():
        raise AssertionError(f"{what}: not after {tries} x {every_s} s")


def devices_for(testcase, reactor, server: ServerProcess) -> SimDevices:
    """Sim-DMDs for one server process, closed in the test's cleanup."""
    devices = SimDevices.for_server(reactor, server)
    testcase.addCleanup(devices.stop)
    return devices

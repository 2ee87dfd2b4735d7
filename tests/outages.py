"""Outages of the production backends, for the fault tests and ``bench/faults.py``.

A redis-server of one's own (a free loopback port, nothing on disk) that can
be killed and started again empty, as a Redis restart without persistence
leaves it; and devices registering again once it is back, as a wallet does
when its registration is refused.  (PostgreSQL's side, ending a server's
backends, is :meth:`mpay.load.backends.Backends.terminate_postgres_backends`.)
"""

from __future__ import annotations

import os
import shutil
import socket

from twisted.internet import defer, task

from mpay.sim.device import DeviceError
from mpay.sip.endpoint import SIPTimeout
from tests.support import ProcessOutput

REDIS_SERVER = shutil.which("redis-server")
READY_TIMEOUT_S = 5.0
READY_POLL_S = 0.05
REGISTER_TRIES = 40
REGISTER_PAUSE_S = 0.5


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisProcess:
    """``redis-server`` on 127.0.0.1:*port* (a free one by default); :meth:`stop` is kill -9."""

    def __init__(self, reactor, port: int | None = None):
        self.reactor = reactor
        self.port = port or free_port()
        self._process: ProcessOutput | None = None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def running(self) -> bool:
        return self._process is not None and not self._process.ended.called

    @defer.inlineCallbacks
    def start(self):
        """Start it (empty) and wait until it accepts connections."""
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server)")
        assert not self.running
        process = self._process = ProcessOutput()
        self.reactor.spawnProcess(process, REDIS_SERVER,
                                  [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no"], env=dict(os.environ))
        for _ in range(round(READY_TIMEOUT_S / READY_POLL_S)):
            if b"Ready to accept connections" in process.output:
                return
            if process.ended.called:
                break
            yield task.deferLater(self.reactor, READY_POLL_S, lambda: None)
        raise RuntimeError(f"redis-server did not start: {process.output[-500:]!r}")

    def stop(self) -> defer.Deferred:
        """Kill it (what it held is gone); fires once it is reaped.  Idempotent."""
        if not self.running:
            return defer.succeed(None)
        self._process.transport.signalProcess("KILL")
        return self._process.ended


@defer.inlineCallbacks
def register_again(reactor, device, tries: int = REGISTER_TRIES):
    """REGISTER until the PS accepts it (it answers 503 until its Redis pool is back): True
    once registered, False if it never was."""
    for _ in range(tries):
        try:
            yield device.register()
            return True
        except (SIPTimeout, DeviceError):
            yield task.deferLater(reactor, REGISTER_PAUSE_S, lambda: None)
    return False

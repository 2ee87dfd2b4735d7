"""Overload control: past its capacity a server refuses new work at once instead of collapsing.

Without it, a server pushed past capacity answers later and later; once an
answer takes longer than T1 (500 ms) every client retransmits, the
retransmissions are more load, and success falls from all to almost none
within a few percent of the rate (``mpay-load`` showed exactly that).  RFC
3261 21.5.4's answer is 503 with Retry-After: refusing costs a parse and a
datagram, a fiftieth of a payment, so the work already admitted stays fast.

Two signals, each smoothed (EWMA) and each with hysteresis (no flapping):

- the reactor's own lag: a timer asked to run every ``LAG_PROBE_S`` runs
  late by however long the reactor was busy (above ``shed_above_s``,
  until under ``resume_below_s``);
- the UDP receive queue: what waits in the listeners' socket buffers
  (``SO_MEMINFO``, Linux), where a backlog really builds up: the reactor
  reads a bounded amount per turn and stays punctual while the datagrams
  behind wait.  Above ``SHED_QUEUE_BYTES`` (about 200 datagrams, some 0.1 s
  of work), until under ``RESUME_QUEUE_BYTES``.

While either says so, new requests of the methods that start work are
refused.  Retransmissions of admitted requests, ACK, BYE
and CANCEL are never refused: they finish work rather than start it.
:class:`OverloadGuard` is sans-IO; :class:`LagMonitorService` feeds it.
"""

from __future__ import annotations

import socket
import struct
from typing import Any, Callable

from twisted.application import service

SHEDDABLE_METHODS = frozenset({"MESSAGE", "RECEIVE", "REGISTER", "SUBSCRIBE"})
"""Requests that start work; everything else is always let through (NOTIFY too: it
finishes an enrolment the AS already holds, as BYE finishes a session)."""

SHED_ABOVE_LAG_S = 0.25
"""Smoothed reactor lag above which new work is refused (half of T1)."""

RESUME_BELOW_LAG_S = 0.1
"""Smoothed lag below which new work is admitted again."""

LAG_PROBE_S = 0.05
"""How often the reactor's lag is measured."""

LAG_SMOOTHING = 0.3
"""Weight of the newest lag sample in the moving average."""

SHED_RETRY_AFTER_S = 1
"""Retry-After of the 503 for work refused under overload, seconds."""

SHED_QUEUE_BYTES = 768 * 1024
"""Smoothed bytes waiting in the UDP receive buffers above which new work is refused."""

RESUME_QUEUE_BYTES = 256 * 1024
"""... and below which it is admitted again."""

SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)
_SK_MEMINFO_FIELDS = 9   # u32 each; the first is the receive queue's allocation


def receive_queue_bytes(sock: socket.socket) -> int | None:
    """Bytes queued in *sock*'s receive buffer (Linux SO_MEMINFO), or None where unknown."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * _SK_MEMINFO_FIELDS)
    except OSError:
        return None
    return struct.unpack(f"{_SK_MEMINFO_FIELDS}I", raw)[0]


class OverloadGuard:
    def __init__(self, shed_above_s: float = SHED_ABOVE_LAG_S,
                 resume_below_s: float = RESUME_BELOW_LAG_S, smoothing: float = LAG_SMOOTHING):
        if not 0 < resume_below_s < shed_above_s or not 0 < smoothing <= 1:
            raise ValueError("need 0 < resume_below_s < shed_above_s and 0 < smoothing <= 1")
        self.shed_above_s = shed_above_s
        self.resume_below_s = resume_below_s
        self.smoothing = smoothing
        self.lag_s = 0.0
        self.queue_bytes = 0.0
        self._lagging = self._queueing = False
        self.shedding = False
        self.episodes = 0     # times shedding began
        self.shed = 0         # requests refused

    def sample(self, lag_s: float) -> None:
        self.lag_s += self.smoothing * (max(0.0, lag_s) - self.lag_s)
        if self.lag_s > self.shed_above_s:
            self._lagging = True
        elif self.lag_s < self.resume_below_s:
            self._lagging = False
        self._decide()

    def sample_queue(self, queued_bytes: int) -> None:
        self.queue_bytes += self.smoothing * (max(0, queued_bytes) - self.queue_bytes)
        if self.queue_bytes > SHED_QUEUE_BYTES:
            self._queueing = True
        elif self.queue_bytes < RESUME_QUEUE_BYTES:
            self._queueing = False
        self._decide()

    def _decide(self) -> None:
        shedding = self._lagging or self._queueing
        if shedding and not self.shedding:
            self.episodes += 1
        self.shedding = shedding

    def refuses(self, method: str) -> bool:
        """Whether a new request of *method* is to be refused now (and counts it)."""
        if self.shedding and method in SHEDDABLE_METHODS:
            self.shed += 1
            return True
        return False


class LagMonitorService(service.Service):
    """Measures how late the reactor runs a timer every LAG_PROBE_S; feeds the guard."""

    def __init__(self, guard: OverloadGuard, reactor: Any = None, probe_s: float = LAG_PROBE_S,
                 sockets: Callable[[], list] = lambda: []):
        self.guard = guard
        self.probe_s = probe_s
        self.sockets = sockets   # the UDP listeners' sockets, looked at on every probe
        self._reactor = reactor
        self._call: Any = None

    def startService(self) -> None:
        super().startService()
        if self._reactor is None:
            from twisted.internet import reactor
            self._reactor = reactor
        self._arm()

    def _arm(self) -> None:
        self._due = self._reactor.seconds() + self.probe_s
        self._call = self._reactor.callLater(self.probe_s, self._probe)

    def _probe(self) -> None:
        self.guard.sample(self._reactor.seconds() - self._due)
        queued = [receive_queue_bytes(sock) for sock in self.sockets()]
        known = [size for size in queued if size is not None]
        if known:
            self.guard.sample_queue(sum(known))
        self._arm()

    def stopService(self):
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

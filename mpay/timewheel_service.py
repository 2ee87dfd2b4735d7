"""The time wheel's reactor driver: ticks a ``TimeWheel`` and runs what expires.

The wheel (``timewheel.py``) is sans-IO and compiled; this is its one piece
built on Twisted (a ``Service``, a ``LoopingCall``), which mypyc cannot
compile.
"""

from __future__ import annotations

from math import floor
from typing import Any, Callable

from twisted.application import service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mpay.timewheel import MAX_CATCHUP_TICKS, MAX_DRAIN_BATCH, TICK_EPSILON, TimerHandle, TimeWheel

log = Logger()


class TimeWheelService(service.Service):
    """Ticks a wheel from the reactor and runs what expires, in bounded batches.

    Missed ticks (a stall, a busy reactor) are counted from ``reactor.seconds()``
    and replayed, so a timer is late rather than lost.  Long catch-ups and big
    expiry batches continue on a later reactor turn (``callLater(0)``) instead
    of holding the reactor.
    """

    name = "timewheel"

    def __init__(self, wheel: TimeWheel, reactor: IReactorTime | None = None, max_batch: int = MAX_DRAIN_BATCH):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch!r}")
        self.wheel = wheel
        self.max_batch = max_batch
        self.stalls = 0  # turns that found more than one tick due
        self._reactor = reactor
        self._loop: LoopingCall | None = None
        self._again: IDelayedCall | None = None  # the pending callLater(0) continuation
        self._epoch = 0.0  # reactor time of wheel tick 0, seconds

    def startService(self) -> None:
        super().startService()
        self._epoch = self._reactor.seconds() - self.wheel.now_tick * self.wheel.tick_s
        self._loop = LoopingCall(self._run)
        self._loop.clock = self._reactor
        self._loop.start(self.wheel.tick_s, now=False).addErrback(
            lambda failure: log.failure("time wheel driver stopped", failure)
        )

    def stopService(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._again is not None and self._again.active():
            self._again.cancel()
        self._again = None
        super().stopService()

    def start(self, delay_s: float, callback: Callable[..., Any], *args: Any) -> TimerHandle:
        """``wheel.start`` measured from reactor time rather than the last tick.

        The wheel counts a delay from its last tick, which may be up to a tick
        (or a stall) behind the reactor; adding that lag keeps a timer from
        firing before ``delay_s`` seconds of reactor time.
        """
        if self.running:
            lag = self._reactor.seconds() - self._epoch - self.wheel.now_tick * self.wheel.tick_s
            delay_s += max(0.0, lag)
        return self.wheel.start(delay_s, callback, *args)

    def _due_tick(self) -> int:
        return floor((self._reactor.seconds() - self._epoch) / self.wheel.tick_s + TICK_EPSILON)

    def _continue(self) -> None:
        self._again = None
        self._run()

    def _run(self) -> None:
        wheel = self.wheel
        behind = self._due_tick() - wheel.now_tick
        if behind > 1:
            self.stalls += 1
        for _ in range(min(behind, MAX_CATCHUP_TICKS)):
            wheel.tick()
        wheel.drain(self.max_batch)
        more = behind > MAX_CATCHUP_TICKS or wheel.pending
        if more and self._again is None and self.running:
            self._again = self._reactor.callLater(0, self._continue)

"""Completed transactions, kept as plain data until their Timer J or K runs out.

A non-INVITE transaction lives on after its final response only to absorb
copies: the server answers a retransmitted request from the response's bytes
for 64 x T1 (Timer J), the client swallows a retransmitted response for T4
(Timer K).  At 3,000 transfers a second that is ~100,000 completed
transactions at any time.  As objects, each with a timer handle and a bound
method, they were six objects a transfer that the cyclic collector walked
for 5-32 s: a young collection every half second (2-8 ms) and a middle one
every ten (62 ms), the p99 of a loaded PS.  Here a completed transaction is
a dict entry of a string key and the response's bytes, which the collector
never tracks, and its expiry a slot in a list; one timer sweeps them all.
"""

from __future__ import annotations

from collections import deque
from math import ceil
from typing import Any, Callable, Hashable

from twisted.logger import Logger

log = Logger()

LINGER_SWEEP_S = 0.1
"""How often expiry runs, seconds.  An entry is kept from ``delay_s`` to one
sweep past ``delay_s`` rounded up to whole sweeps (Timer J: 32-32.1 s)."""

_ROUNDING = 1e-9


class Linger:
    """Keys (with a value each) kept at least ``delay_s``, expired one sweep at a time.

    Sweeps are counted, not timed: a stalled reactor makes entries live
    longer, never shorter.  The sweep timer runs only while something is
    kept, so an idle endpoint has no timer of ours.
    """

    __slots__ = ("_timers", "_sweep_s", "_rounds", "_values", "_buckets", "_timer",
                 "_on_expire")

    def __init__(self, timers: Any, delay_s: float,
                 on_expire: Callable[[Any, Any], None] | None = None,
                 sweep_s: float = LINGER_SWEEP_S):
        assert delay_s > 0 and sweep_s > 0
        self._timers = timers
        self._sweep_s = sweep_s
        # An entry filed in the newest bucket has lived at least this many sweeps
        # when its bucket is the oldest of rounds + 1.
        self._rounds = ceil(delay_s / sweep_s - _ROUNDING)
        self._values: dict[Hashable, Any] = {}
        self._buckets: deque[list[Hashable]] = deque()   # one per sweep, newest last
        self._timer: Any = None
        self._on_expire = on_expire

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._values

    def get(self, key: Hashable, default: Any = None) -> Any:
        return self._values.get(key, default)

    def add(self, key: Hashable, value: Any) -> None:
        """Keep *key* (new: a transaction completes once) with *value*."""
        assert key not in self._values, "a transaction completes once"
        self._values[key] = value
        if self._timer is None:
            self._buckets.append([])
            self._timer = self._timers.start(self._sweep_s, self._sweep)
        self._buckets[-1].append(key)

    def _sweep(self) -> None:
        buckets, values = self._buckets, self._values
        expired = buckets.popleft() if len(buckets) > self._rounds else ()
        popped = [(key, values.pop(key)) for key in expired]
        # The next sweep is armed before any callback runs: a failing one must not
        # stop expiry (the store would then grow until the endpoint answers 503).
        if values:
            buckets.append([])
            self._timer = self._timers.start(self._sweep_s, self._sweep)
        else:
            buckets.clear()
            self._timer = None
        on_expire = self._on_expire
        if on_expire is not None:
            for key, value in popped:
                try:
                    on_expire(key, value)
                except Exception:
                    log.failure("linger: expiring {key!r}", key=key)

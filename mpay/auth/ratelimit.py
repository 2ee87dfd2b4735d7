"""Per-source rate limits for the AS: a flood of REGISTERs cannot crowd out real devices.

Everything the AS does happens before a device holds a ticket, so anyone can
send it work: an enrolment claim takes a slot of the half-open table, a REFER
and a caller-ID line; a ticket request takes an AEAD open.  Each source
address gets a token bucket (``rate_per_s`` sustained, ``burst`` at once);
past it a request is answered 503 with Retry-After, which a real device
honours and a flood only wastes.  The table of sources is bounded
(``MAX_TRACKED_SOURCES``, least recently seen first out), so a flood from many
addresses costs bounded memory too.  Retransmissions never get here: the
transaction layer absorbs them.  Sans-IO: the clock is handed in.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Iterable

MAX_TRACKED_SOURCES = 100_000
"""Source addresses remembered at once (about 100 bytes each)."""


class SourceRateLimiter:
    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float],
                 exempt: Iterable[str] = (), max_sources: int = MAX_TRACKED_SOURCES):
        if not rate_per_s > 0 or burst < 1 or max_sources < 1:
            raise ValueError("rate, burst and table size must be positive")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.clock = clock
        self.exempt = frozenset(exempt)
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()   # host -> [tokens, when]
        self.refused = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, host: str) -> bool:
        """Spend one token of *host*'s bucket; False when it has none."""
        if host in self.exempt:
            return True
        now = self.clock()
        bucket = self._buckets.get(host)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self._buckets.popitem(last=False)
            bucket = self._buckets[host] = [float(self.burst), now]
        else:
            self._buckets.move_to_end(host)
            bucket[0] = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate_per_s)
            bucket[1] = now
        assert 0.0 <= bucket[0] <= self.burst, bucket
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return True
        self.refused += 1
        return False

    def retry_after_s(self, host: str) -> int:
        """Whole seconds until *host* has a token again (at least 1)."""
        bucket = self._buckets.get(host)
        missing = 1.0 - (bucket[0] if bucket else 1.0)
        return max(1, math.ceil(missing / self.rate_per_s))

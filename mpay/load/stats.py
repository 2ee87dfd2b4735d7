"""What one rate's run measured, from the outcome of each request, sans-IO.

A request succeeds when its payer has the final 200 (the payee confirmed)
within the response timeout.  The percentiles are over *every* request
sent, a failed one counting as infinitely slow: a p99 that hides the
failures would flatter the server.  The mean is over the successes, as the
thesis's "average processing time" was.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, NamedTuple

SUCCESS_STATUS = 200
BAR_P99_MS = 50.0
"""Issue 7's bound on processing time, for a whole run and (``slow_seconds``) each second."""


class Outcome(NamedTuple):
    """One request: its final status (None: none came), the time to it, and its send lag."""

    index: int
    status: int | None
    latency_s: float | None
    lag_s: float                 # how late it left against its schedule (the generator's delay)
    journal_id: int | None = None


class Second(NamedTuple):
    """The requests due in one second of the schedule: how many, how many failed, their p99.

    A run's p99 says how slow, not when: these say whether a bad p99 was the
    whole run behind or a few seconds of a stall that the rest caught up with.
    """

    start_s: int
    sent: int
    failed: int
    p99_ms: float


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of sorted *values* (``inf`` entries allowed)."""
    if not values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(values)))
    return values[rank - 1]


@dataclass(frozen=True)
class RunStats:
    """One rate: success probability, processing time, the statuses, and the CPUs."""

    rate_per_min: float
    sent: int
    succeeded: int
    mean_ms: float
    p50_ms: float
    p99_ms: float
    lag_p99_ms: float
    late: int = 0                          # 200s that came after the timeout (failures)
    statuses: dict[str, int] = field(default_factory=dict)
    server_cpu_pct: float = math.nan       # of one core; 200 is both cores of this machine
    generator_cpu_pct: float = math.nan
    duration_s: float = math.nan
    generator: str = ""                    # the load generator that measured it (stack, lean)
    seconds: tuple[Second, ...] = ()       # by the schedule's seconds (when offsets were given)

    @property
    def worst_second_p99_ms(self) -> float:
        return max((second.p99_ms for second in self.seconds), default=math.nan)

    @property
    def slow_seconds(self) -> int:
        """Seconds of the schedule whose requests had a p99 over ``BAR_P99_MS``."""
        return sum(second.p99_ms > BAR_P99_MS for second in self.seconds)

    @property
    def success(self) -> float:
        return self.succeeded / self.sent if self.sent else 0.0

    @classmethod
    def from_outcomes(cls, rate_per_min: float, outcomes: Iterable[Outcome], timeout_s: float,
                      offsets: list[float] | None = None, **measured: Any) -> "RunStats":
        """Statistics of *outcomes*; *offsets* is the schedule (each request's send time,
        by index) for the seconds; *measured* are the CPU figures, the run's duration
        and the generator's name."""
        outcomes = list(outcomes)
        latencies, succeeded, statuses, late = [], [], Counter(), 0
        for outcome in outcomes:
            statuses["none" if outcome.status is None else str(outcome.status)] += 1
            latency = _latency(outcome, timeout_s)
            latencies.append(latency)
            if latency != math.inf:
                succeeded.append(latency)
            elif outcome.status == SUCCESS_STATUS:
                late += 1
        if offsets is not None:
            measured["seconds"] = by_second(
                [offsets[outcome.index] for outcome in outcomes], latencies)
        latencies.sort()
        lags = sorted(outcome.lag_s for outcome in outcomes)
        return cls(rate_per_min=rate_per_min, sent=len(outcomes), succeeded=len(succeeded),
                   mean_ms=1000 * sum(succeeded) / len(succeeded) if succeeded else math.nan,
                   p50_ms=1000 * percentile(latencies, 0.50),
                   p99_ms=1000 * percentile(latencies, 0.99),
                   lag_p99_ms=1000 * percentile(lags, 0.99), late=late,
                   statuses=dict(sorted(statuses.items())), **measured)

    def status_text(self) -> str:
        """``200:998 202:2`` -- every final status and how often (``none``: no answer)."""
        return " ".join(f"{status}:{count}" for status, count in self.statuses.items())


def _latency(outcome: Outcome, timeout_s: float) -> float:
    """Seconds to the final 200, or ``inf`` for a failure (none, another status, too late)."""
    if (outcome.status == SUCCESS_STATUS and outcome.latency_s is not None
            and outcome.latency_s <= timeout_s):
        return outcome.latency_s
    return math.inf


def by_second(due_s: list[float], latencies: list[float]) -> tuple[Second, ...]:
    """Each request's latency (``inf``: failed) grouped by the whole second of the schedule
    it was due to leave in (*due_s*, in the same order)."""
    groups: dict[int, list[float]] = {}
    for due, latency in zip(due_s, latencies):
        groups.setdefault(int(due), []).append(latency)
    seconds = []
    for start_s in sorted(groups):
        latencies = sorted(groups[start_s])
        seconds.append(Second(start_s, len(latencies), sum(map(math.isinf, latencies)),
                              1000 * percentile(latencies, 0.99)))
    return tuple(seconds)

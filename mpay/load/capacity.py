"""Finding the capacity: the highest arrival rate whose success meets a threshold, sans-IO.

The search is told each run's success and proposes the next rate: it grows
the rate geometrically (``growth``) until a run fails the threshold, falls
the same way until one passes, then bisects (geometric mean) between the
highest passing rate and the lowest failing rate above it until they are
within ``resolution`` of each other.  Thresholds are searched strictest
first (99.9 %, then the thesis's 90 %); every run counts for each, so the
laxer bracket usually starts half-known.  A run's success is noisy: the
capacity is the highest passing rate *below the lowest failing one*, never
a lucky pass above a failure.
"""

from __future__ import annotations

import math

STRICT_SUCCESS = 0.999
THESIS_SUCCESS = 0.90
DEFAULT_THRESHOLDS = (STRICT_SUCCESS, THESIS_SUCCESS)
DEFAULT_GROWTH = 2.0
DEFAULT_RESOLUTION = 0.10          # the bracket is narrowed to within 10 %
DEFAULT_MAX_RUNS = 12
MIN_RATE_PER_MIN = 1.0


class CapacitySearch:
    """Which rate (per minute) to run next; :meth:`capacity` once :meth:`next_rate` is None."""

    def __init__(self, start_per_min: float, *, max_per_min: float = math.inf,
                 thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
                 growth: float = DEFAULT_GROWTH, resolution: float = DEFAULT_RESOLUTION,
                 max_runs: int = DEFAULT_MAX_RUNS):
        assert start_per_min >= MIN_RATE_PER_MIN and growth > 1 and resolution > 0
        self.start = float(start_per_min)
        self.max_per_min = max_per_min
        self.thresholds = tuple(sorted(thresholds, reverse=True))
        self.growth = growth
        self.resolution = resolution
        self.max_runs = max_runs
        self.results: dict[float, float] = {}     # rate per minute -> success probability

    def record(self, rate_per_min: float, success: float) -> None:
        assert 0.0 <= success <= 1.0, success
        self.results[float(rate_per_min)] = success

    def lowest_failing(self, threshold: float) -> float | None:
        failing = [rate for rate, success in self.results.items() if success < threshold]
        return min(failing, default=None)

    def capacity(self, threshold: float) -> float | None:
        """The highest rate that met *threshold* below every rate that did not (None: none)."""
        ceiling = self.lowest_failing(threshold)
        passing = [rate for rate, success in self.results.items()
                   if success >= threshold and (ceiling is None or rate < ceiling)]
        return max(passing, default=None)

    def next_rate(self) -> float | None:
        """The next rate to run, or None: every threshold bracketed (or the budget spent)."""
        if not self.results:
            return self.start
        if len(self.results) >= self.max_runs:
            return None
        for threshold in self.thresholds:
            rate = self._next_for(threshold)
            if rate is not None and rate not in self.results:
                return rate
        return None

    def _next_for(self, threshold: float) -> float | None:
        ceiling = self.lowest_failing(threshold)
        floor = self.capacity(threshold)
        if ceiling is None:                                # nothing failed yet: go higher
            highest = max(self.results)
            if highest >= self.max_per_min:
                return None
            return float(min(round(highest * self.growth), self.max_per_min))
        if floor is None:                                  # nothing passed below: go lower
            if ceiling <= MIN_RATE_PER_MIN:
                return None
            return float(max(round(ceiling / self.growth), MIN_RATE_PER_MIN))
        if ceiling <= floor * (1 + self.resolution):
            return None
        middle = float(round(math.sqrt(floor * ceiling)))
        return middle if floor < middle < ceiling else None

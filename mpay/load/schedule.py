"""When each request of a run is sent: the arrival schedule, sans-IO.

Thesis section 4.4 spread the requests of a rate uniformly over the minute;
a Poisson process (exponential gaps of the same mean) is the other
classic, burstier, and closer to many independent payers.  A schedule is a
list of offsets in seconds from the run's start, one per request, ascending;
:func:`split` deals it round-robin to the sender processes, so together
they keep exactly the schedule.
"""

from __future__ import annotations

import random

UNIFORM = "uniform"
POISSON = "poisson"
ARRIVALS = (UNIFORM, POISSON)

SECONDS_PER_MINUTE = 60.0


def uniform(rate_per_min: float, count: int) -> list[float]:
    """*count* offsets exactly 60 / *rate_per_min* seconds apart, the first at 0."""
    _check(rate_per_min, count)
    gap_s = SECONDS_PER_MINUTE / rate_per_min
    return [index * gap_s for index in range(count)]


def poisson(rate_per_min: float, count: int, rng: random.Random) -> list[float]:
    """*count* offsets of a Poisson process of *rate_per_min*, the first at 0."""
    _check(rate_per_min, count)
    rate_per_s = rate_per_min / SECONDS_PER_MINUTE
    offsets, at = [], 0.0
    for _ in range(count):
        offsets.append(at)
        at += rng.expovariate(rate_per_s)
    return offsets


def arrivals(kind: str, rate_per_min: float, count: int, seed: int = 0) -> list[float]:
    """The schedule of *kind* (``uniform`` or ``poisson``; the seed reproduces a Poisson run)."""
    if kind == UNIFORM:
        return uniform(rate_per_min, count)
    if kind == POISSON:
        return poisson(rate_per_min, count, random.Random(seed))
    raise ValueError(f"unknown arrival process {kind!r} (one of {', '.join(ARRIVALS)})")


def split(offsets: list[float], parts: int) -> list[list[tuple[int, float]]]:
    """(request index, offset) per part, dealt round-robin: part k sends requests k, k+parts, ..."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    indexed = list(enumerate(offsets))
    return [indexed[part::parts] for part in range(parts)]


def _check(rate_per_min: float, count: int) -> None:
    if not rate_per_min > 0:
        raise ValueError(f"the rate must be > 0 per minute, got {rate_per_min}")
    if count < 1:
        raise ValueError(f"the count must be >= 1, got {count}")

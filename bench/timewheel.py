"""Time wheel benchmark: the balanced wheel, the classic cascade, the reactor heap.

1. start/cancel cost with 1,000,000 outstanding timers, delays uniform over
   24 h, for both wheels and for a real reactor's callLater/DelayedCall.cancel
   (a fresh SelectReactor, never run; its heap insertion happens in
   ``reactor.timeout()``, which every reactor iteration calls, and is timed).
2. Bytes per outstanding timer (tracemalloc).
3. Per-tick bookkeeping over a simulated day (864,000 ticks, no waiting):
   one-shot (1,000,000 timers started at once, delays uniform over 24 h; the
   final line) and steady (1,000,000 outstanding all day, each fired timer
   restarted).  "Moves" are timers taken out of a slot and re-filed in a
   lower level; expirations (level 0 -> event queue) are counted separately.
   Every tick is simulated; none is skipped.

Costs include the Python loop that calls start/cancel and CPython's cyclic GC
(on, as in the server).  "fill" (0 -> 1M) pays for the full collections
CPython runs each time the live objects grow by 25%; the start/cancel columns
are timed from a fresh full-collection baseline, so they pay for young
collections only, as a server whose timer population is stable would.
Run: ``.venv/bin/python bench/timewheel.py``.
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import time
import tracemalloc
from typing import Any, Callable

from twisted.internet.selectreactor import SelectReactor

from mpay.timewheel import TimeWheel

DAY_S = 86_400.0
SEED = 20_070_601


def noop() -> None:
    pass


def uniform_delays(count: int, rnd: random.Random) -> list[float]:
    return [rnd.random() * DAY_S for _ in range(count)]


def ns_per_op(started: float, count: int) -> float:
    return (time.perf_counter() - started) * 1e9 / count


def timer_api(kind: str) -> tuple[Callable[..., Any], Callable[[], Any]]:
    """``start(delay_s, f)`` and ``settle()`` (the reactor's heap push) for a fresh timer store."""
    if kind == "reactor":
        reactor = SelectReactor()
        return reactor.callLater, reactor.timeout  # timeout() pushes new calls onto the heap
    wheel = TimeWheel(balanced=kind == "balanced")
    return wheel.start, lambda: None


def cost(kind: str, timers: int, extra: int) -> dict[str, float]:
    """Fill to ``timers``, then time ``extra`` more starts and ``extra`` random cancels."""
    rnd = random.Random(SEED)
    fill, more = uniform_delays(timers, rnd), uniform_delays(extra, rnd)
    start, settle = timer_api(kind)
    gc.collect()
    t0 = time.perf_counter()
    handles = [start(d, noop) for d in fill]
    settle()
    fill_ns = ns_per_op(t0, timers)
    victims = rnd.sample(handles, extra)
    gc.collect()  # a fresh full-GC baseline: the next one is due only after 25% growth
    t0 = time.perf_counter()
    more_handles = [start(d, noop) for d in more]
    settle()
    start_ns = ns_per_op(t0, extra)
    t0 = time.perf_counter()
    for handle in victims:
        handle.cancel()
    cancel_ns = ns_per_op(t0, extra)
    del handles, more_handles, victims
    gc.collect()
    return {"fill": fill_ns, "start": start_ns, "cancel": cancel_ns}


def bytes_per_timer(kind: str, timers: int) -> float:
    """Memory held per outstanding timer: handle, slot entry, deadline int."""
    delays = uniform_delays(timers, random.Random(SEED))
    start, settle = timer_api(kind)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for delay in delays:
        start(delay, noop)
    settle()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return held / timers


def simulate_day(balanced: bool, timers: int, ticks: int, steady: bool) -> dict[str, float]:
    """Tick through a day; per-tick moves and expirations.

    One-shot: ``timers`` started at tick 0 with uniform delays, all firing
    within the day.  Steady: a fired timer restarts with a uniform delay, so
    ``timers`` stay outstanding; the first delays come from that renewal
    process's steady state (residual life, density 2(1 - x/T)/T), otherwise
    the load would drift up over the day and blur what the wheel does.
    """
    rnd = random.Random(SEED)
    wheel = TimeWheel(balanced=balanced)
    start, uniform = wheel.start, rnd.random

    def renew() -> None:
        start(uniform() * DAY_S, renew)

    if steady:
        for _ in range(timers):
            start(DAY_S * (1.0 - math.sqrt(1.0 - uniform())), renew)
    else:
        for delay in uniform_delays(timers, rnd):
            start(delay, noop)
    tick, drain = wheel.tick, wheel.drain
    max_expired = 0
    t0 = time.perf_counter()
    for _ in range(ticks):
        tick()
        if wheel.last_expired > max_expired:
            max_expired = wheel.last_expired
        drain(1_000_000)
    assert wheel.pending == 0 and len(wheel) == (timers if steady else timers - wheel.total_fired)
    mean = wheel.total_moves / ticks
    return {
        "mean": mean,
        "max": wheel.max_moves,
        "ratio": wheel.max_moves / mean,
        "exp_mean": wheel.total_expired / ticks,
        "exp_max": max_expired,
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timers", type=int, default=1_000_000, help="outstanding timers")
    parser.add_argument("--extra", type=int, default=100_000, help="starts and cancels timed at that load")
    parser.add_argument("--ticks", type=int, default=864_000, help="ticks simulated (864,000 = a day)")
    parser.add_argument("--memory-timers", type=int, default=200_000, help="timers measured by tracemalloc")
    args = parser.parse_args()
    began = time.perf_counter()
    kinds = ("balanced", "classic", "reactor")

    print(f"start/cancel, ns/op, {args.timers:,} outstanding, delays uniform over 24 h")
    print(f"  (fill: 0 -> {args.timers:,}; start/cancel: {args.extra:,} more starts, then {args.extra:,} random cancels)")
    print(f"  {'':10} {'fill':>8} {'start':>8} {'cancel':>8} {'bytes/timer':>12}")
    costs = {}
    for kind in kinds:
        costs[kind] = cost(kind, args.timers, args.extra)
        memory = bytes_per_timer(kind, args.memory_timers)
        c = costs[kind]
        print(f"  {kind:10} {c['fill']:8.0f} {c['start']:8.0f} {c['cancel']:8.0f} {memory:12.0f}")
    print("  reactor = SelectReactor().callLater + timeout() (heap push) / DelayedCall.cancel()")
    print(f"  bytes/timer by tracemalloc over {args.memory_timers:,} timers")

    print(f"\nper-tick bookkeeping over {args.ticks:,} ticks, every tick simulated (no waiting)")
    print(f"  one-shot: {args.timers:,} timers started at tick 0, delays uniform over 24 h")
    print(f"  steady:   {args.timers:,} outstanding all day, a fired timer restarts with a uniform 0-24 h delay")
    print("  moves = timers re-filed from a slot into a lower level; expired = handed to the event queue")
    print(f"  {'':19} {'moves mean':>10} {'max':>7} {'max/mean':>9} {'expired mean':>13} {'max':>5} {'sim s':>6}")
    days = {}
    for steady in (False, True):
        for kind in kinds[:2]:
            d = days[kind, steady] = simulate_day(kind == "balanced", args.timers, args.ticks, steady)
            label = f"{'steady' if steady else 'one-shot'} {kind}"
            print(
                f"  {label:19} {d['mean']:10.2f} {d['max']:7d} {d['ratio']:9.2f}"
                f" {d['exp_mean']:13.2f} {d['exp_max']:5d} {d['seconds']:6.1f}"
            )
    print(f"\nbench took {time.perf_counter() - began:.0f} s")
    print(
        f"timewheel: balanced max/mean={days['balanced', False]['ratio']:.2f}"
        f" classic max/mean={days['classic', False]['ratio']:.0f}"
        f" start_ns={costs['balanced']['start']:.0f} cancel_ns={costs['balanced']['cancel']:.0f}"
    )


if __name__ == "__main__":
    main()

"""Hierarchical timing wheel with a load-balanced cascade (thesis 2.8, 3.3, 4.1).

Every server timer (SIP retransmissions, ticket lifetimes, charging by time)
lives here.  This module is sans-IO: it counts ticks and never sees a clock.
``TimeWheelService`` (``timewheel_service.py``) is the piece that meets the reactor.

Structure
---------
Time is an integer tick count (``now_tick``); one tick is ``tick_s`` seconds,
0.1 s by default.  A timer is reduced to its deadline tick (rounded up, so it
is never early) and filed in one of several levels of slots.  Each level is
described by its *span* in ticks; level 0 has one-tick slots and level k has
slots as wide as the span of level k-1.  The default, ``DEFAULT_LEVELS``:

    level  span (ticks)  slot width   slots per rotation   rotation
      0          10        1 tick             10             1 s
      1         600       10 ticks            60             1 min
      2      36 000      600 ticks            60             1 h
      3     864 000   36 000 ticks            24             24 h
    overflow: a dict keyed by day number, for anything past tomorrow

A timer always goes to the lowest level that can hold it.  Slots of level 0
are handed to the event queue when their tick comes; slots of higher levels
have to be moved down ("cascaded") before their time, and that move is where
the two variants differ.

Classic cascade vs. the overlap array
-------------------------------------
Every ring has two rotations of slots: the current one and an *overlap array*
for the next, so level k-1 holds anything up to the end of level k's next
slot, and the top ring anything up to the end of tomorrow.  Both variants
file timers the same way (``balanced=False`` gives the classic one, all other
code shared); they differ only in when a slot of level k >= 1 moves down.

The classic wheel (Varghese & Lauck) moves a whole slot at the tick its
period begins.  With timers spread evenly over a day, most ticks move
nothing and the tick an hour begins moves an hour's worth (1/24 of all
timers): a burst.

The balanced wheel (the thesis's improvement, section 3.3) empties level k's
*next* slot while the current one runs (w_k ticks), a few timers per tick,
at (timers still there) / (ticks left before it is due), recomputed every
tick.  A timer started for that period goes straight into the overlap array
(the lowest level that holds it), so the next slot never grows, and a cancel
slows the pace at once.  Each level keeps a running fraction of the moves it
owes; the whole moves are handed out by largest remainder, so the levels'
roundings do not pile up on one tick.  A slot due on the next tick is
emptied in full whatever the arithmetic says.

    level 2, 1-minute slots      1M timers over a day: ~694 per minute
      ... | m13 | m14 | m15 | m16 | ...
                 now^    |  next slot: 694 timers, 600 ticks left,
                         |  so ~1.16 moved down per tick
                         v
    level 1, 1-second slots, 2 x 60 of them
      | s0 ... s59  (minute 14, main) | s0 ... s59  (minute 15, overlap) |

Trade-offs: twice the slot arrays (a few hundred small dicts); a timer may
be moved down up to one level period earlier than needed; each tick scans
one slot size per level.  In exchange the work per tick is flat.

Slots and handles
-----------------
A slot is a dict used as an insertion-ordered set of ``TimerHandle``; the
handle remembers its dict, so ``cancel()`` is one ``del`` (O(1)), and moving a
timer is ``popitem`` plus one ``bisect`` over the level limits.  Dicts beat an
intrusive linked list in CPython because their operations run in C.  Expired
slots are detached whole into the event queue without touching each timer;
``drain()`` runs them in bounded batches, outside ``tick()``.  Order within
one tick is deterministic but unspecified.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from math import ceil, isfinite
from typing import Any, Callable

from twisted.logger import Logger

log = Logger()

TICK_S = 0.1
"""Default tick length, seconds."""

DEFAULT_LEVELS = (10, 600, 36_000, 864_000)
"""Span of each level, ticks: 1 s, 1 min, 1 h, 24 h at the default tick."""

MAX_DELAY_S = 400 * 86_400.0
"""Longest accepted delay, seconds; a longer one is a bug upstream."""

MAX_DRAIN_BATCH = 1_000
"""Expiry callbacks run per ``drain()`` call (and per reactor turn)."""

MAX_CATCHUP_TICKS = 10_000
"""Ticks replayed per reactor turn after a stall; the rest on the next turn."""

TICK_EPSILON = 1e-6
"""Float noise tolerated when converting seconds to ticks, in ticks."""


class TimerHandle:
    """One started timer; ``cancel()`` it, or let it fire once."""

    __slots__ = ("_wheel", "_slot", "deadline_tick", "callback", "args")

    def __init__(self, wheel: "TimeWheel", slot: dict, deadline_tick: int, callback: Callable[..., Any], args: tuple):
        self._wheel = wheel
        self._slot: dict | None = slot  # the dict holding us; None once fired or cancelled
        self.deadline_tick = deadline_tick
        self.callback = callback
        self.args = args

    @property
    def active(self) -> bool:
        """True until the timer has fired or been cancelled."""
        return self._slot is not None

    def cancel(self) -> None:
        """Stop the timer; O(1), harmless after it fired or was cancelled."""
        slot = self._slot
        if slot is not None:
            del slot[self]
            self._slot = None
            self._wheel._count -= 1

    def __repr__(self) -> str:
        state = "active" if self._slot is not None else "done"
        return f"<TimerHandle tick={self.deadline_tick} {state} {self.callback!r}>"


class TimeWheel:
    """Hierarchical timing wheel; ``balanced=False`` gives the classic cascade."""

    def __init__(self, tick_s: float = TICK_S, levels: tuple[int, ...] = DEFAULT_LEVELS, balanced: bool = True):
        if not (isfinite(tick_s) and tick_s > 0):
            raise ValueError(f"tick_s must be positive, got {tick_s!r}")
        spans = tuple(int(s) for s in levels)
        widths = (1,) + spans[:-1]
        if not spans or any(s < 2 * w or s % w for s, w in zip(spans, widths)):
            raise ValueError(f"each level span must be a multiple (>= 2x) of the one below: {levels!r}")
        self.tick_s = float(tick_s)
        self.balanced = balanced
        self.now_tick = 0
        self._spans = spans
        self._widths = widths
        # Each ring has room for two rotations: the current one and the overlap.
        self._nslots = tuple(2 * s // w for s, w in zip(spans, widths))
        self._rings: list[list[dict]] = [[{} for _ in range(m)] for m in self._nslots]
        self._top = len(spans)  # level number of the overflow
        self._overflow: dict[int, dict] = {}  # day number (when // top span) -> slot
        # Level k holds deadlines below _limits[k] (the end of its next rotation);
        # ascending, so bisect picks the level.
        self._limits = [2 * s for s in spans]
        self._queue: deque[TimerHandle] = deque()
        self._owed = [0.0] * (len(spans) + 1)  # moves owed per level, fractional
        self._count = 0
        self.last_moves = 0
        self.total_moves = 0
        self.max_moves = 0
        self.last_expired = 0
        self.total_expired = 0
        self.total_fired = 0

    def __len__(self) -> int:
        """Outstanding timers: started and neither fired nor cancelled."""
        return self._count

    @property
    def pending(self) -> int:
        """Expired timers waiting in the event queue (an upper bound)."""
        return len(self._queue)

    def start(self, delay_s: float, callback: Callable[..., Any], *args: Any) -> TimerHandle:
        """Call ``callback(*args)`` after ``delay_s`` seconds (0 = next tick)."""
        if not (0.0 <= delay_s <= MAX_DELAY_S):  # also rejects NaN
            raise ValueError(f"delay must be within 0..{MAX_DELAY_S} s, got {delay_s!r}")
        when = self.now_tick + (ceil(delay_s / self.tick_s - TICK_EPSILON) or 1)
        slot = self._slot_for(when)
        handle = TimerHandle(self, slot, when, callback, args)
        slot[handle] = None
        self._count += 1
        return handle

    def _slot_for(self, when: int) -> dict:
        """The slot of the lowest level that holds deadline ``when``."""
        k = bisect_right(self._limits, when)
        if k < self._top:
            return self._rings[k][(when // self._widths[k]) % self._nslots[k]]
        slot = self._overflow.get(when // self._spans[-1])
        if slot is None:
            slot = self._overflow[when // self._spans[-1]] = {}
        return slot

    def _next_slot(self, k: int, boundary: int) -> dict | None:
        """The slot of level k (len(levels) = overflow) that starts at ``boundary``."""
        if k < self._top:
            return self._rings[k][(boundary // self._widths[k]) % self._nslots[k]]
        return self._overflow.get(boundary // self._spans[-1])

    def _move(self, slot: dict, count: int) -> None:
        """Move ``count`` timers out of ``slot`` into lower levels."""
        pop, slot_for = slot.popitem, self._slot_for
        for _ in range(count):
            handle = pop()[0]
            lower = handle._slot = slot_for(handle.deadline_tick)
            lower[handle] = None

    def tick(self) -> None:
        """Advance one tick: move timers down, queue the ones due now."""
        n = self.now_tick = self.now_tick + 1
        spans, limits = self._spans, self._limits
        for k, span in enumerate(spans):  # spans nest: stop at the first non-boundary
            if n % span:
                break
            limits[k] = (n // span + 2) * span
        moves = self._tick_balanced(n) if self.balanced else self._tick_classic(n)
        if n % spans[-1] == 0:
            stale = self._overflow.pop(n // spans[-1], None)  # moved down a day ago
            assert not stale, "overflow day not emptied in time"
        ring0 = self._rings[0]
        i = n % self._nslots[0]
        due = ring0[i]
        if due:
            ring0[i] = {}  # detached: handles still point at it, so cancel() keeps working
            self._queue.extend(due)
        self.last_expired = len(due)
        self.total_expired += len(due)
        self.last_moves = moves
        self.total_moves += moves
        if moves > self.max_moves:
            self.max_moves = moves

    def _tick_classic(self, n: int) -> int:
        """Cascade every slot whose period begins at tick ``n``, top down."""
        moves = 0
        if n % self._spans[-1] == 0:  # tomorrow now fits in the top ring's overlap
            slot = self._overflow.pop(n // self._spans[-1] + 1, None)
            if slot:
                moves += len(slot)
                self._move(slot, len(slot))
        for k in range(self._top - 1, 0, -1):
            if n % self._widths[k] == 0:
                slot = self._next_slot(k, n)
                if slot:
                    moves += len(slot)
                    self._move(slot, len(slot))
                    assert not slot
        return moves

    def _tick_balanced(self, n: int) -> int:
        """Empty each level's next slot gradually; see the module docstring."""
        owed, top, moves = self._owed, self._top, 0
        paced = []  # (level, slot) still being paced this tick
        for k in range(top, 0, -1):
            width = self._widths[k] if k < top else self._spans[-1]
            boundary = (n // width + 1) * width
            slot = self._next_slot(k, boundary)
            left = boundary - n
            if not slot:
                owed[k] = 0.0
            elif left == 1:  # due next tick: whatever float rounding left goes now
                moves += len(slot)
                self._move(slot, len(slot))
                owed[k] = 0.0
            else:
                owed[k] += len(slot) / left
                paced.append((k, slot))
        if paced:
            # Largest remainder: each level gets the whole part of what it is
            # owed, the leftover whole moves go to the largest fractions.
            spare = int(sum(owed[k] for k, _ in paced)) - sum(int(owed[k]) for k, _ in paced)
            if spare:
                paced.sort(key=lambda item: int(owed[item[0]]) - owed[item[0]])
            for i, (k, slot) in enumerate(paced):
                count = min(int(owed[k]) + (i < spare), len(slot))
                if count:
                    self._move(slot, count)
                    owed[k] -= count
                    moves += count
        return moves

    def drain(self, max_batch: int = MAX_DRAIN_BATCH) -> int:
        """Run up to ``max_batch`` expired callbacks; return how many ran."""
        queue, ran = self._queue, 0
        while ran < max_batch and queue:
            handle = queue.popleft()
            if handle._slot is None:
                continue  # cancelled while queued
            assert handle.deadline_tick <= self.now_tick, "timer fired early"
            handle._slot = None
            self._count -= 1
            self.total_fired += 1
            ran += 1
            try:
                handle.callback(*handle.args)
            except Exception:
                log.failure("timer callback {callback!r} raised", callback=handle.callback)
        return ran

    def stats(self) -> dict[str, int]:
        """Counters for metrics and the manhole."""
        return {
            "outstanding": self._count,
            "pending": len(self._queue),
            "now_tick": self.now_tick,
            "last_moves": self.last_moves,
            "total_moves": self.total_moves,
            "max_moves": self.max_moves,
            "last_expired": self.last_expired,
            "total_expired": self.total_expired,
            "total_fired": self.total_fired,
        }

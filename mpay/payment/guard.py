"""Guess blocking: a merchant that keeps naming OTCNs nobody gave it is shut out (thesis 3.5.1).

An OTCN is 10^15 random numbers wide, but a merchant's POS can send charges
as fast as it likes.  So the PS counts, per merchant, the charges that named
an unknown, used or expired OTCN.  A merchant may have `GUESS_LIMIT` of them
within `GUESS_WINDOW_S`; the next one inside the window blocks it for
`BLOCK_S`, and while blocked every charge it sends is refused with 403, even
one naming a valid OTCN.  The consumer behind a guessed number is never
disturbed: a failed guess ends at the PS.

    one merchant; limit 5, window 600 s, block 600 s
    t (s)   0   100   200   300   400   590
            x    x     x     x     x     x   6th failure within 600 s:
           404  404   404   404   404   403  blocked until t = 1190

Decisions:

- A success does not reset the count.  A merchant can always get valid OTCNs
  from a phone of its own; if each one wiped its record, it could guess
  without end, `limit` failures per real charge.  Old failures leave the
  window on their own.
- Failures while blocked are not counted and do not extend the block: the PS
  refuses before resolving the OTCN, so there is nothing to count.  When a
  block starts the count starts afresh, so a lapsed block gives the full
  allowance back.
- The window slides (each failure counts for exactly `window_s` after it),
  so no boundary lets a burst of twice the limit through.

:class:`GuessCounter` is the rule, sans-IO (time is an argument);
:class:`MemoryGuessGuard` drives it from a clock and forgets quiet merchants
on the time wheel; :class:`RedisGuessGuard` keeps the same rule in Redis, in
one Lua script on Redis's own clock, so every PS process shares it.
"""

from __future__ import annotations

import enum
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from twisted.internet import defer
from twisted.logger import Logger

log = Logger()

GUESS_LIMIT = 5
"""Failures a merchant may have within the window; the next one blocks it."""

GUESS_WINDOW_S = 600
"""How long a failure counts against a merchant, seconds."""

BLOCK_S = 600
"""How long a block lasts, seconds."""

MAX_GUESS_LIMIT = 1_000
"""Largest accepted limit: it bounds the failures remembered per merchant."""


class Guess(enum.Enum):
    COUNTED = "counted"            # under the limit: answer 404
    BLOCKED = "blocked"            # this failure crossed the limit: 403, block starts
    WAS_BLOCKED = "was blocked"    # blocked already: 403, nothing counted


class GuessGuard(Protocol):
    def failure(self, merchant: str) -> defer.Deferred: ...
    def is_blocked(self, merchant: str) -> defer.Deferred: ...
    def clear(self, merchant: str) -> defer.Deferred: ...


def _check_limits(limit: int, window_s: float, block_s: float) -> None:
    if type(limit) is not int or not 1 <= limit <= MAX_GUESS_LIMIT:
        raise ValueError(f"guess limit must be 1..{MAX_GUESS_LIMIT}, got {limit!r}")
    if not (window_s > 0 and block_s > 0):  # also refuses NaN
        raise ValueError(f"window and block must be positive seconds, "
                         f"got {window_s!r}, {block_s!r}")


@dataclass(slots=True)
class _Record:
    failures: deque[float]        # counted failure times, oldest first; at most `limit`
    blocked_until: float = field(default=0.0)


class GuessCounter:
    """The blocking rule for every merchant, with the time passed in."""

    def __init__(self, limit: int = GUESS_LIMIT, window_s: float = GUESS_WINDOW_S,
                 block_s: float = BLOCK_S):
        _check_limits(limit, window_s, block_s)
        self.limit, self.window_s, self.block_s = limit, window_s, block_s
        self._records: dict[str, _Record] = {}

    def failure(self, merchant: str, now: float) -> Guess:
        """Record that *merchant* named an OTCN that resolved to nothing at *now*."""
        record = self._records.get(merchant)
        if record is None:
            record = self._records[merchant] = _Record(deque(maxlen=self.limit))
        if now < record.blocked_until:
            return Guess.WAS_BLOCKED
        failures = record.failures
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        if len(failures) >= self.limit:
            failures.clear()
            record.blocked_until = now + self.block_s
            return Guess.BLOCKED
        failures.append(now)
        return Guess.COUNTED

    def is_blocked(self, merchant: str, now: float) -> bool:
        record = self._records.get(merchant)
        return record is not None and now < record.blocked_until

    def lapses_at(self, merchant: str) -> float | None:
        """When *merchant*'s record stops mattering: last failure out of the window, block over."""
        record = self._records.get(merchant)
        if record is None:
            return None
        last = record.failures[-1] + self.window_s if record.failures else 0.0
        return max(last, record.blocked_until)

    def forget(self, merchant: str, now: float) -> bool:
        """Drop *merchant*'s record if it has lapsed by *now*; True if it is gone."""
        lapses_at = self.lapses_at(merchant)
        if lapses_at is not None and lapses_at > now:
            return False
        self._records.pop(merchant, None)
        return True

    def clear(self, merchant: str) -> None:
        """Forget *merchant* at once: an operator lifting a block."""
        self._records.pop(merchant, None)

    def __len__(self) -> int:
        return len(self._records)


def _log_block(merchant: str, limit: int, window_s: float, block_s: float) -> None:
    log.warn("merchant {merchant} blocked for {block_s} s: "
             "over {limit} unknown OTCNs in {window_s} s", merchant=merchant, block_s=block_s, limit=limit, window_s=window_s)


class MemoryGuessGuard:
    """A :class:`GuessCounter` on a clock; one wheel timer per merchant forgets it when quiet.

    Memory stays bounded by the merchants active within the last window or
    block, each holding at most `limit` failure times.
    """

    def __init__(self, wheel: Any, now: Callable[[], float], limit: int = GUESS_LIMIT,
                 window_s: float = GUESS_WINDOW_S, block_s: float = BLOCK_S):
        self.counter = GuessCounter(limit, window_s, block_s)
        self.wheel = wheel
        self.now = now
        self._timers: dict[str, Any] = {}

    def failure(self, merchant: str) -> defer.Deferred:
        """Count a failure; fires True when *merchant* is blocked now (answer 403)."""
        now = self.now()
        verdict = self.counter.failure(merchant, now)
        if verdict is not Guess.WAS_BLOCKED:
            self._arm(merchant, now)
        if verdict is Guess.BLOCKED:
            _log_block(merchant, self.counter.limit, self.counter.window_s, self.counter.block_s)
        return defer.succeed(verdict is not Guess.COUNTED)

    def is_blocked(self, merchant: str) -> defer.Deferred:
        return defer.succeed(self.counter.is_blocked(merchant, self.now()))

    def clear(self, merchant: str) -> defer.Deferred:
        self.counter.clear(merchant)
        timer = self._timers.pop(merchant, None)
        if timer is not None:
            timer.cancel()
        return defer.succeed(None)

    def _arm(self, merchant: str, now: float) -> None:
        timer = self._timers.pop(merchant, None)
        if timer is not None:
            timer.cancel()
        lapses_at = self.counter.lapses_at(merchant)
        if lapses_at is not None:
            delay_s = max(0.0, lapses_at - now)
            self._timers[merchant] = self.wheel.start(delay_s, self._lapse, merchant)

    def _lapse(self, merchant: str) -> None:
        del self._timers[merchant]
        now = self.now()
        if not self.counter.forget(merchant, now):
            self._arm(merchant, now)  # the wheel ran ahead of the clock by a rounding: later

    def __len__(self) -> int:
        return len(self.counter)


# KEYS: block key, failures key (a sorted set of failure times, ms).
# ARGV: limit, window ms, block ms, a member name unique to this failure.
# Returns 0 counted, 1 blocked now, 2 blocked already: the Guess values in order.
_FAILURE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 2 end
local limit, window_ms, block_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms - window_ms)
if redis.call('ZCARD', KEYS[2]) >= limit then
  redis.call('DEL', KEYS[2])
  redis.call('SET', KEYS[1], '1', 'PX', block_ms)
  return 1
end
redis.call('ZADD', KEYS[2], now_ms, ARGV[4])
redis.call('PEXPIRE', KEYS[2], window_ms)
return 0
"""
_SCRIPT_VERDICTS = (Guess.COUNTED, Guess.BLOCKED, Guess.WAS_BLOCKED)
_FAILURE_ID_BYTES = 8


class RedisGuessGuard:
    """The same rule in Redis: ``{prefix}guess:{merchant}`` holds the recent
    failures (at most `limit`, expiring with the window), ``{prefix}block:{merchant}``
    exists while the merchant is blocked.  One script does the whole decision,
    so PS processes counting the same merchant at once cannot both slip under
    the limit, and all of them read the time from Redis.
    """

    def __init__(self, redis: Any, prefix: str = "mpay:", limit: int = GUESS_LIMIT,
                 window_s: float = GUESS_WINDOW_S, block_s: float = BLOCK_S):
        _check_limits(limit, window_s, block_s)
        self.redis = redis
        self.prefix = prefix
        self.limit, self.window_s, self.block_s = limit, window_s, block_s
        self._window_ms = max(1, round(window_s * 1000))
        self._block_ms = max(1, round(block_s * 1000))

    def _block_key(self, merchant: str) -> str:
        return f"{self.prefix}block:{merchant}"

    def _failures_key(self, merchant: str) -> str:
        return f"{self.prefix}guess:{merchant}"

    @defer.inlineCallbacks
    def failure(self, merchant: str):
        """Count a failure; fires True when *merchant* is blocked now (answer 403)."""
        code = yield self.redis.eval(
            _FAILURE_SCRIPT,
            keys=[self._block_key(merchant), self._failures_key(merchant)],
            args=[self.limit, self._window_ms, self._block_ms,
                  secrets.token_hex(_FAILURE_ID_BYTES)])
        verdict = _SCRIPT_VERDICTS[code]
        if verdict is Guess.BLOCKED:
            _log_block(merchant, self.limit, self.window_s, self.block_s)
        return verdict is not Guess.COUNTED

    @defer.inlineCallbacks
    def is_blocked(self, merchant: str):
        found = yield self.redis.exists(self._block_key(merchant))
        return bool(found)

    def clear(self, merchant: str) -> defer.Deferred:
        return self.redis.delete([self._block_key(merchant), self._failures_key(merchant)])

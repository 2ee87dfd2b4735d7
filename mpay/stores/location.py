"""The location store: where each DMD can be reached now (thesis 3.4, mobility).

A binding maps a number to the contact its device registered and the address
the REGISTER really came from (behind NAT the two differ, and only the
latter reaches the device).  A binding that is not refreshed lapses: the
device is then "offline".  Two implementations with one interface:

- :class:`MemoryLocationStore`: a dict, expiry on the time wheel; for one
  process (the embedded default).
- :class:`RedisLocationStore`: one Redis key per number with a TTL, shared by
  every PS process (txredisapi connection pool, many requests in flight).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from twisted.internet import defer
from twisted.python.failure import Failure

LOCATION_DEFAULT_EXPIRES_S = 3600
LOCATION_MIN_EXPIRES_S = 60        # below this: 423 Interval Too Brief (RFC 3261 10.3)
LOCATION_MAX_EXPIRES_S = 86_400    # longer requests are shortened to this
REDIS_POOL_SIZE = 8


@dataclass(frozen=True)
class Binding:
    number: str
    contact: str         # Contact URI as the device registered it
    host: str            # source address of the REGISTER: where requests go
    port: int
    transport: str       # "UDP", "TCP" or "TLS"
    expires_at: float    # server clock, seconds
    via: str = ""        # with several PS instances: the one holding the flow (peers.py)
    local: str = ""      # and the server side of the flow, "host:port"

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "Binding":
        return cls(**json.loads(text))


class LocationStore(Protocol):
    in_process: bool     # lookup_now() answers at once (no Deferred a request)

    def bind(self, binding: Binding, ttl_s: int) -> defer.Deferred: ...
    def lookup(self, number: str) -> defer.Deferred: ...
    def remove(self, number: str) -> defer.Deferred: ...


class MemoryLocationStore:
    """Bindings in a dict; each has one wheel timer, replaced on refresh."""

    in_process = True

    def __init__(self, wheel: Any):
        self.wheel = wheel
        self._bindings: dict[str, tuple[Binding, Any]] = {}

    def bind(self, binding: Binding, ttl_s: int) -> defer.Deferred:
        assert ttl_s > 0, "a zero expiry is a removal"
        previous = self._bindings.get(binding.number)
        if previous is not None:
            previous[1].cancel()
        handle = self.wheel.start(ttl_s, self._lapse, binding.number, binding)
        self._bindings[binding.number] = (binding, handle)
        return defer.succeed(None)

    def _lapse(self, number: str, binding: Binding) -> None:
        current = self._bindings.get(number)
        if current is not None and current[0] is binding:
            del self._bindings[number]

    def lookup(self, number: str) -> defer.Deferred:
        return defer.succeed(self.lookup_now(number))

    def lookup_now(self, number: str) -> Binding | None:
        entry = self._bindings.get(number)
        return entry[0] if entry is not None else None

    def remove(self, number: str) -> defer.Deferred:
        entry = self._bindings.pop(number, None)
        if entry is not None:
            entry[1].cancel()
        return defer.succeed(None)

    def __len__(self) -> int:
        return len(self._bindings)


MAX_KEYS_PER_MGET = 256
"""Lookups sent in one MGET; more in one turn go as several."""


class RedisLocationStore:
    """One key per number, ``SET key json EX ttl``; Redis expires what lapses.

    The lookups asked during one reactor turn (a ledger group's transfers are
    located together) go to Redis as one MGET at the start of the next: one
    round trip, one command timer and one reply for the group, instead of a
    GET, its timer and its Deferred chain each (``mpay-load --backends
    redis,postgres``, README "Session 15").  A lone lookup waits
    only for the end of its turn.
    """

    in_process = False

    def __init__(self, redis: Any, prefix: str = "mpay:", reactor: Any = None,
                 max_keys: int = MAX_KEYS_PER_MGET):
        if reactor is None:
            from twisted.internet import reactor
        assert max_keys >= 1
        self.redis = redis
        self.prefix = prefix
        self.reactor = reactor
        self.max_keys = max_keys
        self._asked: list[tuple[str, defer.Deferred]] = []
        self.round_trips = self.lookups = 0      # the manhole: keys per MGET

    def _key(self, number: str) -> str:
        return f"{self.prefix}loc:{number}"

    def bind(self, binding: Binding, ttl_s: int) -> defer.Deferred:
        assert ttl_s > 0, "a zero expiry is a removal"
        return self.redis.set(self._key(binding.number), binding.to_json(), expire=ttl_s)

    def lookup(self, number: str) -> defer.Deferred:
        """Fires with the number's Binding, or None; fails as its MGET did."""
        found: defer.Deferred = defer.Deferred()
        if not self._asked:
            self.reactor.callLater(0, self._flush)
        self._asked.append((self._key(number), found))
        return found

    def _flush(self) -> None:
        asked, self._asked = self._asked, []
        for start in range(0, len(asked), self.max_keys):
            group = asked[start:start + self.max_keys]
            self.round_trips += 1
            self.lookups += len(group)
            try:
                sent = self.redis.mget([key for key, _ in group])
            except Exception:
                sent = defer.fail()
            sent.addCallbacks(_found, _not_found, callbackArgs=(group,), errbackArgs=(group,))

    def remove(self, number: str) -> defer.Deferred:
        return self.redis.delete(self._key(number))


def _found(values: Any, group: list[tuple[str, defer.Deferred]]) -> None:
    if not isinstance(values, list) or len(values) != len(group):
        _not_found(Failure(ValueError(f"MGET of {len(group)} keys answered {values!r:.80}")),
                   group)
        return
    for (_, found), value in zip(group, values):
        try:
            binding = None if value is None else Binding.from_json(value)
        except (ValueError, TypeError):     # not a binding of ours: as Redis failing
            found.errback(Failure())
            continue
        found.callback(binding)


def _not_found(failure: Failure, group: list[tuple[str, defer.Deferred]]) -> None:
    for _, found in group:
        found.errback(failure)


def connect_redis(host: str, port: int, db: int = 0, pool_size: int = REDIS_POOL_SIZE):
    """A lazily connecting, reconnecting txredisapi pool (requests queue until it is up)."""
    import txredisapi

    pool = txredisapi.lazyConnectionPool(host=host, port=port, dbid=db, poolsize=pool_size,
                                         reconnect=True, charset="utf-8")
    # Back within seconds of Redis, not txredisapi's 10 s (its factory's documented knob).
    pool._factory.maxDelay = REDIS_RECONNECT_MAX_S
    return pool


REDIS_RECONNECT_MAX_S = 2.0
"""Longest pause between two attempts to reach a Redis that went away."""

REDIS_TIMEOUT_S = 1.0
"""Longest wait for one Redis command; past it the request that needed it gets 503."""


class BoundedRedis:
    """A txredisapi pool whose every command fails after REDIS_TIMEOUT_S.

    The pool reconnects by itself and queues commands while Redis is away;
    without a bound a request would wait for Redis forever.  With it, what
    needs Redis fails closed (503 with Retry-After, never a fallback to
    memory), and works again as soon as the pool has reconnected.  A command
    timed out may still reach Redis later; every store operation is safe
    to arrive late (a binding refreshed, an OTCN consumed unused: closed).
    The bound is counted from when the command was sent, but decided only
    after the reactor has read its sockets once more: a stalled reactor
    must not time out a reply that is already waiting to be read.
    """

    def __init__(self, pool, reactor, timeout_s: float = REDIS_TIMEOUT_S):
        self._pool = pool
        self._reactor = reactor
        self.timeout_s = timeout_s
        self.timeouts = 0

    def __getattr__(self, name: str):
        command = getattr(self._pool, name)
        if not callable(command) or name in ("disconnect",):
            return command

        def bounded(*args, **kwargs):
            result = command(*args, **kwargs)
            if not isinstance(result, defer.Deferred):
                return result
            reactor = self._reactor

            def give_up() -> None:
                if not result.called:
                    self.timeouts += 1
                    timed_out[0] = True
                    result.cancel()

            def expired() -> None:
                # After a stall the reactor runs its timers before it reads its sockets, so
                # a reply that came during the stall would lose the race: read first.
                waiting[0] = reactor.callLater(0, give_up)

            waiting = [reactor.callLater(self.timeout_s, expired)]
            timed_out = [False]

            def settled(outcome):
                if waiting[0].active():
                    waiting[0].cancel()
                return outcome

            def cancelled(failure):
                failure.trap(defer.CancelledError)
                if not timed_out[0]:        # the caller's own cancel is not a timeout
                    return failure
                raise defer.TimeoutError(f"Redis gave no answer in {self.timeout_s} s")

            return result.addBoth(settled).addErrback(cancelled)

        return bounded

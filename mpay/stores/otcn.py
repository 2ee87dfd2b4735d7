"""The OTCN store: the one-time credit numbers that are live now (DESIGN section 7).

Each OTCN is issued to one consumer, lives a short time and is consumed
once: the charge that names it takes it, and whoever comes second (a retry,
a second POS, a guesser) finds nothing.  Issuing never hands out a number
that is live for someone else.  Two implementations with one interface:

- :class:`MemoryOTCNStore`: a dict, expiry on the time wheel; for one process.
- :class:`RedisOTCNStore`: one key per OTCN with a TTL, shared by every PS
  process; ``SET NX EX`` to issue, ``GETDEL`` to consume, both atomic in Redis.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.internet import defer
from twisted.logger import Logger

from mpay.payment.otcn import OTCN_LIFETIME_S, OTCN_MAX_LIFETIME_S, OTCNGrant, is_otcn, new_otcn

log = Logger()

OTCN_ISSUE_MAX_ATTEMPTS = 8
"""Fresh numbers drawn per issue before giving up; with 10^15 numbers a second
draw is already a sign of a broken generator."""


class OTCNExhausted(Exception):
    """Every number drawn for one issue was live already: the generator is broken."""


class OTCNStore(Protocol):
    def issue(self, consumer: str, cap: int | None,
              lifetime_s: int = OTCN_LIFETIME_S) -> defer.Deferred: ...
    def consume(self, otcn: str) -> defer.Deferred: ...
    def peek(self, otcn: str) -> defer.Deferred: ...


def _check_issue(cap: int | None, lifetime_s: int) -> None:
    if cap is not None and (type(cap) is not int or cap <= 0):
        raise ValueError(f"a cap is a positive number of minor units or None, got {cap!r}")
    if type(lifetime_s) is not int or not 0 < lifetime_s <= OTCN_MAX_LIFETIME_S:
        raise ValueError(f"lifetime must be 1..{OTCN_MAX_LIFETIME_S} whole seconds, "
                         f"got {lifetime_s!r}")


def _collided(otcn: str) -> None:
    log.warn("drew OTCN {masked} while it was live; drawing again", masked=otcn[:4] + "...")


def _exhausted(consumer: str) -> OTCNExhausted:
    log.critical("no free OTCN in {attempts} draws for {consumer}: is the generator broken?",
                 attempts=OTCN_ISSUE_MAX_ATTEMPTS, consumer=consumer)
    return OTCNExhausted(f"no free OTCN in {OTCN_ISSUE_MAX_ATTEMPTS} draws")


class MemoryOTCNStore:
    """Grants in a dict; each has one wheel timer, cancelled when it is consumed.

    `now` is the clock ``expires_at`` is read on (``reactor.seconds``); the
    wheel removes a grant at most a tick after that, and `consume` checks the
    time itself so that tick never lets a lapsed OTCN through.
    """

    def __init__(self, wheel: Any, now: Callable[[], float],
                 generate: Callable[[], str] = new_otcn):
        self.wheel = wheel
        self.now = now
        self.generate = generate  # the number source; tests replace it
        self._grants: dict[str, tuple[OTCNGrant, Any]] = {}

    def issue(self, consumer: str, cap: int | None,
              lifetime_s: int = OTCN_LIFETIME_S) -> defer.Deferred:
        return defer.maybeDeferred(self._issue, consumer, cap, lifetime_s)

    def _issue(self, consumer: str, cap: int | None, lifetime_s: int) -> OTCNGrant:
        _check_issue(cap, lifetime_s)
        for _ in range(OTCN_ISSUE_MAX_ATTEMPTS):
            otcn = self.generate()
            assert is_otcn(otcn), "the generator made a malformed OTCN"
            if otcn not in self._grants:
                break
            _collided(otcn)
        else:
            raise _exhausted(consumer)
        grant = OTCNGrant(otcn, consumer, cap, self.now() + lifetime_s)
        handle = self.wheel.start(lifetime_s, self._lapse, otcn, grant)
        self._grants[otcn] = (grant, handle)
        return grant

    def _lapse(self, otcn: str, grant: OTCNGrant) -> None:
        current = self._grants.get(otcn)
        if current is not None and current[0] is grant:
            del self._grants[otcn]

    def consume(self, otcn: str) -> defer.Deferred:
        entry = self._grants.pop(otcn, None)
        if entry is None:
            return defer.succeed(None)
        grant, handle = entry
        handle.cancel()
        return defer.succeed(grant if self.now() < grant.expires_at else None)

    def peek(self, otcn: str) -> defer.Deferred:
        entry = self._grants.get(otcn)
        live = entry is not None and self.now() < entry[0].expires_at
        return defer.succeed(entry[0] if live else None)

    def __len__(self) -> int:
        return len(self._grants)


class RedisOTCNStore:
    """One key per OTCN holding the grant as JSON; Redis expires what lapses.

    A malformed OTCN is answered without a round trip: it can never have been
    issued, and a guesser's junk then costs Redis nothing.
    """

    def __init__(self, redis: Any, prefix: str = "mpay:", now: Callable[[], float] | None = None,
                 generate: Callable[[], str] = new_otcn):
        if now is None:
            from twisted.internet import reactor

            now = reactor.seconds
        self.redis = redis
        self.prefix = prefix
        self.now = now
        self.generate = generate  # the number source; tests replace it

    def _key(self, otcn: str) -> str:
        return f"{self.prefix}otcn:{otcn}"

    @defer.inlineCallbacks
    def issue(self, consumer: str, cap: int | None, lifetime_s: int = OTCN_LIFETIME_S):
        _check_issue(cap, lifetime_s)
        for _ in range(OTCN_ISSUE_MAX_ATTEMPTS):
            otcn = self.generate()
            assert is_otcn(otcn), "the generator made a malformed OTCN"
            grant = OTCNGrant(otcn, consumer, cap, self.now() + lifetime_s)
            stored = yield self.redis.set(self._key(otcn), grant.to_json(), expire=lifetime_s,
                                          only_if_not_exists=True)
            if stored is not None:  # "OK"; None when the key was there (NX)
                return grant
            _collided(otcn)
        raise _exhausted(consumer)

    @defer.inlineCallbacks
    def consume(self, otcn: str):
        if not is_otcn(otcn):
            return None
        value = yield self.redis.execute_command("GETDEL", self._key(otcn))
        return None if value is None else OTCNGrant.from_json(value)

    @defer.inlineCallbacks
    def peek(self, otcn: str):
        if not is_otcn(otcn):
            return None
        value = yield self.redis.get(self._key(otcn))
        return None if value is None else OTCNGrant.from_json(value)

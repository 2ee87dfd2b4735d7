"""Where the AS keeps each enrolled device's K (sealed at rest) and Ed25519 key.

One small interface: the ledger database implements it in production (the
``device_keys`` table, so K survives restarts with the money it guards); the
memory implementation serves tests and the Sim-DMD.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from twisted.internet import defer


class DeviceRecord(NamedTuple):
    number: str
    sealed_k: bytes        # AEAD under the master key ring, bound to the number
    device_key: bytes      # raw Ed25519 public key, 32 bytes


class DeviceKeyStore(Protocol):
    def store(self, record: DeviceRecord) -> defer.Deferred: ...
    def load(self, number: str) -> defer.Deferred: ...


class MemoryDeviceKeyStore:
    def __init__(self) -> None:
        self.records: dict[str, DeviceRecord] = {}

    def store(self, record: DeviceRecord) -> defer.Deferred:
        self.records[record.number] = record
        return defer.succeed(None)

    def load(self, number: str) -> defer.Deferred:
        return defer.succeed(self.records.get(number))


class LedgerDeviceKeyStore:
    """The ledger's device_keys table: K survives restarts and every AS/PS process sees it.

    An enrolled number is an account: storing its key opens it (balance 0)
    first, so a payment to a number that has just enrolled finds it.
    """

    def __init__(self, ledger) -> None:
        self.ledger = ledger

    @defer.inlineCallbacks
    def store(self, record: DeviceRecord):
        yield self.ledger.open_account(record.number)
        yield self.ledger.store_device_key(record.number, record.sealed_k, record.device_key)

    @defer.inlineCallbacks
    def load(self, number: str):
        key = yield self.ledger.device_key(number)
        return None if key is None else DeviceRecord(key.number, key.encrypted_k, key.ed25519_pub)


DEVICE_KEY_CACHE_S = 30.0
"""How long the PS trusts a device key it read, before reading it again."""

MAX_CACHED_DEVICE_KEYS = 100_000
"""Device keys one PS process keeps in memory; the oldest go first."""


class CachedDeviceKeys:
    """Device keys for the PS's signature checks, without a database read per payment.

    A key is kept DEVICE_KEY_CACHE_S.  A device that enrols again has a new
    key: a signature that fails against a cached key is checked once more
    against a fresh read (``reload``), so a re-enrolled device is never
    refused; an old key stays usable no longer than its tickets already do.
    Processes sharing one ledger need no coordination for this.
    """

    def __init__(self, store: DeviceKeyStore, clock, ttl_s: float = DEVICE_KEY_CACHE_S,
                 max_entries: int = MAX_CACHED_DEVICE_KEYS):
        self.store = store
        self.clock = clock
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._cache: dict[str, tuple[float, DeviceRecord]] = {}
        self.hits = self.misses = 0

    def load(self, number: str) -> defer.Deferred:
        record = self.cached_record(number)
        return self.reload(number) if record is None else defer.succeed(record)

    def cached_record(self, number: str) -> DeviceRecord | None:
        """The key if it is cached and fresh (counted as a hit), else None: the PS's
        hot path takes it without a Deferred."""
        record = self._fresh(number)
        if record is not None:
            self.hits += 1
        return record

    def _fresh(self, number: str) -> DeviceRecord | None:
        entry = self._cache.get(number)
        return entry[1] if entry is not None and entry[0] > self.clock() else None

    def reload(self, number: str) -> defer.Deferred:
        """Read *number*'s key from the store, whatever is cached."""
        self.misses += 1
        self._cache.pop(number, None)

        def loaded(record):
            if record is not None:
                if len(self._cache) >= self.max_entries:
                    del self._cache[next(iter(self._cache))]   # the oldest entry
                self._cache[number] = (self.clock() + self.ttl_s, record)
            return record

        return defer.maybeDeferred(self.store.load, number).addCallback(loaded)

    def cached(self, number: str) -> bool:
        return self._fresh(number) is not None

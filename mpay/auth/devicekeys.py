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

"""The ledger: accounts keyed by E.164 number, a double-entry journal, holds.

``api`` holds the types and limits, ``store`` the rules in SQL, ``sqlite`` and
``postgres`` the two backends, ``writer`` the group-commit thread, ``service``
the Deferred-returning ``LedgerService``, ``audit`` the proof that the books
balance, ``migrate`` the versioned schema, ``holds`` and ``notices`` the
reservations of timed sessions and the notices waiting for offline payees.
"""

from __future__ import annotations

import functools
from typing import Mapping

from mpay.ledger.api import (
    MAX_AMOUNT_MINOR, SETTLEMENT, Balance, DeviceKey, Hold, HoldResult, InvalidNumber,
    JournalEntry, LedgerBusy, LedgerError, LedgerStopped, Outcome, Session, SessionResult,
    TransferResult, UnknownAccount, check_number, sip_idempotency_key, validate_amount,
)
from mpay.ledger.audit import AuditReport
from mpay.ledger.service import LedgerService
from mpay.ledger.store import SQLStore
from mpay.ledger.writer import OpenStore

BACKENDS = ("sqlite", "postgres")
DEFAULT_SQLITE_PATH = "var/ledger.sqlite3"
DEFAULT_POSTGRES_SCHEMA = "public"

__all__ = [
    "MAX_AMOUNT_MINOR", "SETTLEMENT", "AuditReport", "Balance", "DeviceKey", "Hold",
    "HoldResult", "InvalidNumber", "JournalEntry", "LedgerBusy", "LedgerError", "LedgerService",
    "LedgerStopped", "Outcome", "SQLStore", "Session", "SessionResult", "TransferResult", "UnknownAccount", "check_number",
    "sip_idempotency_key", "store_opener", "validate_amount",
]


def store_opener(section: Mapping[str, str]) -> OpenStore:
    """The store named by a ``[ledger]`` config section (backend, sqlite_path,
    postgres_dsn, postgres_schema), as a function ``open(migrate=...)``."""
    backend = section.get("backend") or "sqlite"
    if backend == "sqlite":
        from mpay.ledger.sqlite import SQLiteStore

        path = section.get("sqlite_path") or DEFAULT_SQLITE_PATH
        return functools.partial(SQLiteStore.open, path)
    if backend == "postgres":
        from mpay.ledger.postgres import PostgresStore

        dsn = section.get("postgres_dsn") or ""
        if not dsn:
            raise LedgerError("[ledger] postgres_dsn is required when backend = postgres")
        return functools.partial(PostgresStore.open, dsn,
                                 section.get("postgres_schema") or DEFAULT_POSTGRES_SCHEMA)
    raise LedgerError(f"[ledger] backend must be one of {', '.join(BACKENDS)}, not {backend!r}")

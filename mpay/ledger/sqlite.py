"""The embedded ledger: SQLite from the standard library.

WAL journal with ``synchronous=FULL``: a COMMIT returns only once the
transaction is on disk, so what the writer acknowledges survives a crash or
power loss; WAL lets readers run beside the one writer.  Write transactions
start with ``BEGIN IMMEDIATE`` so a second writer (the admin CLI beside the
server) waits for the lock up to ``BUSY_TIMEOUT_S`` instead of failing half
way through.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import time
from json import JSONDecoder
from json.encoder import encode_basestring_ascii
from typing import Callable, Sequence

from mpay.ledger.api import LedgerError
from mpay.ledger.migrate import migrate as _migrate
from mpay.ledger.store import _INSERT_JOURNAL, SQLStore

BUSY_TIMEOUT_S = 5.0
"""How long a writer waits for another process's write lock before a retry."""

WAL_RETRY_S = 0.02
"""Pause between two tries to switch a ledger that another process holds to WAL."""

MIN_SQLITE_VERSION = (3, 38, 0)
"""STRICT tables (3.37), RETURNING (3.35), UPDATE FROM (3.33) and ->> (3.38) are used."""

_STATEMENT_CACHE = 256
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6
_READ_BACK = "SELECT balance, held FROM accounts WHERE number = ?"
# A run's statements: one parameter (a JSON array of distinct values) for a list
# of any length, so each is one cached statement.  A join driven by the array
# (CROSS JOIN fixes the order) looks each value up in the index; "IN (SELECT ...)"
# would first copy the array into a temporary b-tree.
# Each row a statement returns is one sqlite3_step, and the sqlite3 module gives up
# the GIL around every step: on a loaded PS the reactor thread takes it each time,
# and the writer waits for it back.  So the accounts come back as one row (a JSON
# array) and the balances go in as one UPDATE, whatever their number.
_RUN_ACCOUNTS = ("SELECT json_group_array(json_array(a.number, a.balance, a.held, a.status))"
                 " FROM json_each(?) AS v CROSS JOIN accounts AS a ON a.number = v.value")
_RUN_KEYS = ("SELECT j.idempotency_key, j.id, j.debit, j.credit, j.amount,"
             " j.debit_balance_after, j.created FROM json_each(?) AS v"
             " CROSS JOIN journal AS j ON j.idempotency_key = v.value")
_RUN_INSERT = ("INSERT INTO journal (id, debit, credit, amount, kind, reference,"
               " idempotency_key, payer_signature, debit_balance_after, credit_balance_after,"
               " created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_JOURNAL_COLUMNS = _RUN_INSERT.count("?")

RUN_INSERT_ROWS = 32
"""Journal rows per INSERT of a run.  One multi-row INSERT is one sqlite3_step (one
release and retaking of the GIL, one set of cursors) where executemany takes one per
row; each row count up to this is one cached statement."""


@functools.cache
def _run_insert(rows: int) -> str:
    """_RUN_INSERT for *rows* rows."""
    one = "(" + ", ".join("?" * _JOURNAL_COLUMNS) + ")"
    return _RUN_INSERT.replace(one, ", ".join([one] * rows))


_RUN_BALANCES = ("UPDATE accounts SET balance = v.value ->> 0 FROM json_each(?) AS v"
                 " WHERE accounts.number = v.value ->> 1 AND accounts.balance = v.value ->> 2")


_json_decode = JSONDecoder().decode


def _json_strings(values: list[str]) -> str:
    """*values* as a JSON array: what json.dumps gives for strings, without its Python-level
    setup per call (a new encoder object each time), on the writer thread's GIL time."""
    return "[" + ",".join(map(encode_basestring_ascii, values)) + "]"


def _locked(exc: BaseException) -> bool:
    """SQLite's "busy" or "locked": another connection holds what we need, try again."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.OperationalError) and code is not None \
        and code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)


def _wal_mode(connection: sqlite3.Connection) -> str:
    """Switch to WAL, waiting up to BUSY_TIMEOUT_S for another process that holds the file.

    Two processes opening a fresh ledger at once race for it: the switch to WAL
    needs the file to itself and SQLite's busy handler does not always wait for
    it ("database is locked" at once), so it is tried again here.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            return connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if not _locked(exc) or time.monotonic() > deadline:
                raise
            time.sleep(WAL_RETRY_S)


class SQLiteStore(SQLStore):
    """The ledger in one SQLite file; see ``SQLStore`` for the rules."""

    dialect = "sqlite"

    def __init__(self, connection: sqlite3.Connection, clock: Callable[[], float] = time.time):
        super().__init__(connection, clock)
        self._x = connection.execute  # type: ignore[method-assign]  # the hot path, unwrapped

    @classmethod
    def open(cls, path: str, *, migrate: bool = True,
             clock: Callable[[], float] = time.time) -> SQLiteStore:
        """Open (creating if need be) the ledger at *path*, migrated to the newest schema."""
        if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
            raise LedgerError(f"SQLite {sqlite3.sqlite_version} is too old; the ledger needs "
                              f"{'.'.join(map(str, MIN_SQLITE_VERSION))} or newer")
        fresh = not os.path.exists(path)
        if fresh and migrate:
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        try:
            # Autocommit mode: the store issues BEGIN/COMMIT itself.  A connection
            # may be closed from another thread at shutdown, hence no thread check.
            connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                         check_same_thread=False,
                                         cached_statements=_STATEMENT_CACHE)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open the SQLite ledger {path}: {exc}") from exc
        try:
            if fresh:
                os.chmod(path, 0o600)  # it holds the devices' (encrypted) enrolment keys
            mode = _wal_mode(connection)
            if mode.lower() != "wal":
                raise LedgerError(f"{path}: SQLite refused WAL mode (got {mode})")
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute("PRAGMA foreign_keys=ON")
            # Statement journals and sorts in memory, not in a file made and unlinked in
            # /var/tmp for them (strace of a loaded PS: a dozen a second).  Neither outlives
            # its statement; crash safety is the WAL's.
            connection.execute("PRAGMA temp_store=MEMORY")
            store = cls(connection, clock)
            if migrate:
                _migrate(store)
        except BaseException:
            connection.close()
            raise
        return store

    def _begin_batch(self, ops: Sequence) -> None:
        # IMMEDIATE: take the write lock now, not at the first write (no upgrade deadlock).
        self._x("BEGIN IMMEDIATE")

    def _begin_migration(self) -> None:
        self._x("BEGIN IMMEDIATE")

    def _begin_snapshot(self) -> None:
        # A deferred transaction: its first read fixes the WAL snapshot.
        self._x("BEGIN")

    def _run_script(self, sql: str) -> None:
        """Run a migration file statement by statement, inside the caller's transaction.

        (``executescript`` would COMMIT first.)
        """
        pending = ""
        for line in sql.splitlines(keepends=True):
            pending += line
            if sqlite3.complete_statement(pending):
                self._x(pending)
                pending = ""
        if pending.strip() and not all(
                part.strip().startswith("--") or not part.strip() for part in pending.splitlines()):
            raise LedgerError(f"incomplete SQL statement at the end of a migration: {pending!r}")

    def _is_retryable(self, exc: BaseException) -> bool:
        return _locked(exc)

    def _update_account(self, sql: str, params: Sequence, number: str) -> tuple[int, int] | None:
        # Bare UPDATE + read back: cheaper than SQLite's RETURNING on the hot path.
        if self._x(sql, params).rowcount != 1:
            return None
        return self._x(_READ_BACK, (number,)).fetchone()

    # -- a run's statements (runs.py): the write lock is ours, so ids are too --
    def _read_accounts(self, numbers: list[str]) -> list[list]:
        (found,) = self._x(_RUN_ACCOUNTS, (_json_strings(numbers),)).fetchone()
        return _json_decode(found)

    def _read_keys(self, keys: list[str]) -> list[tuple]:
        return self._x(_RUN_KEYS, (_json_strings(keys),)).fetchall()

    def _insert_journal_rows(self, rows: list[tuple]) -> list[int]:
        (last,) = self._x("SELECT coalesce(max(id), 0) FROM journal").fetchone()
        ids = range(last + 1, last + 1 + len(rows))
        params: list = []
        for id_, row in zip(ids, rows):
            # The signature as a bytearray: the sqlite3 module binds bytes only after an
            # adaptation lookup that formats an AttributeError (~3,000 instructions).
            params.append(id_)
            params.extend(row[:6])
            params.append(row[6] if row[6] is None else bytearray(row[6]))
            params.extend(row[7:])
        step = RUN_INSERT_ROWS * _JOURNAL_COLUMNS
        for start in range(0, len(params), step):
            chunk = params[start:start + step]
            self._x(_run_insert(len(chunk) // _JOURNAL_COLUMNS), chunk)
        return list(ids)

    def _write_balances(self, writes: list[tuple[int, str, int]]) -> int:
        if not writes:
            return 0
        encode = encode_basestring_ascii
        changes = ",".join([f"[{new},{encode(number)},{old}]" for new, number, old in writes])
        return self._x(_RUN_BALANCES, ("[" + changes + "]",)).rowcount

    def _insert_journal(self, params: Sequence) -> int | None:
        cursor = self._x(_INSERT_JOURNAL, params)
        return cursor.lastrowid if cursor.rowcount == 1 else None

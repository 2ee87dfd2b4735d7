"""The production ledger: PostgreSQL through psycopg 3.

Several PS processes may share one database, so nothing here trusts memory:
the guarded UPDATEs and the UNIQUE idempotency key do the deciding, at READ
COMMITTED (PostgreSQL re-checks an UPDATE's WHERE on the newest row version
after waiting for its lock).  Two processes' batches would lock account rows
in different orders and deadlock (detected only after ``deadlock_timeout``,
1 s by default), so a batch first locks every account it will touch, sorted;
should a deadlock or lock timeout still happen, the batch is rolled back and
rerun (``SQLStore.run_batch``).  ``synchronous_commit`` is forced on for the
session: an acknowledged movement is on disk.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import psycopg
from psycopg import sql as pgsql

from mpay.ledger.api import LedgerError
from mpay.ledger.migrate import migrate as _migrate
from mpay.ledger.store import Op, SQLStore

CONNECT_TIMEOUT_S = 10
"""How long opening a connection may take before the store gives up."""

LOCK_TIMEOUT_MS = 5000
"""Longest wait for a row lock; past it the batch is rolled back and retried."""

PG_MAX_BATCH = 512
"""Group size on PostgreSQL.  A run of transfers takes no savepoints, so a group of
512 costs a few round trips; only the other operations, and a group redone the
careful way, take one SAVEPOINT (a subtransaction) each, and past 64 of them a
transaction overflows the per-backend subxid cache (PGPROC_MAX_CACHED_SUBXIDS):
slower, still correct."""

_READ_KEYS = ("SELECT idempotency_key, id, debit, credit, amount, debit_balance_after, created"
              " FROM journal WHERE idempotency_key = ANY(%s)")
_RUN_INSERT = ("INSERT INTO journal (debit, credit, amount, kind, reference, idempotency_key,"
               " payer_signature, debit_balance_after, credit_balance_after, created)"
               " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id")

MIGRATION_LOCK_KEY = 0x6D706179  # "mpay": advisory lock serialising schema migrations

_RETRYABLE_SQLSTATES = frozenset({
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available (lock_timeout)
})


class PostgresStore(SQLStore):
    """The ledger in one PostgreSQL schema; see ``SQLStore`` for the rules."""

    dialect = "postgres"
    max_batch = PG_MAX_BATCH

    def __init__(self, connection: psycopg.Connection, clock: Callable[[], float] = time.time):
        super().__init__(connection, clock)
        self._queries: dict[str, str] = {}

    @classmethod
    def open(cls, dsn: str, schema: str = "public", *, migrate: bool = True,
             clock: Callable[[], float] = time.time) -> PostgresStore:
        """Connect, select *schema* (created if missing when migrating), migrate."""
        try:
            connection = psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
        except psycopg.Error as exc:
            raise LedgerError(f"cannot connect to the PostgreSQL ledger: {exc}".strip()) from exc
        try:
            if migrate:  # under the migration lock: IF NOT EXISTS alone races another process
                with connection.transaction():
                    connection.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
                    connection.execute(pgsql.SQL("CREATE SCHEMA IF NOT EXISTS {}")
                                       .format(pgsql.Identifier(schema)))
            connection.execute(pgsql.SQL("SET search_path TO {}").format(pgsql.Identifier(schema)))
            connection.execute("SET synchronous_commit TO on")
            connection.execute(pgsql.SQL("SET lock_timeout TO {}")
                               .format(pgsql.Literal(LOCK_TIMEOUT_MS)))
            store = cls(connection, clock)
            if migrate:
                _migrate(store)
        except BaseException:
            connection.close()
            raise
        return store

    def _x(self, sql: str, params: Sequence = ()) -> Any:
        query = self._queries.get(sql)
        if query is None:
            assert "%" not in sql, sql  # would be read as a psycopg placeholder
            query = self._queries[sql] = sql.replace("?", "%s")
        return self._conn.execute(query, params or None)

    def _begin_batch(self, ops: Sequence[Op]) -> None:
        if len(ops) == 1:  # one operation locks its rows in a fixed order by itself
            self._control("BEGIN")
            return
        numbers: set[str] = set()
        holds: set[int] = set()
        sessions: set[int] = set()
        for name, args in ops:
            numbers.update(args[i] for i in self.OP_ACCOUNT_ARGS.get(name, ())
                           if isinstance(args[i], str))
            holds.update(args[i] for i in self.OP_HOLD_ARGS.get(name, ()) if type(args[i]) is int)
            sessions.update(args[i] for i in self.OP_SESSION_ARGS.get(name, ())
                            if type(args[i]) is int)
        self._control("BEGIN")
        # Rows are locked in the order the sort emits them: one global order.
        self._x("SELECT number FROM accounts WHERE number = ANY(?) OR number IN"
                " (SELECT account FROM holds WHERE id = ANY(?)) OR number IN"
                " (SELECT consumer FROM sessions WHERE id = ANY(?) UNION"
                "  SELECT merchant FROM sessions WHERE id = ANY(?)) ORDER BY number FOR UPDATE",
                (sorted(numbers), sorted(holds), sorted(sessions), sorted(sessions))).fetchall()

    # -- a run's statements (runs.py) --------------------------------------------
    def _read_accounts(self, numbers: list[str]) -> list[tuple]:
        # FOR UPDATE in number order: a batch of one was not locked up front.
        return self._x("SELECT number, balance, held, status FROM accounts"
                       " WHERE number = ANY(?) ORDER BY number FOR UPDATE", (numbers,)).fetchall()

    def _read_keys(self, keys: list[str]) -> list[tuple]:
        # Never prepared: a generic plan made while a fresh journal was small seq-scanned it
        # for every batch as it grew, until autovacuum's next ANALYZE (README, session 8).
        return self._conn.execute(_READ_KEYS, (keys,), prepare=False).fetchall()

    def _insert_journal_rows(self, rows: list[tuple]) -> list[int]:
        # executemany pipelines the rows: one round trip, whatever their number.
        with self._conn.cursor() as cursor:
            cursor.executemany(_RUN_INSERT, rows, returning=True)
            ids = []
            while True:
                ids.append(cursor.fetchone()[0])
                if not cursor.nextset():
                    return ids

    def _write_balances(self, writes: list[tuple[int, str, int]]) -> int:
        with self._conn.cursor() as cursor:
            cursor.executemany("UPDATE accounts SET balance = %s WHERE number = %s"
                               " AND balance = %s", writes)
            return cursor.rowcount

    def _control(self, *statements: str) -> None:
        # One round trip for all: a parameterless query may hold several statements.
        self._conn.execute("; ".join(statements))

    def _begin_snapshot(self) -> None:
        self._x("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def _begin_migration(self) -> None:
        self._x("BEGIN")
        self._x("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK_KEY,))

    def _run_script(self, sql: str) -> None:
        # No parameters: psycopg sends it as one simple query, several statements allowed.
        self._conn.execute(sql)

    def _is_retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, psycopg.Error) and exc.sqlstate in _RETRYABLE_SQLSTATES

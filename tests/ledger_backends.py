"""The two ledger backends every ledger suite runs against, and a store-level base.

``SQLiteBackend`` is a temp file per test; ``PostgresBackend`` a schema of its
own on the PostgreSQL at 127.0.0.1:5432 (database ``test``), dropped
afterwards.  PostgreSQL is used for real: unreachable, these tests fail.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import uuid

import psycopg
from psycopg import sql as pgsql

from mpay.ledger.api import Outcome
from mpay.ledger.postgres import PostgresStore
from mpay.ledger.sqlite import SQLiteStore

PG_DSN = os.environ.get("MPAY_TEST_POSTGRES_DSN",
                        "host=127.0.0.1 port=5432 dbname=test user=postgres")
PG_URL = "postgresql://{user}@{host}:{port}/{dbname}".format(
    **{"user": "postgres", "host": "127.0.0.1", "port": "5432", "dbname": "test",
       **psycopg.conninfo.conninfo_to_dict(PG_DSN)})
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

A, B, C = "+886912000001", "+886912000002", "+886912000003"
NOBODY = "+886912999999"
PUB = bytes(range(32))  # an Ed25519 public key is 32 bytes


class SQLiteBackend:
    """A fresh SQLite ledger file per test."""

    backend = "sqlite"

    def setUp(self):
        directory = self.mktemp()
        os.makedirs(directory)
        self.path = os.path.abspath(os.path.join(directory, "ledger.sqlite3"))
        super().setUp()

    def opener(self):
        return functools.partial(SQLiteStore.open, self.path)

    def dbArgs(self) -> list[str]:
        return ["--db", f"sqlite:{self.path}"]

    def raw(self, statement: str, params: tuple = ()) -> list[tuple]:
        """Run SQL behind the ledger's back (to corrupt it on purpose)."""
        connection = sqlite3.connect(self.path, isolation_level=None)
        try:
            return connection.execute(statement, params).fetchall()
        finally:
            connection.close()


class PostgresBackend:
    """A fresh PostgreSQL schema per test, dropped afterwards."""

    backend = "postgres"

    def setUp(self):
        self.schema = f"mpay_test_{uuid.uuid4().hex[:12]}"
        self.addCleanup(self._dropSchema)
        super().setUp()

    def _dropSchema(self):
        with psycopg.connect(PG_DSN, autocommit=True) as connection:
            connection.execute(pgsql.SQL("DROP SCHEMA IF EXISTS {} CASCADE")
                               .format(pgsql.Identifier(self.schema)))

    def opener(self):
        return functools.partial(PostgresStore.open, PG_DSN, self.schema)

    def dbArgs(self) -> list[str]:
        return ["--db", PG_URL, "--schema", self.schema]

    def raw(self, statement: str, params: tuple = ()) -> list[tuple]:
        with psycopg.connect(PG_DSN, autocommit=True) as connection:
            connection.execute(pgsql.SQL("SET search_path TO {}")
                               .format(pgsql.Identifier(self.schema)))
            cursor = connection.execute(statement.replace("?", "%s"), params)
            return cursor.fetchall() if cursor.description else []


class LedgerStoreMixin:
    """A synchronous store with three open accounts, and the helpers the rule suites share."""

    def setUp(self):
        super().setUp()
        self.store = self.opener()()
        self.addCleanup(self.store.close)
        for number in (A, B, C):
            self.assertTrue(self.store.open_account(number))

    def fund(self, number: str, amount: int) -> None:
        self.assertEqual(self.store.cash_in(number, amount, f"fund|{uuid.uuid4()}").outcome,
                         Outcome.COMMITTED)

    def available(self, number: str) -> int:
        return self.store.balance(number).available

    def journalRows(self) -> int:
        return self.raw("SELECT COUNT(*) FROM journal")[0][0]

    def assertAuditOK(self):
        report = self.store.audit()
        self.assertTrue(report.ok, report.format())
        return report

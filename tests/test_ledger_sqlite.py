"""What the SQLite ledger's writer asks of SQLite, and the migration that made it cheaper.

The writer's statements must not build temporary b-trees per execution (an
``IN`` list in a CHECK, ``IN (SELECT ...)``): ``EXPLAIN`` shows what SQLite
will do.  Migration 0004 respells the journal's kind CHECK in place; a ledger
made before it must come out with the same rows, the same rule, and every
connection, old or new, using the new definition.
"""

from __future__ import annotations

import os
import shutil
import sqlite3

from twisted.trial import unittest

from mpay.ledger import migrate
from mpay.ledger.api import Outcome
from mpay.ledger.sqlite import (
    _RUN_ACCOUNTS, _RUN_INSERT, _RUN_KEYS, RUN_INSERT_ROWS, SQLiteStore, _run_insert,
)
from tests.ledger_backends import SQLiteBackend

A, B = "+886912000001", "+886912000002"
ROW = (1, A, B, 1, "transfer", "", "k", None, 0, 0, 0.0)
BAD_KIND = ("INSERT INTO journal (debit, credit, amount, kind, reference, idempotency_key,"
            " debit_balance_after, credit_balance_after, created)"
            " VALUES (?, ?, 1, 'gift', '', 'bad-kind', 0, 0, 0)")


def opcodes(connection: sqlite3.Connection, sql: str, params: tuple) -> list[str]:
    return [row[1] for row in connection.execute("EXPLAIN " + sql, params)]


class WriterStatementTests(SQLiteBackend, unittest.TestCase):
    """The run's statements, as SQLite compiles them on a fresh ledger."""

    def setUp(self):
        super().setUp()
        self.store = SQLiteStore.open(self.path)
        self.addCleanup(self.store.close)

    def test_no_statement_of_a_run_builds_a_temporary_btree(self):
        for sql, params in ((_RUN_INSERT, ROW), (_run_insert(RUN_INSERT_ROWS),
                                                 ROW * RUN_INSERT_ROWS),
                            (_RUN_ACCOUNTS, ('["+886912000001"]',)), (_RUN_KEYS, ('["k"]',))):
            self.assertNotIn("OpenEphemeral", opcodes(self.store._conn, sql, params), sql)

    def test_statement_journals_and_sorts_stay_in_memory(self):
        # 2 = MEMORY: no file is made (and unlinked) in the temporary directory for them.
        self.assertEqual(self.store._conn.execute("PRAGMA temp_store").fetchone()[0], 2)

    def test_the_schema_still_refuses_an_unknown_kind(self):
        for number in (A, B):
            self.store.open_account(number)
        self.assertRaises(sqlite3.IntegrityError, self.raw, BAD_KIND, (A, B))
        self.assertEqual(self.raw("SELECT COUNT(*) FROM journal"), [(0,)])

    def test_a_run_longer_than_one_insert_journals_every_transfer_in_order(self):
        for number in (A, B):
            self.store.open_account(number)
        self.store.cash_in(A, 1000, "fund")
        count = 2 * RUN_INSERT_ROWS + 5
        signature = bytes(range(64))
        answers = self.store.run_batch([
            ("transfer", (A, B, 1 + index % 3, f"t{index}", "transfer", f"ref{index}",
                          signature if index % 2 else None)) for index in range(count)])
        self.assertEqual([a.outcome for a in answers], [Outcome.COMMITTED] * count)
        self.assertEqual([a.journal_id for a in answers], list(range(2, 2 + count)))
        entries = self.store.journal_page(after_id=1, limit=count)
        self.assertEqual([(e.id, e.idempotency_key, e.reference, e.amount, e.payer_signature)
                          for e in entries],
                         [(2 + i, f"t{i}", f"ref{i}", 1 + i % 3, signature if i % 2 else None)
                          for i in range(count)])
        self.assertEqual([e.debit_balance_after for e in entries],
                         [a.payer_balance_after for a in answers])
        self.assertEqual(self.store.balance(B).balance, sum(1 + i % 3 for i in range(count)))
        self.assertEqual(self.store.run_conflicts, 0)
        self.assertTrue(self.store.audit().ok)

    def test_lookups_find_each_distinct_value_once(self):
        for number in (A, B):
            self.store.open_account(number)
        self.assertEqual(self.store.cash_in(A, 5, "k1").outcome, Outcome.COMMITTED)
        self.assertEqual(sorted(map(tuple, self.store._read_accounts([A, B, "+886912999999"]))),
                         [(A, 5, 0, "active"), (B, 0, 0, "active")])
        self.assertEqual(self.store._read_accounts([]), [])
        [(key, *_)] = self.store._read_keys(["k1", "k2"])
        self.assertEqual(key, "k1")
        self.assertEqual(self.store._read_keys([]), [])

    def test_balances_are_written_in_one_statement_compare_and_set(self):
        for number in (A, B):
            self.store.open_account(number)
        self.store.cash_in(A, 5, "k1")
        self.store._x("BEGIN IMMEDIATE")
        # B's expected old balance is wrong: that row is left alone, and the count says so.
        self.assertEqual(self.store._write_balances([(3, A, 5), (9, B, 1)]), 1)
        self.assertEqual(self.store._write_balances([]), 0)
        self.store._x("ROLLBACK")
        self.assertEqual(self.store.balance(A).balance, 5)


class KindCheckMigrationTests(SQLiteBackend, unittest.TestCase):
    """A ledger at version 3 (the IN-list CHECK), upgraded by opening it."""

    def setUp(self):
        super().setUp()
        older = os.path.join(self.mktemp())
        os.makedirs(older)
        for item in migrate.migrations("sqlite"):
            if item.version <= 3:
                shutil.copy(item.path, older)
        store = SQLiteStore.open(self.path, migrate=False)
        migrate.migrate(store, directory=migrate.Path(older))
        for number in (A, B):
            store.open_account(number)
        store.cash_in(A, 100, "fund")
        store.transfer(A, B, 30, "t1")
        store.close()

    def refused_by(self, connection: sqlite3.Connection) -> str:
        """The CHECK that refuses a journal row of an unknown kind, as *connection* sees it."""
        with self.assertRaises(sqlite3.IntegrityError) as caught:
            connection.execute(BAD_KIND, (A, B))
        return str(caught.exception)

    def test_an_old_ledger_is_upgraded_with_its_rows_and_rule_intact(self):
        watcher = sqlite3.connect(self.path, isolation_level=None)  # open across the upgrade
        self.addCleanup(watcher.close)
        self.assertIn("kind IN (", self.refused_by(watcher))
        store = SQLiteStore.open(self.path)
        self.addCleanup(store.close)
        self.assertEqual(self.raw("SELECT MAX(version) FROM schema_version"),
                         [(migrate.latest_version("sqlite"),)])
        self.assertEqual(self.raw("PRAGMA integrity_check"), [("ok",)])
        self.assertNotIn("OpenEphemeral", opcodes(store._conn, _RUN_INSERT, ROW))
        for connection in (store._conn, watcher):
            self.assertIn("kind = 'transfer' OR kind = 'cash_in'", self.refused_by(connection))
        self.assertEqual([entry.idempotency_key for entry in store.journal_page()],
                         ["fund", "t1"])
        self.assertEqual(store.balance(B).balance, 30)
        self.assertEqual(store.transfer(A, B, 5, "t2").outcome, Outcome.COMMITTED)
        self.assertTrue(store.audit().ok)

"""mpay-admin, as an operator runs it, against SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import csv
import io
import os

from twisted.trial import unittest

from mpay.cli.admin import EXIT_OK, EXIT_REFUSED, EXIT_UNAVAILABLE, EXIT_USAGE, main
from tests.ledger_backends import PG_DSN, PostgresBackend, SQLiteBackend

A, B = "+886912000001", "+886912000002"


class AdminMixin:
    def admin(self, *argv: str, db: list[str] | None = None) -> tuple[int, str, str]:
        """Run mpay-admin; its exit status, stdout and stderr."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main([*(self.dbArgs() if db is None else db), *argv])
        return status, out.getvalue(), err.getvalue()

    def assertAdmin(self, *argv: str, status: int = EXIT_OK) -> str:
        code, out, err = self.admin(*argv)
        self.assertEqual(code, status, (argv, out, err))
        self.assertNotIn("Traceback", out + err)
        return out if status == EXIT_OK else out + err

    def test_create_topup_pay_out_and_audit(self):
        self.assertIn(f"created {A}", self.assertAdmin("create", A))
        self.assertIn("already exists", self.assertAdmin("create", A))
        out = self.assertAdmin("topup", A, "5000", "--key", "till-1", "--reference", "cash desk")
        self.assertIn("committed: journal", out)
        self.assertIn(f"balance of {A}: 5000", out)
        self.assertIn("already done", self.assertAdmin("topup", A, "5000", "--key", "till-1"))
        self.assertIn("refused (insufficient)", self.assertAdmin("cashout", A, "5001",
                                                                status=EXIT_REFUSED))
        self.assertAdmin("cashout", A, "1200")
        self.assertEqual(self.assertAdmin("balance", A).strip(),
                         f"{A} balance=3800 held=0 available=3800 status=active")
        self.assertIn("balance=-3800", self.assertAdmin("balance", "settlement"))
        self.assertIn("audit OK", self.assertAdmin("audit"))

    def test_statement_as_csv(self):
        self.assertAdmin("create", A)
        self.assertAdmin("topup", A, "700", "--key", "k1", "--reference", "first")
        self.assertAdmin("cashout", A, "200", "--key", "k2")
        rows = list(csv.DictReader(io.StringIO(self.assertAdmin("statement", A, "--csv"))))
        self.assertEqual([(r["kind"], r["counterparty"], r["amount"], r["balance_after"],
                           r["idempotency_key"]) for r in rows],
                         [("cash_out", "settlement", "-200", "500", "k2"),
                          ("cash_in", "settlement", "700", "700", "k1")])
        self.assertIn("movements: 2", self.assertAdmin("statement", A))

    def test_blocked_account_refuses_top_up(self):
        self.assertAdmin("create", A)
        self.assertIn(f"blocked {A}", self.assertAdmin("block", A))
        self.assertIn("payee is blocked", self.assertAdmin("topup", A, "10", status=EXIT_REFUSED))
        self.assertAdmin("unblock", A)
        self.assertAdmin("topup", A, "10")

    def test_audit_exits_nonzero_when_a_balance_was_changed_behind_its_back(self):
        self.assertAdmin("create", A)
        self.assertAdmin("create", B)
        self.assertAdmin("topup", A, "1000")
        self.raw("UPDATE accounts SET balance = balance + 7 WHERE number = ?", (B,))
        out = self.assertAdmin("audit", status=EXIT_REFUSED)
        self.assertIn("audit FAILED", out)
        self.assertIn(f"{B}: balance 7 but the journal says 0", out)

    def test_user_errors_are_one_line_and_exit_2(self):
        self.assertAdmin("create", A)
        for argv in (("topup", A, "1.50"), ("topup", A, "0"), ("topup", A, "-5"),
                     ("topup", A, "99999999999999999"), ("create", "0912345678"),
                     ("create", "+886 912"), ("statement", A, "--limit", "0"), ("frobnicate",)):
            status, out, err = self.admin(*argv)
            self.assertEqual(status, EXIT_USAGE, (argv, out, err))
            self.assertNotIn("Traceback", err)
            self.assertTrue(err.strip(), argv)

    def test_unknown_account_exits_1(self):
        self.assertAdmin("create", A)
        self.assertIn("no account +886912999999",
                      self.assertAdmin("balance", "+886912999999", status=EXIT_REFUSED))
        self.assertIn("no account", self.assertAdmin("block", "+886912999999",
                                                     status=EXIT_REFUSED))


class SQLiteAdminTests(SQLiteBackend, AdminMixin, unittest.TestCase):
    def test_config_file_names_the_ledger(self):
        config = self.mktemp()
        with open(config, "w") as handle:
            handle.write(f"[server]\nrole = all\n\n[ledger]\nbackend = sqlite\n"
                         f"sqlite_path = {self.path}\n")
        status, out, err = self.admin("create", A, db=["--config", config])
        self.assertEqual((status, err), (EXIT_OK, ""))
        self.assertIn("status=active", self.assertAdmin("balance", A))

    def test_a_missing_database_is_not_created_by_a_query(self):
        status, out, err = self.admin("audit")
        self.assertEqual(status, EXIT_UNAVAILABLE)
        self.assertIn("no ledger database", err)
        self.assertFalse(os.path.exists(self.path))

    def test_bad_database_options(self):
        for db in (["--db", "mysql://x"], ["--db", "sqlite:"], ["--db", f"sqlite:{self.path}",
                                                                "--schema", "s"],
                   ["--config", "/nonexistent/mpay.ini"]):
            status, out, err = self.admin("audit", db=db)
            self.assertEqual(status, EXIT_USAGE, (db, err))
            self.assertTrue(err.startswith("mpay-admin: "), err)


class PostgresAdminTests(PostgresBackend, AdminMixin, unittest.TestCase):
    def test_config_file_names_the_ledger(self):
        config = self.mktemp()
        with open(config, "w") as handle:
            handle.write(f"[ledger]\nbackend = postgres\npostgres_dsn = {PG_DSN}\n"
                         f"postgres_schema = {self.schema}\n")
        status, out, err = self.admin("create", A, db=["--config", config])
        self.assertEqual((status, err), (EXIT_OK, ""))
        self.assertIn("status=active", self.assertAdmin("balance", A))

    def test_a_schema_without_a_ledger_is_refused(self):
        status, out, err = self.admin("audit")
        self.assertEqual(status, EXIT_UNAVAILABLE)
        self.assertIn("holds no ledger", err)

    def test_an_unreachable_server_exits_3(self):
        status, out, err = self.admin("audit", db=["--db", "postgresql://postgres@127.0.0.1:1/x"])
        self.assertEqual(status, EXIT_UNAVAILABLE)
        self.assertIn("cannot connect", err)

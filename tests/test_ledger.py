"""The ledger's rules, one suite run against SQLite and PostgreSQL.

``LedgerRulesMixin`` walks every rule on the synchronous store (the holds of
charged-by-time sessions are in ``test_ledger_holds``) and
``LedgerModelMixin`` checks random operation sequences against a model.  Each
runs twice, through ``SQLiteBackend`` (a temp file) and ``PostgresBackend``
(a schema of its own, dropped afterwards).  PostgreSQL is used for real: if it
is unreachable these tests fail, they do not skip.  The writer thread, the
service's Deferreds, crashes and load are in ``test_ledger_concurrency``.
"""

from __future__ import annotations

import uuid
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from mpay.ledger import migrate
from mpay.ledger.api import (
    MAX_AMOUNT_MINOR, SETTLEMENT, InvalidNumber, LedgerError, Outcome, UnknownAccount,
    sip_idempotency_key,
)
from tests.ledger_backends import (
    A, B, C, NOBODY, PUB, LedgerStoreMixin, PostgresBackend, SQLiteBackend,
)


class LedgerRulesMixin(LedgerStoreMixin):
    """Every rule of the ledger, on the synchronous store."""

    # -- accounts -------------------------------------------------------------

    def test_open_account_creates_once(self):
        self.assertFalse(self.store.open_account(A))
        self.assertEqual(self.store.balance(A), (0, 0, 0, "active"))

    def test_open_account_refuses_what_is_not_e164(self):
        for bad in ("886912000004", "+0912000004", "+12345", "+1234567890123456", 886912000004,
                    "+88691200000a", "", "+886912000004\n", "+\u0668\u0668\u0666912000004"):
            self.assertRaises(InvalidNumber, self.store.open_account, bad)
        self.assertEqual(self.raw("SELECT COUNT(*) FROM accounts")[0][0], 4)

    def test_balance_of_unknown_account_raises(self):
        self.assertRaises(UnknownAccount, self.store.balance, NOBODY)
        self.assertRaises(UnknownAccount, self.store.statement, NOBODY)

    def test_cash_in_comes_from_settlement_which_alone_goes_negative(self):
        result = self.store.cash_in(A, 1000, "topup-1", reference="counter 7")
        self.assertEqual((result.outcome, result.payer, result.payee, result.payer_balance_after),
                         (Outcome.COMMITTED, SETTLEMENT, A, -1000))
        self.assertEqual(self.store.balance(SETTLEMENT).balance, -1000)
        self.assertEqual(self.store.balance(A).balance, 1000)
        self.assertEqual(self.assertAuditOK().total_balance, 0)

    # -- transfers ----------------------------------------------------------

    def test_transfer_moves_money_and_journals_it(self):
        self.fund(A, 1000)
        result = self.store.transfer(A, B, 300, "+886912000001|call-1|1", reference="coffee",
                                     payer_signature=b"\x01" * 64)
        self.assertEqual(result.outcome, Outcome.COMMITTED)
        self.assertEqual((result.payer, result.payee, result.amount, result.payer_balance_after),
                         (A, B, 300, 700))
        self.assertEqual((self.available(A), self.available(B)), (700, 300))
        [entry, _funding] = self.store.statement(A)
        self.assertEqual((entry.id, entry.debit, entry.credit, entry.amount, entry.kind,
                          entry.reference, entry.payer_signature, entry.debit_balance_after,
                          entry.credit_balance_after, entry.created),
                         (result.journal_id, A, B, 300, "transfer", "coffee", b"\x01" * 64, 700,
                          300, result.created))
        self.assertAuditOK()

    def test_transfer_of_exactly_the_available_balance(self):
        self.fund(A, 500)
        self.assertEqual(self.store.transfer(A, B, 501, "k1").outcome, Outcome.INSUFFICIENT)
        self.assertEqual(self.store.transfer(A, B, 500, "k2").outcome, Outcome.COMMITTED)
        self.assertEqual(self.available(A), 0)

    def test_insufficient_credit_changes_nothing(self):
        self.fund(A, 100)
        rows = self.journalRows()
        result = self.store.transfer(A, B, 101, "k1")
        self.assertEqual((result.outcome, result.journal_id), (Outcome.INSUFFICIENT, None))
        self.assertEqual((self.available(A), self.available(B), self.journalRows()),
                         (100, 0, rows))

    def test_unknown_payee_and_payer(self):
        self.fund(A, 100)
        self.assertEqual(self.store.transfer(A, NOBODY, 10, "k1").outcome, Outcome.UNKNOWN_PAYEE)
        self.assertEqual(self.store.transfer(NOBODY, A, 10, "k2").outcome, Outcome.UNKNOWN_PAYER)
        self.assertEqual(self.available(A), 100)

    def test_unknown_payee_is_reported_before_insufficient_credit(self):
        self.assertEqual(self.store.transfer(A, NOBODY, 10, "k1").outcome, Outcome.UNKNOWN_PAYEE)

    def test_blocked_accounts_can_neither_pay_nor_be_paid(self):
        self.fund(A, 100)
        self.fund(B, 100)
        self.store.block(A)
        self.assertEqual(self.store.balance(A).status, "blocked")
        paying = self.store.transfer(A, B, 10, "k1")
        paid = self.store.transfer(B, A, 10, "k2")
        self.assertEqual((paying.outcome, paying.detail), (Outcome.BLOCKED, "payer is blocked"))
        self.assertEqual((paid.outcome, paid.detail), (Outcome.BLOCKED, "payee is blocked"))
        self.assertEqual(self.store.cash_out(A, 10, "k3").outcome, Outcome.BLOCKED)
        self.assertEqual(self.store.place_hold(A, 10, "s").outcome, Outcome.BLOCKED)
        self.assertEqual((self.available(A), self.available(B)), (100, 100))
        self.store.unblock(A)
        self.assertEqual(self.store.transfer(A, B, 10, "k1").outcome, Outcome.COMMITTED)

    def test_block_unknown_or_settlement_raises(self):
        self.assertRaises(UnknownAccount, self.store.block, NOBODY)
        self.assertRaises(UnknownAccount, self.store.unblock, NOBODY)
        self.assertRaises(LedgerError, self.store.block, SETTLEMENT)

    def test_repeated_key_replays_the_original_and_debits_once(self):
        self.fund(A, 1000)
        key = sip_idempotency_key(A, "call-9@198.51.100.7", 1)
        self.assertEqual(key, "+886912000001|call-9@198.51.100.7|1")
        first = self.store.transfer(A, B, 300, key)
        again = self.store.transfer(A, B, 300, key)
        self.assertEqual(again.outcome, Outcome.DUPLICATE)
        self.assertEqual(again._replace(outcome=Outcome.COMMITTED), first)
        self.assertEqual((self.available(A), self.available(B)), (700, 300))

    def test_repeated_key_with_other_details_still_answers_the_original(self):
        self.fund(A, 1000)
        first = self.store.transfer(A, B, 300, "k")
        other = self.store.transfer(A, C, 5, "k")
        self.assertEqual((other.outcome, other.journal_id, other.payee, other.amount),
                         (Outcome.DUPLICATE, first.journal_id, B, 300))
        self.assertEqual(self.available(C), 0)

    def test_repeated_key_is_replayed_even_when_the_payer_is_now_short(self):
        self.fund(A, 300)
        first = self.store.transfer(A, B, 300, "k")
        again = self.store.transfer(A, B, 300, "k")
        self.assertEqual((again.outcome, again.journal_id), (Outcome.DUPLICATE, first.journal_id))

    def test_a_refusal_is_not_recorded_so_a_retry_after_top_up_commits(self):
        self.fund(A, 100)
        self.assertEqual(self.store.transfer(A, B, 200, "k").outcome, Outcome.INSUFFICIENT)
        self.fund(A, 100)
        self.assertEqual(self.store.transfer(A, B, 200, "k").outcome, Outcome.COMMITTED)
        self.assertEqual(self.store.transfer(A, B, 200, "k").outcome, Outcome.DUPLICATE)

    def test_invalid_amounts_are_refused_before_anything_moves(self):
        self.fund(A, 1000)
        rows = self.journalRows()
        for bad in (0, -1, True, False, 1.5, 10.0, Decimal("10"), "10", None,
                    MAX_AMOUNT_MINOR + 1, 10**30):
            result = self.store.transfer(A, B, bad, f"k{bad!r}")
            self.assertEqual(result.outcome, Outcome.INVALID, bad)
            self.assertTrue(result.detail)
        self.assertEqual((self.available(A), self.journalRows()), (1000, rows))

    def test_largest_amount_is_accepted(self):
        self.assertEqual(self.store.cash_in(A, MAX_AMOUNT_MINOR, "k").outcome, Outcome.COMMITTED)

    def test_payer_and_payee_must_differ(self):
        self.fund(A, 100)
        self.assertEqual(self.store.transfer(A, A, 10, "k").outcome, Outcome.INVALID)

    def test_malformed_key_kind_reference_or_signature_are_invalid(self):
        self.fund(A, 100)
        for kwargs in ({"idempotency_key": ""}, {"idempotency_key": None},
                       {"idempotency_key": "k" * 513}, {"kind": "gift"},
                       {"reference": "r" * 1025}, {"payer_signature": "not bytes"},
                       {"payer_signature": b"s" * 513}):
            arguments = {"idempotency_key": "k", **kwargs}
            self.assertEqual(self.store.transfer(A, B, 10, **arguments).outcome,
                             Outcome.INVALID, kwargs)

    def test_settlement_moves_only_by_cash_in_and_cash_out(self):
        self.fund(A, 100)
        self.assertEqual(self.store.transfer(SETTLEMENT, A, 10, "k1").outcome, Outcome.INVALID)
        self.assertEqual(self.store.transfer(A, SETTLEMENT, 10, "k2").outcome, Outcome.INVALID)
        self.assertEqual(self.store.transfer(A, B, 10, "k3", kind="cash_in").outcome,
                         Outcome.INVALID)

    def test_cash_out_is_limited_to_the_available_balance(self):
        self.fund(A, 100)
        self.assertEqual(self.store.cash_out(A, 101, "k1").outcome, Outcome.INSUFFICIENT)
        result = self.store.cash_out(A, 60, "k2")
        self.assertEqual((result.outcome, result.payee, result.payer_balance_after),
                         (Outcome.COMMITTED, SETTLEMENT, 40))
        self.assertEqual(self.store.balance(SETTLEMENT).balance, -40)
        self.assertAuditOK()

    def test_journal_pages_cover_the_journal_in_id_order(self):
        self.store.cash_in(A, 1000, "k1")
        for index in range(5):
            self.store.transfer(A, B, 10, f"t{index}")
        first = self.store.journal_page(0, 4)
        rest = self.store.journal_page(first[-1].id, 4)
        ids = [entry.id for entry in first + rest]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(len(ids), 6)
        self.assertEqual(self.store.journal_page(ids[-1], 4), [])
        with self.assertRaises(ValueError):
            self.store.journal_page(0, 0)

    def test_statement_is_newest_first_and_limited(self):
        self.fund(A, 1000)
        ids = [self.store.transfer(A, B, 10 + i, f"k{i}").journal_id for i in range(5)]
        entries = self.store.statement(A, 3)
        self.assertEqual([entry.id for entry in entries], ids[::-1][:3])
        self.assertEqual([entry.debit_balance_after for entry in entries], [940, 954, 967])
        self.assertEqual(len(self.store.statement(B)), 5)
        self.assertRaises(ValueError, self.store.statement, A, 0)

    # -- device keys --------------------------------------------------------

    def test_device_keys_are_stored_and_replaced(self):
        self.assertIsNone(self.store.device_key(A))
        self.store.store_device_key(A, b"sealed-K-1", PUB)
        self.store.store_device_key(A, b"sealed-K-2", PUB[::-1])
        key = self.store.device_key(A)
        self.assertEqual((key.number, key.encrypted_k, key.ed25519_pub),
                         (A, b"sealed-K-2", PUB[::-1]))
        self.assertRaises(ValueError, self.store.store_device_key, A, b"k", b"short")
        self.assertRaises(InvalidNumber, self.store.store_device_key, "12", b"k", PUB)

    # -- the schema guards too -----------------------------------------------

    def test_schema_refuses_a_negative_user_balance_written_behind_its_back(self):
        self.assertRaises(Exception, self.raw,
                          "UPDATE accounts SET balance = -1 WHERE number = ?", (A,))

    def test_schema_refuses_a_second_row_with_the_same_key(self):
        self.fund(A, 100)
        self.store.transfer(A, B, 10, "k")
        self.assertRaises(Exception, self.raw,
                          "INSERT INTO journal (debit, credit, amount, kind, reference,"
                          " idempotency_key, debit_balance_after, credit_balance_after, created)"
                          " VALUES (?, ?, 10, 'transfer', '', 'k', 0, 0, 0)", (A, B))

    def test_migrations_apply_once(self):
        again = self.opener()()
        again.close()
        self.assertEqual(self.raw("SELECT version, name FROM schema_version ORDER BY version"),
                         [(m.version, m.name) for m in migrate.migrations(self.backend)])
        self.assertEqual([m.version for m in migrate.migrations("sqlite")],
                         [m.version for m in migrate.migrations("postgres")])

    # -- one batch, many operations ------------------------------------------

    def test_one_failing_operation_does_not_undo_the_others_in_its_batch(self):
        self.fund(A, 100)
        results = self.store.run_batch([
            ("transfer", (A, B, 10, "k1", "transfer", "", None)),
            ("set_status", (NOBODY, "blocked")),
            ("transfer", (A, B, 1000, "k2", "transfer", "", None)),
            ("transfer", (A, C, 20, "k3", "transfer", "", None)),
            ("transfer", (A, C, 20, "k3", "transfer", "", None)),
        ])
        self.assertEqual(results[0].outcome, Outcome.COMMITTED)
        self.assertIsInstance(results[1], UnknownAccount)
        self.assertEqual(results[2].outcome, Outcome.INSUFFICIENT)
        self.assertEqual(results[3].outcome, Outcome.COMMITTED)
        self.assertEqual((results[4].outcome, results[4].journal_id),
                         (Outcome.DUPLICATE, results[3].journal_id))
        self.assertEqual((self.available(A), self.available(B), self.available(C)), (70, 10, 20))
        self.assertAuditOK()

    def test_a_database_error_inside_one_operation_spares_the_rest_of_its_batch(self):
        self.fund(A, 100)
        self.store._op_boom = lambda: self.store._x("SELECT no_such_column FROM accounts")
        first, boom, last = self.store.run_batch([
            ("transfer", (A, B, 10, "k1", "transfer", "", None)), ("boom", ()),
            ("transfer", (A, C, 20, "k2", "transfer", "", None))])
        self.assertIsInstance(boom, Exception)
        self.assertEqual((first.outcome, last.outcome), (Outcome.COMMITTED, Outcome.COMMITTED))
        self.assertEqual((self.available(A), self.available(B), self.available(C)), (70, 10, 20))

    # -- audit ---------------------------------------------------------------

    def test_audit_passes_after_everything(self):
        self.fund(A, 5000)
        self.store.transfer(A, B, 700, "k1")
        self.store.transfer(B, C, 200, "k2")
        self.store.cash_out(C, 50, "k3")
        hold = self.store.place_hold(A, 1000, "s1").hold_id
        self.store.settle_hold(hold, 400, C, "k4")
        self.store.place_hold(B, 100, "s2")
        report = self.assertAuditOK()
        self.assertEqual((report.accounts, report.journal_rows, report.active_holds,
                          report.settlement_balance), (4, 5, 1, -4950))
        self.assertIn("audit OK", report.format())

    def test_audit_fails_when_a_balance_is_changed_behind_its_back(self):
        self.fund(A, 500)
        self.raw("UPDATE accounts SET balance = balance + 1 WHERE number = ?", (B,))
        report = self.store.audit()
        self.assertFalse(report.ok)
        self.assertIn("balances sum to 1, not 0", report.problems)
        self.assertIn(f"{B}: balance 1 but the journal says 0", report.problems)
        self.assertIn("FAILED", report.format())

    def test_audit_fails_when_held_disagrees_with_the_holds(self):
        self.fund(A, 500)
        self.store.place_hold(A, 100, "s1")
        self.raw("UPDATE accounts SET held = 50 WHERE number = ?", (A,))
        report = self.store.audit()
        self.assertEqual(report.problems, (f"{A}: held 50 but active holds sum to 100",))


ACCOUNT = st.integers(0, 2)
SMALL_AMOUNT = st.integers(0, 1500)
KEY = st.integers(0, 4)  # a small pool, so keys are reused
OPERATIONS = st.lists(st.one_of(
    st.tuples(st.just("cash_in"), ACCOUNT, SMALL_AMOUNT),
    st.tuples(st.just("cash_out"), ACCOUNT, SMALL_AMOUNT, KEY),
    st.tuples(st.just("transfer"), ACCOUNT, ACCOUNT, SMALL_AMOUNT, KEY),
    st.tuples(st.just("block"), ACCOUNT), st.tuples(st.just("unblock"), ACCOUNT),
    st.tuples(st.just("hold"), ACCOUNT, SMALL_AMOUNT),
    st.tuples(st.just("settle"), st.integers(0, 3), SMALL_AMOUNT, ACCOUNT, KEY),
    st.tuples(st.just("release"), st.integers(0, 3)),
), min_size=5, max_size=40)
MODEL_FUNDS_MINOR = 1000  # each account's starting balance: amounts above are sometimes short


class LedgerModelMixin:
    """Random operation sequences against a model of what each outcome must mean."""

    @settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.differing_executors])  # one per backend
    @given(OPERATIONS)
    def test_random_operations_keep_the_books(self, operations):
        store = self.store
        numbers = [f"+8869{uuid.uuid4().int % 10**8:08d}" for _ in range(3)]
        for number in numbers:
            store.open_account(number)
            store.cash_in(number, MODEL_FUNDS_MINOR, f"fund|{number}")
        balance, held = [MODEL_FUNDS_MINOR] * 3, [0, 0, 0]
        blocked, holds, used = [False] * 3, [], {}
        prefix = uuid.uuid4().hex

        def moved(result, payer, payee, amount, key, settling=False):
            """Check a movement's outcome against the model, then apply it."""
            if result.outcome is Outcome.DUPLICATE:
                self.assertEqual(result.journal_id, used[key])
            elif result.outcome is Outcome.COMMITTED:
                self.assertNotIn(key, used)
                if payer is not None:
                    self.assertFalse(blocked[payer] and not settling)  # a hold is still paid
                    balance[payer] -= amount
                if payee is not None:
                    self.assertFalse(blocked[payee] and amount)  # a zero charge pays no one
                    balance[payee] += amount
                if result.journal_id is not None:
                    used[key] = result.journal_id
            elif result.outcome is Outcome.INSUFFICIENT:
                self.assertLess(balance[payer] - held[payer], amount)
            elif result.outcome is Outcome.BLOCKED:
                self.assertTrue(any(blocked[i] for i in (payer, payee) if i is not None))
            else:
                self.assertIn(result.outcome, (Outcome.INVALID, Outcome.NO_HOLD))

        for op, *args in operations:
            if op == "cash_in":
                key = f"{prefix}|in|{len(used)}|{args}"
                moved(store.cash_in(numbers[args[0]], args[1], key), None, args[0], args[1], key)
            elif op == "cash_out":
                key = f"{prefix}|k{args[2]}"
                moved(store.cash_out(numbers[args[0]], args[1], key), args[0], None, args[1], key)
            elif op == "transfer":
                i, j, amount, key = args[0], args[1], args[2], f"{prefix}|k{args[3]}"
                result = store.transfer(numbers[i], numbers[j], amount, key)
                self.assertTrue(i != j or result.outcome is Outcome.INVALID)
                moved(result, i, j, amount, key)
            elif op in ("block", "unblock"):
                getattr(store, op)(numbers[args[0]])
                blocked[args[0]] = op == "block"
            elif op == "hold":
                result = store.place_hold(numbers[args[0]], args[1], "session")
                if result.ok:
                    held[args[0]] += args[1]
                    holds.append([result.hold_id, args[0], args[1], True])
            elif holds and op == "settle":
                hold = holds[args[0] % len(holds)]
                key = f"{prefix}|s{args[3]}"
                result = store.settle_hold(hold[0], args[1], numbers[args[2]], key)
                if result.outcome is Outcome.COMMITTED:
                    self.assertTrue(hold[3] and args[1] <= hold[2])
                    held[hold[1]] -= hold[2]
                    hold[3] = False
                moved(result, hold[1], args[2], args[1], key, settling=True)
            elif holds and op == "release":
                hold = holds[args[0] % len(holds)]
                self.assertEqual(store.release_hold(hold[0]), hold[3])
                if hold[3]:
                    held[hold[1]] -= hold[2]
                    hold[3] = False
            for index, number in enumerate(numbers):
                self.assertEqual(store.balance(number)[:2], (balance[index], held[index]))
        self.assertTrue(store.audit().ok, store.audit().format())


class SQLiteLedgerTests(SQLiteBackend, LedgerRulesMixin, LedgerModelMixin, unittest.TestCase):
    pass


class PostgresLedgerTests(PostgresBackend, LedgerRulesMixin, LedgerModelMixin,
                          unittest.TestCase):
    pass

"""Sessions charged by time in the ledger: one hold per consumer, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid

from twisted.trial import unittest

from mpay.ledger.api import SESSIONS_HOLD_REF, Outcome
from mpay.ledger.sessions import settlement_key
from tests.ledger_backends import (
    A, B, C, NOBODY, LedgerStoreMixin, PostgresBackend, SQLiteBackend,
)

OWNER = "ps-test"
DIALOG = '{"merchant": {}, "consumer": {}}'


class SessionRulesMixin(LedgerStoreMixin):
    def fund(self, number: str, amount: int) -> None:
        self.assertTrue(self.store.cash_in(number, amount, f"fund|{uuid.uuid4()}").ok)

    def open(self, consumer=A, merchant=B, rate=2, ref=None, owner=OWNER):
        return self.store.open_session(consumer, merchant, rate, ref or uuid.uuid4().hex, owner,
                                       DIALOG)

    def assertAuditOK(self):
        report = self.store.audit()
        self.assertTrue(report.ok, report.format())

    def test_a_session_holds_everything_available_so_a_transfer_cannot_spend_it(self):
        self.fund(A, 1000)
        self.assertTrue(self.store.transfer(A, C, 100, "before").ok)
        opened = self.open()
        self.assertEqual((opened.outcome, opened.unspent), (Outcome.COMMITTED, 900))
        self.assertEqual(self.store.balance(A), (900, 900, 0, "active"))
        self.assertEqual(self.store.transfer(A, C, 1, "during").outcome, Outcome.INSUFFICIENT)
        self.assertEqual(self.store.cash_out(A, 1, "out").outcome, Outcome.INSUFFICIENT)
        self.assertAuditOK()

    def test_sessions_of_one_consumer_share_one_hold_and_new_money_joins_it(self):
        self.fund(A, 1000)
        first = self.open(merchant=B)
        self.fund(A, 500)  # a top-up during the session stays free until the next session
        self.assertEqual(self.store.balance(A).available, 500)
        second = self.open(merchant=C, rate=5)
        self.assertEqual(second.hold_id, first.hold_id)
        self.assertEqual(second.unspent, 1500)
        self.assertEqual(self.store.balance(A), (1500, 1500, 0, "active"))
        self.assertEqual(len(self.store.open_sessions(OWNER)), 2)
        self.assertAuditOK()

    def test_settling_moves_the_charge_and_the_last_session_releases_the_rest(self):
        self.fund(A, 1000)
        first, second = self.open(merchant=B), self.open(merchant=C)
        settled = self.store.settle_session(first.session_id, 300)
        self.assertEqual((settled.outcome, settled.charged, settled.unspent),
                         (Outcome.COMMITTED, 300, 700))
        self.assertIsNotNone(settled.journal_id)
        self.assertEqual(self.store.balance(A), (700, 700, 0, "active"))
        self.assertEqual(self.store.balance(B).balance, 300)
        self.assertAuditOK()
        last = self.store.settle_session(second.session_id, 200)
        self.assertEqual((last.charged, last.unspent), (200, 0))
        self.assertEqual(self.store.balance(A), (500, 0, 500, "active"))
        self.assertEqual(self.store.balance(C).balance, 200)
        self.assertEqual(self.store.hold(first.hold_id).status, "settled")
        self.assertEqual(self.store.open_sessions(), [])
        [entry] = [row for row in self.store.statement(C) if row.kind == "session"]
        self.assertEqual((entry.debit, entry.amount), (A, 200))
        self.assertTrue(entry.idempotency_key.startswith(settlement_key("")))
        self.assertAuditOK()

    def test_a_session_is_charged_once(self):
        self.fund(A, 1000)
        opened = self.open()
        first = self.store.settle_session(opened.session_id, 250)
        again = self.store.settle_session(opened.session_id, 999)
        self.assertEqual(again.outcome, Outcome.DUPLICATE)
        self.assertEqual((again.charged, again.journal_id), (250, first.journal_id))
        self.assertEqual(self.store.balance(A).balance, 750)
        self.assertEqual(self.store.settle_session(999_999, 1).outcome, Outcome.NO_HOLD)
        self.assertAuditOK()

    def test_reopening_the_same_dialog_is_the_same_session(self):
        self.fund(A, 1000)
        first = self.open(ref="merchant|call-1")
        again = self.open(ref="merchant|call-1")
        self.assertEqual((again.outcome, again.session_id), (Outcome.DUPLICATE, first.session_id))
        self.assertEqual(len(self.store.open_sessions()), 1)

    def test_a_charge_above_what_the_hold_has_is_refused_and_the_session_kept(self):
        self.fund(A, 1000)
        first, second = self.open(), self.open(merchant=C)
        self.store.settle_session(first.session_id, 900)
        refused = self.store.settle_session(second.session_id, 101)
        self.assertEqual((refused.outcome, refused.unspent), (Outcome.INVALID, 100))
        self.assertEqual(len(self.store.open_sessions()), 1)
        self.assertEqual(self.store.settle_session(second.session_id, 100).unspent, 0)
        self.assertEqual(self.store.balance(A), (0, 0, 0, "active"))
        self.assertAuditOK()

    def test_a_zero_charge_moves_nothing_and_writes_no_journal_row(self):
        self.fund(A, 1000)
        rows = len(self.store.statement(A))
        settled = self.store.settle_session(self.open().session_id, 0)
        self.assertEqual((settled.outcome, settled.journal_id), (Outcome.COMMITTED, None))
        self.assertEqual(len(self.store.statement(A)), rows)
        self.assertEqual(self.store.balance(A), (1000, 0, 1000, "active"))

    def test_refusals(self):
        self.assertEqual(self.open().outcome, Outcome.INSUFFICIENT)  # nothing to spend
        self.fund(A, 10)
        self.assertEqual(self.open(merchant=NOBODY).outcome, Outcome.UNKNOWN_PAYEE)
        self.assertEqual(self.open(consumer=NOBODY).outcome, Outcome.UNKNOWN_PAYER)
        self.assertEqual(self.open(merchant=A).outcome, Outcome.INVALID)
        for bad_rate in (0, -1, 1.5, True):
            self.assertEqual(self.open(rate=bad_rate).outcome, Outcome.INVALID)
        self.store.block(B)
        self.assertEqual(self.open(merchant=B).outcome, Outcome.BLOCKED)
        self.store.block(A)
        self.assertEqual(self.open(merchant=C).outcome, Outcome.BLOCKED)
        self.assertEqual(self.store.balance(A).held, 0)
        self.assertAuditOK()

    def test_a_merchant_blocked_during_the_session_is_still_paid(self):
        self.fund(A, 100)
        opened = self.open()
        self.store.block(B)
        self.assertEqual(self.store.settle_session(opened.session_id, 40).outcome,
                         Outcome.COMMITTED)
        self.assertEqual(self.store.balance(B).balance, 40)
        self.assertAuditOK()

    def test_the_sessions_hold_is_not_settled_or_released_as_a_plain_hold(self):
        self.fund(A, 100)
        opened = self.open()
        self.assertEqual(self.store.settle_hold(opened.hold_id, 10, B, "k").outcome,
                         Outcome.INVALID)
        self.assertFalse(self.store.release_hold(opened.hold_id))
        self.assertEqual(self.store.place_hold(A, 1, SESSIONS_HOLD_REF).outcome, Outcome.INVALID)
        self.assertEqual(self.store.balance(A).held, 100)

    def test_checkpoints_only_grow(self):
        self.fund(A, 1000)
        opened = self.open()
        self.assertEqual(self.store.checkpoint_sessions([(opened.session_id, 100)]), 1)
        self.assertEqual(self.store.checkpoint_sessions([(opened.session_id, 50),
                                                         (999_999, 5)]), 0)
        self.assertEqual(self.store.open_sessions()[0].checkpointed_amount, 100)
        self.assertRaises(ValueError, self.store.checkpoint_sessions, [(opened.session_id, -1)])

    def test_recovery_settles_each_session_at_its_checkpoint_within_the_hold(self):
        self.fund(A, 1000)
        self.fund(B, 50)
        mine = [self.open(merchant=B), self.open(merchant=C), self.open(consumer=B, merchant=C)]
        theirs = self.open(merchant=C, owner="another-ps")
        self.store.checkpoint_sessions([(mine[0].session_id, 700), (mine[1].session_id, 600),
                                        (mine[2].session_id, 20), (theirs.session_id, 5)])
        recovered = self.store.recover_sessions(OWNER)
        self.assertEqual([(session.id, result.charged) for session, result in recovered],
                         [(mine[0].session_id, 700), (mine[1].session_id, 300),
                          (mine[2].session_id, 20)])
        self.assertEqual(recovered[0][0].dialog, DIALOG)
        # A's hold is still open for the other PS's session: it has what is left.
        self.assertEqual(self.store.balance(A), (0, 0, 0, "active"))
        self.assertEqual([s.id for s in self.store.open_sessions()], [theirs.session_id])
        self.assertEqual(self.store.recover_sessions(OWNER), [])
        self.assertEqual(self.store.settle_session(theirs.session_id, 0).unspent, 0)
        self.assertAuditOK()


class SQLiteSessionTests(SQLiteBackend, SessionRulesMixin, unittest.TestCase):
    pass


class PostgresSessionTests(PostgresBackend, SessionRulesMixin, unittest.TestCase):
    pass

"""The ledger's holds (charged by time, DESIGN section 8), on SQLite and PostgreSQL."""

from __future__ import annotations

from twisted.trial import unittest

from mpay.ledger.api import SETTLEMENT, Outcome
from tests.ledger_backends import A, B, NOBODY, LedgerStoreMixin, PostgresBackend, SQLiteBackend


class LedgerHoldsMixin(LedgerStoreMixin):
    """Held funds cannot be spent; a hold is settled or released once."""

    def test_held_funds_cannot_be_spent(self):
        self.fund(A, 1000)
        hold = self.store.place_hold(A, 800, "session-1")
        self.assertEqual((hold.outcome, hold.available_after), (Outcome.COMMITTED, 200))
        self.assertEqual(self.store.balance(A), (1000, 800, 200, "active"))
        self.assertEqual(self.store.transfer(A, B, 201, "k1").outcome, Outcome.INSUFFICIENT)
        self.assertEqual(self.store.cash_out(A, 201, "k2").outcome, Outcome.INSUFFICIENT)
        self.assertEqual(self.store.place_hold(A, 201, "session-2").outcome, Outcome.INSUFFICIENT)
        self.assertEqual(self.store.transfer(A, B, 200, "k3").outcome, Outcome.COMMITTED)
        self.assertAuditOK()

    def test_settle_charges_the_payee_and_releases_the_rest(self):
        self.fund(A, 1000)
        hold = self.store.place_hold(A, 600, "session-1")
        result = self.store.settle_hold(hold.hold_id, 250, B, "bye|session-1")
        self.assertEqual((result.outcome, result.payer, result.payee, result.amount,
                          result.payer_balance_after), (Outcome.COMMITTED, A, B, 250, 750))
        self.assertEqual(self.store.balance(A), (750, 0, 750, "active"))
        self.assertEqual(self.available(B), 250)
        self.assertEqual(self.store.statement(B)[0].kind, "session")
        self.assertEqual(self.store.hold(hold.hold_id).status, "settled")
        self.assertEqual(self.store.open_holds(), [])
        self.assertAuditOK()

    def test_settle_is_idempotent(self):
        self.fund(A, 1000)
        hold = self.store.place_hold(A, 600, "session-1")
        first = self.store.settle_hold(hold.hold_id, 250, B, "bye")
        again = self.store.settle_hold(hold.hold_id, 250, B, "bye")
        self.assertEqual((again.outcome, again.journal_id), (Outcome.DUPLICATE, first.journal_id))
        self.assertEqual(self.available(A), 750)
        self.assertEqual(self.store.settle_hold(hold.hold_id, 1, B, "other").outcome,
                         Outcome.NO_HOLD)

    def test_settle_above_the_hold_is_refused_and_the_hold_kept(self):
        self.fund(A, 1000)
        hold = self.store.place_hold(A, 600, "session-1")
        for bad in (601, -1, 1.0, True):
            self.assertEqual(self.store.settle_hold(hold.hold_id, bad, B, "bye").outcome,
                             Outcome.INVALID, bad)
        self.assertEqual(self.store.settle_hold(hold.hold_id, 600, A, "bye").outcome,
                         Outcome.INVALID)
        self.assertEqual(self.store.balance(A), (1000, 600, 400, "active"))
        self.assertEqual(self.store.settle_hold(hold.hold_id, 600, B, "bye").outcome,
                         Outcome.COMMITTED)

    def test_settle_to_a_payee_who_cannot_be_paid_keeps_the_hold(self):
        self.fund(A, 1000)
        hold = self.store.place_hold(A, 600, "session-1")
        self.store.block(B)
        self.assertEqual(self.store.settle_hold(hold.hold_id, 100, B, "bye").outcome,
                         Outcome.BLOCKED)
        self.assertEqual(self.store.settle_hold(hold.hold_id, 100, NOBODY, "bye").outcome,
                         Outcome.UNKNOWN_PAYEE)
        self.assertEqual([h.id for h in self.store.open_holds()], [hold.hold_id])
        self.assertTrue(self.store.release_hold(hold.hold_id))
        self.assertEqual(self.store.balance(A), (1000, 0, 1000, "active"))

    def test_a_payer_blocked_during_the_session_is_still_charged(self):
        self.fund(A, 1000)
        hold = self.store.place_hold(A, 600, "session-1")
        self.store.block(A)
        self.assertEqual(self.store.settle_hold(hold.hold_id, 100, B, "bye").outcome,
                         Outcome.COMMITTED)
        self.assertEqual(self.store.balance(A), (900, 0, 900, "blocked"))

    def test_settle_of_nothing_just_releases(self):
        self.fund(A, 1000)
        hold = self.store.place_hold(A, 600, "session-1")
        result = self.store.settle_hold(hold.hold_id, 0, B, "bye")
        self.assertEqual((result.outcome, result.journal_id), (Outcome.COMMITTED, None))
        self.assertEqual(self.store.balance(A), (1000, 0, 1000, "active"))
        self.assertAuditOK()

    def test_release_returns_the_funds_once(self):
        self.fund(A, 1000)
        hold = self.store.place_hold(A, 600, "session-1")
        self.assertTrue(self.store.release_hold(hold.hold_id))
        self.assertFalse(self.store.release_hold(hold.hold_id))
        self.assertFalse(self.store.release_hold(999_999))
        self.assertEqual(self.store.balance(A), (1000, 0, 1000, "active"))
        self.assertEqual(self.store.settle_hold(hold.hold_id, 1, B, "bye").outcome,
                         Outcome.NO_HOLD)

    def test_checkpoints_only_grow_and_stay_within_the_hold(self):
        self.fund(A, 1000)
        hold = self.store.place_hold(A, 600, "session-1")
        self.assertTrue(self.store.checkpoint_hold(hold.hold_id, 100))
        self.assertTrue(self.store.checkpoint_hold(hold.hold_id, 250))
        self.assertFalse(self.store.checkpoint_hold(hold.hold_id, 200))
        self.assertFalse(self.store.checkpoint_hold(hold.hold_id, 601))
        self.assertRaises(ValueError, self.store.checkpoint_hold, hold.hold_id, -1)
        [open_hold] = self.store.open_holds()
        self.assertEqual((open_hold.account, open_hold.amount, open_hold.session_ref,
                          open_hold.checkpointed_amount), (A, 600, "session-1", 250))
        self.store.release_hold(hold.hold_id)
        self.assertFalse(self.store.checkpoint_hold(hold.hold_id, 300))

    def test_open_holds_lists_only_active_ones_oldest_first(self):
        self.fund(A, 1000)
        first = self.store.place_hold(A, 100, "s1").hold_id
        second = self.store.place_hold(A, 100, "s2").hold_id
        third = self.store.place_hold(A, 100, "s3").hold_id
        self.store.release_hold(second)
        self.assertEqual([h.id for h in self.store.open_holds()], [first, third])

    def test_hold_refusals(self):
        self.fund(A, 100)
        self.assertEqual(self.store.place_hold(NOBODY, 10, "s").outcome, Outcome.UNKNOWN_PAYER)
        self.assertEqual(self.store.place_hold(A, 101, "s").outcome, Outcome.INSUFFICIENT)
        for bad in (0, -5, 2.5, True):
            self.assertEqual(self.store.place_hold(A, bad, "s").outcome, Outcome.INVALID)
        self.assertEqual(self.store.place_hold(SETTLEMENT, 10, "s").outcome, Outcome.INVALID)


class SQLiteHoldsTests(SQLiteBackend, LedgerHoldsMixin, unittest.TestCase):
    pass


class PostgresHoldsTests(PostgresBackend, LedgerHoldsMixin, unittest.TestCase):
    pass

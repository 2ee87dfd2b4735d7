"""Notices queued for offline payees, in the ledger (issue 5), on SQLite and PostgreSQL.

``NoticeRulesMixin`` walks the rules on the synchronous store, and through a
``LedgerService`` (writer thread, read pool) as the PS uses them; each runs
through ``SQLiteBackend`` and ``PostgresBackend`` of ``test_ledger`` (a temp
file; a schema of its own, dropped afterwards).
"""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.trial import unittest

from mpay.ledger.api import Outcome
from mpay.ledger.notices import MAX_NOTICE_BYTES, Notice, NoticeQueued
from mpay.ledger.service import LedgerService
from tests.ledger_backends import A, B, C, LedgerStoreMixin, PostgresBackend, SQLiteBackend

FROM_A = f"sip:{A}@mpay.test;user=phone"


class NoticeRulesMixin(LedgerStoreMixin):
    def setUp(self):
        super().setUp()
        self.store.cash_in(A, 1_000, "topup")
        self.serial = 0

    def paid(self, payee: str = B) -> int:
        """A movement A -> *payee*; its journal id."""
        self.serial += 1
        result = self.store.transfer(A, payee, 1, f"k{self.serial}")
        self.assertEqual(result.outcome, Outcome.COMMITTED)
        return result.journal_id

    def body(self, journal_id: int) -> bytes:
        return b'{"journal_id": %d}' % journal_id

    def queue(self, journal_id: int, payee: str = B, **kwargs) -> NoticeQueued:
        return self.store.queue_notice(payee, journal_id, FROM_A, self.body(journal_id), **kwargs)

    def waiting(self, payee: str = B) -> list[int]:
        return [notice.journal_id for notice in self.store.queued_notices(payee)]

    def test_a_queued_notice_waits_until_discarded(self):
        first, second = self.paid(), self.paid()
        self.assertEqual(self.queue(first), NoticeQueued(True))
        self.assertEqual(self.queue(second), NoticeQueued(True))
        notice = self.store.queued_notices(B)[0]
        self.assertIsInstance(notice, Notice)
        self.assertEqual(notice[:4], (first, B, FROM_A, self.body(first)))
        self.assertEqual(self.waiting(), [first, second], "oldest first, still queued when read")
        self.assertTrue(self.store.discard_notice(B, first))
        self.assertFalse(self.store.discard_notice(B, first), "discarded once")
        self.assertEqual(self.waiting(), [second])

    def test_a_movement_is_queued_once(self):
        journal_id = self.paid()
        self.queue(journal_id)
        self.assertEqual(self.queue(journal_id), NoticeQueued(False))
        self.assertEqual(self.waiting(), [journal_id])

    def test_each_payee_sees_only_its_own_notices(self):
        to_b, to_c = self.paid(B), self.paid(C)
        self.queue(to_b)
        self.queue(to_c, payee=C)
        self.assertEqual((self.waiting(B), self.waiting(C), self.waiting(A)), ([to_b], [to_c], []))
        self.assertFalse(self.store.discard_notice(C, to_b), "not C's notice")
        self.assertEqual(self.waiting(B), [to_b])

    def test_the_oldest_are_dropped_past_the_bound(self):
        ids = [self.paid() for _ in range(5)]
        for journal_id in ids[:3]:
            self.assertEqual(self.queue(journal_id, max_per_payee=3).dropped, ())
        self.assertEqual(self.queue(ids[3], max_per_payee=3).dropped, (ids[0],))
        self.assertEqual(self.queue(ids[4], max_per_payee=2).dropped, (ids[1], ids[2]))
        self.assertEqual(self.waiting(), ids[3:])

    def test_a_notice_must_tell_of_a_movement_to_its_payee(self):
        to_b = self.paid()
        for payee, journal_id in ((C, to_b), (B, to_b + 1000), (A, to_b)):
            self.assertRaises(ValueError, self.queue, journal_id, payee=payee)
        self.assertRaises(ValueError, self.store.queue_notice, B, to_b, FROM_A,
                          b"x" * (MAX_NOTICE_BYTES + 1))
        self.assertRaises(ValueError, self.store.queue_notice, B, to_b, "", b"{}")
        self.assertRaises(ValueError, self.queue, to_b, max_per_payee=0)
        self.assertEqual(self.raw("SELECT COUNT(*) FROM notices"), [(0,)])

    def test_queued_notices_survive_closing_the_store(self):
        journal_id = self.paid()
        self.queue(journal_id)
        self.store.close()
        reopened = self.opener()()
        self.addCleanup(reopened.close)
        self.assertEqual([n.journal_id for n in reopened.queued_notices(B)], [journal_id])

    @defer.inlineCallbacks
    def test_through_the_service(self):
        """As the PS uses them: writes by the group-commit writer, reads by the pool."""
        first, second = self.paid(), self.paid()
        self.store.close()
        service = LedgerService(self.opener(), reactor)
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        queued = yield defer.gatherResults([
            service.queue_notice(B, first, FROM_A, self.body(first)),
            service.queue_notice(B, second, FROM_A, self.body(second), 1)])
        self.assertEqual(queued, [NoticeQueued(True), NoticeQueued(True, (first,))])
        notices = yield service.queued_notices(B)
        self.assertEqual([(n.journal_id, n.body) for n in notices], [(second, self.body(second))])
        self.assertTrue((yield service.discard_notice(B, second)))
        self.assertEqual((yield service.queued_notices(B)), [])
        try:
            yield service.queue_notice(C, first, FROM_A, self.body(first))
        except ValueError:
            pass
        else:
            self.fail("a notice to the wrong payee was queued")


class SQLiteNoticeTests(SQLiteBackend, NoticeRulesMixin, unittest.TestCase):
    pass


class PostgresNoticeTests(PostgresBackend, NoticeRulesMixin, unittest.TestCase):
    pass

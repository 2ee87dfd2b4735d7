"""The writer thread and its Deferreds, a crash under load, and many payers at once.

``LedgerServiceMixin`` walks the ``LedgerService``: groups of requests in
flight together, failures that reach only their own caller, a full queue, a
clean stop.  ``CrashConsistencyTests`` kills a loaded writer with SIGKILL.
``ConcurrencyMixin`` issues TRANSFERS random transfers among ACCOUNTS accounts
from CALLERS concurrent callers (their Deferreds in flight together) against
two ``LedgerService`` instances sharing one database, as two PS processes
would.  About RESEND_FRACTION of the requests are sent again with the same
idempotency key, usually to the other instance and while the first is still
in flight (a lost SIP response, a retransmission).  Afterwards the audit
passes, no balance is negative, each key moved money at most once, and the
journal holds exactly one row per key that was accepted.  The run is
reproducible: set MPAY_TEST_SEED to replay one.  Each runs on SQLite and on
PostgreSQL (the crash test on SQLite, the embedded store whose file it is).
"""

from __future__ import annotations

import functools
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mpay.ledger import writer
from mpay.ledger.api import LedgerBusy, LedgerError, LedgerStopped, Outcome, UnknownAccount
from mpay.ledger.service import LedgerService
from mpay.ledger.sqlite import SQLiteStore
from tests.ledger_backends import NOBODY, PUB, REPO, A, B, C, PostgresBackend, SQLiteBackend
from tests.support import Receivers


class LedgerServiceMixin:
    """The same store behind the writer thread (or process): Deferreds, groups, clean stops."""

    writer_process = False

    def setUp(self):
        super().setUp()
        self.service = LedgerService(self.opener(), reactor, writer_process=self.writer_process)
        self.service.startService()
        self.addCleanup(self.stopService)

    def stopService(self):
        if self.service.running:
            return self.service.stopService()

    @defer.inlineCallbacks
    def test_transfer_through_the_service(self):
        self.assertTrue((yield self.service.open_account(A)))
        yield self.service.open_account(B)
        funded = yield self.service.cash_in(A, 1000, "topup")
        self.assertEqual(funded.outcome, Outcome.COMMITTED)
        paid = yield self.service.transfer(A, B, 250, "k")
        again = yield self.service.transfer(A, B, 250, "k")
        self.assertEqual((paid.outcome, again.outcome, again.journal_id),
                         (Outcome.COMMITTED, Outcome.DUPLICATE, paid.journal_id))
        self.assertEqual((yield self.service.balance(A)), (750, 0, 750, "active"))
        self.assertEqual(len((yield self.service.statement(B))), 1)
        self.assertTrue((yield self.service.audit()).ok)

    @defer.inlineCallbacks
    def test_requests_in_flight_together_share_one_commit(self):
        yield defer.gatherResults([self.service.open_account(n) for n in (A, B)])
        yield self.service.cash_in(A, 10_000, "topup")
        results = yield defer.gatherResults(
            [self.service.transfer(A, B, 1, f"k{i}") for i in range(200)])
        self.assertTrue(all(result.outcome is Outcome.COMMITTED for result in results))
        self.assertGreater(self.service.writer.largest_batch, 1)
        self.assertEqual(len({result.journal_id for result in results}), 200)

    @defer.inlineCallbacks
    def test_a_hold_and_a_transfer_in_flight_together_cannot_both_spend(self):
        yield defer.gatherResults([self.service.open_account(n) for n in (A, B)])
        yield self.service.cash_in(A, 1000, "topup")
        hold, paid = yield defer.gatherResults([self.service.place_hold(A, 800, "s1"),
                                                self.service.transfer(A, B, 500, "k")])
        self.assertEqual(sorted([hold.ok, paid.ok]), [False, True])
        self.assertTrue((yield self.service.audit()).ok)

    @defer.inlineCallbacks
    def test_failures_reach_their_own_caller_only(self):
        yield self.service.open_account(A)
        failed = self.service.block(NOBODY)
        opened = self.service.open_account(B)
        yield self.assertFailure(failed, UnknownAccount)
        self.assertTrue((yield opened))
        yield self.assertFailure(self.service.balance(NOBODY), UnknownAccount)

    @defer.inlineCallbacks
    def test_holds_and_device_keys_through_the_service(self):
        yield defer.gatherResults([self.service.open_account(n) for n in (A, B)])
        yield self.service.cash_in(A, 1000, "topup")
        hold = yield self.service.place_hold(A, 300, "s1")
        self.assertTrue((yield self.service.checkpoint_hold(hold.hold_id, 100)))
        self.assertEqual([h.id for h in (yield self.service.open_holds())], [hold.hold_id])
        settled = yield self.service.settle_hold(hold.hold_id, 120, B, "bye")
        self.assertEqual(settled.outcome, Outcome.COMMITTED)
        self.assertFalse((yield self.service.release_hold(hold.hold_id)))
        yield self.service.store_device_key(A, b"sealed", PUB)
        self.assertEqual((yield self.service.device_key(A)).encrypted_k, b"sealed")
        yield self.service.block(B)
        yield self.service.unblock(B)
        self.assertEqual((yield self.service.cash_out(B, 120, "out")).outcome, Outcome.COMMITTED)

    @defer.inlineCallbacks
    def test_stopping_commits_everything_queued_and_leaves_no_thread(self):
        yield defer.gatherResults([self.service.open_account(n) for n in (A, B)])
        yield self.service.cash_in(A, 10_000, "topup")
        self.assertEqual((yield self.service.balance(A)).balance, 10_000)  # a reader thread too
        self.assertTrue([t for t in threading.enumerate() if "mpay-ledger" in t.name])
        pending = [self.service.transfer(A, B, 1, f"k{i}") for i in range(300)]
        yield self.service.stopService()
        self.assertTrue(all(d.called for d in pending))
        results = yield defer.gatherResults(pending)
        self.assertTrue(all(result.outcome is Outcome.COMMITTED for result in results))
        yield self.assertFailure(self.service.transfer(A, B, 1, "late"), LedgerStopped)
        yield self.assertFailure(self.service.balance(A), LedgerStopped)
        self.assertEqual([t.name for t in threading.enumerate() if "mpay-ledger" in t.name], [])
        store = self.opener()()
        self.addCleanup(store.close)
        self.assertEqual(store.balance(B).balance, 300)

    @defer.inlineCallbacks
    def test_transfer_then_answers_without_a_deferred_and_a_failing_caller_hurts_nobody(self):
        """The PS's form: callbacks; one that raises is logged, the rest of its group
        still get their results."""
        yield defer.gatherResults([self.service.open_account(n) for n in (A, B)])
        yield self.service.cash_in(A, 1000, "topup")
        receivers, failures = Receivers(2), []
        self.service.transfer_then(receivers.kept, failures.append, A, B, 100, "k1")
        self.service.transfer_then(receivers.raising, failures.append, A, B, 200, "k2")
        self.service.transfer_then(receivers.kept, failures.append, A, NOBODY, 300, "k3")
        yield receivers.done
        self.assertEqual([result.outcome for result in receivers.results],
                         [Outcome.COMMITTED, Outcome.UNKNOWN_PAYEE])
        self.assertEqual((failures, len(self.flushLoggedErrors(RuntimeError))), ([], 1))
        self.assertEqual((yield self.service.balance(B)).balance, 300, "k2 moved too")
        yield self.service.stopService()
        self.service.transfer_then(receivers.kept, failures.append, A, B, 1, "late")
        self.assertEqual([failure.type for failure in failures], [LedgerStopped],
                         "refused at once")

    @defer.inlineCallbacks
    def test_a_full_queue_sheds_load(self):
        yield self.service.stopService()
        self.service = LedgerService(self.opener(), reactor, max_pending=2,
                                     writer_process=self.writer_process)
        self.service.startService()
        first, second = self.service.open_account(A), self.service.open_account(B)
        yield self.assertFailure(self.service.open_account(C), LedgerBusy)
        self.assertEqual((yield defer.gatherResults([first, second])), [True, True])


    def test_the_wait_needs_load_room_and_a_delay(self):
        self.assertTrue(writer.waits_for_more(writer.COMMIT_SIBLINGS, 1, 100, 0.002))
        self.assertFalse(writer.waits_for_more(writer.COMMIT_SIBLINGS - 1, 1, 100, 0.002))
        self.assertFalse(writer.waits_for_more(5, 100, 100, 0.002), "a full group commits")
        self.assertFalse(writer.waits_for_more(5, 0, 100, 0.002), "nothing to commit")
        self.assertFalse(writer.waits_for_more(5, 1, 100, 0.0), "commit_delay_ms = 0")


class WriterThreadMixin:
    """What only the thread shows: its clock can be patched."""

    @defer.inlineCallbacks
    def test_a_group_waits_for_company_only_after_a_group(self):
        yield self.service.stopService()
        slept: list[float] = []

        class WriterTime:       # the writer thread's clock: its sleeps recorded, not slept
            monotonic = staticmethod(time.monotonic)

            @staticmethod
            def sleep(seconds: float) -> None:
                slept.append(seconds)

        self.patch(writer, "time", WriterTime)
        self.service = LedgerService(self.opener(), reactor, commit_delay_s=0.25)
        both = defer.gatherResults([self.service.open_account(A), self.service.open_account(B)])
        self.service.startService()             # both were queued: one group of two
        self.assertEqual((yield both), [True, True])
        self.assertEqual(slept, [], "the first group did not wait")
        self.assertTrue((yield self.service.open_account(C)))
        self.assertEqual(slept, [0.25], "after a group of two, the next one waited")
        self.assertFalse((yield self.service.open_account(C)))
        self.assertEqual(slept, [0.25], "after a group of one, an idle ledger commits at once")
        self.assertEqual(self.service.writer.batches, 3)


class SQLiteServiceMixin:
    @defer.inlineCallbacks
    def test_an_unopenable_database_fails_every_request_loudly(self):
        yield self.service.stopService()
        blocker = self.mktemp()
        open(blocker, "w").close()  # a file where a directory should be
        self.service = LedgerService(functools.partial(SQLiteStore.open,
                                                       os.path.join(blocker, "x.db")), reactor,
                                     writer_process=self.writer_process)
        self.service.startService()
        yield self.assertFailure(self.service.whenOpen(), LedgerError, OSError)
        yield self.assertFailure(self.service.transfer(A, B, 1, "k"), LedgerError)
        self.flushLoggedErrors(LedgerError, OSError)


class WriterProcessMixin:
    """Every service test again, with the writer in a process of its own."""

    writer_process = True

    @defer.inlineCallbacks
    def test_a_writer_process_that_dies_fails_what_it_had_and_comes_back(self):
        yield defer.gatherResults([self.service.open_account(n) for n in (A, B)])
        yield self.service.cash_in(A, 1000, "topup")
        writer = self.service.writer
        writer._restart_delay_s = 0.05
        pending = [self.service.transfer(A, B, 1, f"k{i}") for i in range(50)]
        writer._link.kill()
        outcomes = yield defer.DeferredList(pending, consumeErrors=True)
        failed = [result for ok, result in outcomes if not ok]
        self.assertTrue(all(failure.check(LedgerError) for failure in failed), failed)
        self.assertEqual(writer.restarts, 1)
        for _ in range(200):        # the next child: refused ("restarting") until it is up
            if writer._link is not None:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        committed = [result for ok, result in outcomes if ok]
        again = yield defer.gatherResults([self.service.transfer(A, B, 1, f"k{i}")
                                           for i in range(50)])
        self.assertEqual(sum(r.outcome is Outcome.COMMITTED for r in again), len(failed),
                         "each failed one is paid once on the re-send, the others are copies")
        self.assertEqual((yield self.service.balance(B)).balance, 50)
        self.assertTrue((yield self.service.audit()).ok)
        self.assertEqual(len(committed) + len(failed), 50)


class SQLiteLedgerServiceTests(SQLiteBackend, WriterThreadMixin, SQLiteServiceMixin,
                               LedgerServiceMixin, unittest.TestCase):
    pass


class PostgresLedgerServiceTests(PostgresBackend, WriterThreadMixin, LedgerServiceMixin,
                                 unittest.TestCase):
    pass


class SQLiteLedgerWriterProcessTests(SQLiteBackend, WriterProcessMixin, SQLiteServiceMixin,
                                     LedgerServiceMixin, unittest.TestCase):
    pass


class PostgresLedgerWriterProcessTests(PostgresBackend, WriterProcessMixin, LedgerServiceMixin,
                                       unittest.TestCase):
    pass


CRASH_ACKS = 400
"""Committed transfers the child must have acknowledged before it is killed."""

CRASH_TIMEOUT_S = 60


class CrashConsistencyTests(SQLiteBackend, unittest.TestCase):
    """kill -9 a loaded writer: what it acknowledged is there, and the books balance."""

    def test_kill_9_under_load_loses_nothing_acknowledged(self):
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.ledger_crash_child", self.path],
            cwd=REPO, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": REPO})
        self.addCleanup(child.stdout.close)
        received = b""
        deadline = time.monotonic() + CRASH_TIMEOUT_S
        try:
            while received.count(b"\n") < CRASH_ACKS:
                self.assertLess(time.monotonic(), deadline, "the child stopped acknowledging")
                readable, _, _ = select.select([child.stdout], [], [], 1.0)
                if readable:
                    chunk = os.read(child.stdout.fileno(), 65536)
                    self.assertTrue(chunk, "the child exited early")
                    received += chunk
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        received += child.stdout.read()  # written before the kill: acknowledged too
        acknowledged = {int(line) for line in received.split(b"\n")[:-1]}  # last may be partial
        self.assertGreaterEqual(len(acknowledged), CRASH_ACKS)
        self.assertTrue(os.path.exists(self.path + "-wal"), "expected a WAL left by the crash")

        store = SQLiteStore.open(self.path)
        self.addCleanup(store.close)
        report = store.audit()
        self.assertTrue(report.ok, report.format())
        present = {row[0] for row in self.raw("SELECT id FROM journal")}
        self.assertEqual(acknowledged - present, set())


TRANSFERS = 10_000
ACCOUNTS = 100
RESEND_FRACTION = 0.10
CALLERS = 200
FUNDS_MINOR = 20_000
MAX_TRANSFER_MINOR = 5_000  # large enough against FUNDS_MINOR that some are refused
SEED = int(os.environ.get("MPAY_TEST_SEED", "20240601"))


class ConcurrencyMixin:
    timeout = 120

    def setUp(self):
        super().setUp()
        self.services = [LedgerService(self.opener(), reactor) for _ in range(2)]
        for service in self.services:
            service.startService()
            self.addCleanup(service.stopService)

    def plan(self, rng: random.Random, numbers: list[str]) -> list[tuple]:
        """The requests in sending order; a re-send repeats an earlier request's key."""
        requests = []
        for index in range(TRANSFERS):
            payer, payee = rng.sample(numbers, 2)
            amount = rng.randint(1, MAX_TRANSFER_MINOR)
            requests.append((payer, payee, amount, f"{payer}|c{index}|1"))
        for original in rng.sample(range(TRANSFERS), int(TRANSFERS * RESEND_FRACTION)):
            # Soon after the original: often both are in flight at once.
            position = min(len(requests), original + rng.randint(1, CALLERS * 2))
            requests.insert(position, requests[original])
        return requests

    @defer.inlineCallbacks
    def test_random_transfers_with_resends_from_two_processes(self):
        rng = random.Random(SEED)
        numbers = [f"+8869{index:08d}" for index in range(ACCOUNTS)]
        first = self.services[0]
        yield defer.gatherResults([first.open_account(number) for number in numbers])
        yield defer.gatherResults([first.cash_in(number, FUNDS_MINOR, f"fund|{number}")
                                   for number in numbers])
        requests = self.plan(rng, numbers)
        results: dict[str, list] = {}
        queue = iter(requests)

        @defer.inlineCallbacks
        def caller():
            for payer, payee, amount, key in queue:
                service = rng.choice(self.services)
                result = yield service.transfer(payer, payee, amount, key)
                results.setdefault(key, []).append(result)

        yield defer.gatherResults([caller() for _ in range(CALLERS)])

        self.assertEqual(sum(len(answers) for answers in results.values()), len(requests))
        for service in self.services:  # both "processes" really did group requests
            self.assertGreater(service.stats()["largest_batch"], 1)
        accepted = set()
        for key, answers in results.items():
            committed = [a for a in answers if a.outcome is Outcome.COMMITTED]
            self.assertLessEqual(len(committed), 1, (key, answers))
            ids = {a.journal_id for a in answers if a.ok}
            self.assertLessEqual(len(ids), 1, (key, answers))
            if ids:
                accepted.add(key)
            for answer in answers:
                self.assertIn(answer.outcome, (Outcome.COMMITTED, Outcome.DUPLICATE,
                                               Outcome.INSUFFICIENT), key)
        self.assertGreater(len(accepted), TRANSFERS // 2)
        self.assertLess(len(accepted), TRANSFERS, "expected some refusals for want of credit")
        self.assertTrue(any(a.outcome is Outcome.DUPLICATE for answers in results.values()
                            for a in answers))

        report = yield first.audit()
        self.assertTrue(report.ok, report.format())
        self.assertEqual(report.journal_rows, ACCOUNTS + len(accepted))
        self.assertEqual(
            self.raw("SELECT COUNT(*) FROM journal WHERE kind = 'transfer'")[0][0], len(accepted))
        self.assertEqual(self.raw("SELECT COUNT(*) FROM accounts WHERE balance < 0"
                                  " AND number <> 'settlement'")[0][0], 0)
        balances = yield defer.gatherResults([first.balance(n) for n in numbers])
        self.assertEqual(sum(b.balance for b in balances), ACCOUNTS * FUNDS_MINOR)


class SQLiteConcurrencyTests(SQLiteBackend, ConcurrencyMixin, unittest.TestCase):
    pass


class PostgresConcurrencyTests(PostgresBackend, ConcurrencyMixin, unittest.TestCase):
    pass

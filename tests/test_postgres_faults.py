"""PostgreSQL drops the PS's connections mid-load, twice (issue 8): 503, then it resumes.

The ledger is PostgreSQL (a schema of the test's own); the PS's connections
carry an application name, and "PostgreSQL restarted" is what the PS sees of
a restart: the server ends every one of its backends (pg_terminate_backend).
A payer sends TRANSFERS transfers one after another; a 503 is answered the
way a wallet must, by re-sending the same request (same Call-ID and CSeq) in
a new transaction.  Afterwards every transfer was confirmed exactly once:
one journal row each, every receipt's row present, the audit passes.
"""

from __future__ import annotations

import psycopg
from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from mpay.ledger.api import LedgerError
from mpay.load.backends import POSTGRES, Backends
from tests.flow import MpayFixture
from tests.ledger_backends import PG_URL

PAYER, PAYEE = "+886912345678", "+886987654321"
TRANSFERS = 40
DROP_AT = (10, 25)            # the transfers before which PostgreSQL drops the PS
MAX_RESENDS = 40
RESEND_PAUSE_S = 0.25


class PostgresFaultTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_postgres_drops_the_ps_and_every_transfer_is_still_paid_once(self):
        backends = Backends.named((POSTGRES,), postgres_dsn=PG_URL, label="fault")
        self.addCleanup(backends.cleanup)              # drops the schema
        mpay = MpayFixture(self, *backends.settings())
        yield mpay.start()
        payer, _ = yield mpay.ready(PAYER)
        yield mpay.ready(PAYEE)
        yield mpay.top.ledger.cash_in(PAYER, 10_000, "topup")
        unavailable, receipts = 0, []
        for index in range(TRANSFERS):
            if index in DROP_AT:
                ended = yield threads.deferToThread(backends.terminate_postgres_backends)
                self.assertGreater(ended, 0, "the PS had no connection")
            request = payer.transfer_request(PAYEE, 10)
            for _ in range(MAX_RESENDS):
                response = yield payer.endpoint.send_request(request, payer.ps_addr)
                if response.status != 503:
                    break
                unavailable += 1
                self.assertIsNotNone(response.headers.get("Retry-After"))
                yield task.deferLater(reactor, RESEND_PAUSE_S, lambda: None)
                request = payer.resend(request)
            self.assertEqual(response.status, 200, f"transfer {index}: {response.reason}")
            receipts.append(payer.verified_receipt(response, PAYEE, 10))
        self.assertGreater(unavailable, 0, "the drops were never noticed")

        report = yield mpay.top.ledger.audit()
        self.assertTrue(report.ok, report.format())
        statement = yield mpay.top.ledger.statement(PAYER, 1000)
        paid = [entry for entry in statement if entry.kind == "transfer"]
        self.assertEqual(len(paid), TRANSFERS, "each transfer once, none twice")
        self.assertEqual({entry.id for entry in paid}, {r.journal_id for r in receipts})
        balance = yield mpay.top.ledger.balance(PAYER)
        self.assertEqual(balance.balance, 10_000 - 10 * TRANSFERS)
        self.flushLoggedErrors(psycopg.OperationalError, LedgerError)   # the drops, as logged

"""Redis goes away mid-traffic and comes back (issue 8): fail closed, then resume by itself.

A redis-server of the test's own (a free port, nothing on disk) backs the
location, OTCN and guess-blocking stores.  While it is down, whatever needs
it is answered 503 with Retry-After within REDIS_TIMEOUT_S (no request left
hanging, no fallback to memory); a transfer, whose money lives in the ledger,
still commits and queues its notice (202).  When Redis is back (empty: it
kept nothing), the pool reconnects by itself, devices register again, the
queued notice is delivered, and the books balance.
"""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.trial import unittest

from mpay.sim.device import DeviceError
from tests.flow import MpayFixture
from tests.outages import RedisProcess

PAYER, PAYEE = "+886912345678", "+886987654321"


class RedisFaultTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_redis_away_means_503_then_service_resumes_by_itself(self):
        redis = RedisProcess(reactor)
        self.addCleanup(redis.stop)
        yield redis.start()
        mpay = MpayFixture(self, "location.backend=redis", f"location.redis_port={redis.port}",
                           "ps.transfer_timer_a_s=1")
        yield mpay.start()
        payer, _ = yield mpay.ready(PAYER)
        payee, _ = yield mpay.ready(PAYEE)
        yield mpay.top.ledger.cash_in(PAYER, 1_000, "topup")
        response, _ = yield payer.transfer(PAYEE, 100)
        self.assertEqual(response.status, 200)

        yield redis.stop()                                        # Redis goes away
        # Fail closed: freshness cannot be proved without the shared replay cache.
        with self.assertRaisesRegex(DeviceError, "503 Replay Cache Unavailable"):
            yield payee.register()
        with self.assertRaisesRegex(DeviceError, "503 Replay Cache Unavailable"):
            yield payer.request_otcn()
        response, receipt = yield payer.transfer(PAYEE, 50)     # the ledger needs no Redis
        self.assertEqual((response.status, response.reason),
                         (202, "Payee Offline, Notice Queued"))
        queued = yield mpay.top.ledger.queued_notices(PAYEE)
        self.assertEqual([notice.journal_id for notice in queued], [receipt.journal_id])
        bounded = mpay.top.getServiceNamed("ps").getServiceNamed("redis").bounded
        self.assertGreater(bounded.timeouts, 0)

        yield redis.start()                                       # back, and empty

        @defer.inlineCallbacks
        def registered():
            try:
                yield payee.register()
            except DeviceError:
                return False
            return True

        yield mpay.eventually(registered, tries=40, every_s=0.5)
        yield mpay.eventually(lambda: any(n["journal_id"] == receipt.journal_id
                                          for n in payee.notices))
        yield payer.register()
        response, _ = yield payer.transfer(PAYEE, 25)
        self.assertEqual(response.status, 200)
        grant = yield payer.request_otcn()
        self.assertEqual(len(grant["otcn"]), 16)
        report = yield mpay.top.ledger.audit()
        self.assertTrue(report.ok, report.format())
        balance = yield mpay.top.ledger.balance(PAYER)
        self.assertEqual(balance.balance, 1_000 - 100 - 50 - 25)
        self.flushLoggedErrors(defer.TimeoutError)

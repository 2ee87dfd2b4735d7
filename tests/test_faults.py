"""Mixed traffic through a seeded faulty network (issue 8): drops, duplicates, reordering.

The servers run as ``twistd mpay`` builds them; the devices reach the PS
through :class:`FaultyNetwork` (5% of datagrams dropped, 5% duplicated, 5%
held back, both ways).  Afterwards the audit passes, no idempotency key is in
the journal twice, and every transfer a device got a verified receipt for is
in the journal; the same again with the location stores on Redis and the
ledger on PostgreSQL (a prefix and a schema of the test's own), where the
books are read back from PostgreSQL.  ``bench/faults.py`` runs the same at
100,000 operations (``--backends redis,postgres``, ``--outages``).
"""

from __future__ import annotations

import psycopg
from psycopg import sql as pgsql
from twisted.internet import defer, reactor
from twisted.trial import unittest

from mpay.load.backends import Backends
from mpay.load.mixed import MixedTraffic, check_books
from mpay.sim.network import FaultPlan, FaultyNetwork
from mpay.sip.endpoint import SIPTimeout
from tests.flow import MpayFixture

SEED = 20261201
OPERATIONS = 300
PRODUCTION_OPERATIONS = 150
CONCURRENCY = 30
FUNDS_MINOR = 1_000_000


class FaultPlanTests(unittest.TestCase):
    def test_the_same_seed_gives_the_same_fates(self):
        first, second = FaultPlan(7), FaultPlan(7)
        self.assertEqual([first.fates() for _ in range(500)], [second.fates() for _ in range(500)])

    def test_fates_follow_the_probabilities(self):
        plan = FaultPlan(1, drop=0.1, duplicate=0.2, reorder=0.3, max_delay_s=0.5)
        fates = [plan.fates() for _ in range(20_000)]
        lost = sum(1 for fate in fates if not fate) / len(fates)
        doubled = sum(1 for fate in fates if len(fate) == 2) / len(fates)
        self.assertLess(abs(lost - 0.1), 0.01)
        self.assertLess(abs(doubled - 0.9 * 0.2), 0.01)
        self.assertTrue(all(0.0 <= delay <= 0.5 for fate in fates for delay in fate))
        self.assertEqual(plan.counts["datagrams"], 20_000)

    def test_probabilities_must_be_below_one(self):
        with self.assertRaises(ValueError):
            FaultPlan(1, drop=1.0)


@defer.inlineCallbacks
def through(network, device, tries: int = 5):
    """Point *device* at the network and REGISTER through it (the PS then reaches it there)."""
    device.ps_addr = network.address
    for _ in range(tries):
        try:
            yield device.register()
            return
        except SIPTimeout:
            continue
    raise AssertionError(f"{device.state.number} could not register through the network")


@defer.inlineCallbacks
def faulty_world(testcase, plan, *settings: str):
    """Enrolled, funded devices that reach the PS through a faulty network; *settings* are
    more ``SECTION.KEY=VALUE`` for the servers (the production backends)."""
    mpay = MpayFixture(testcase, "ps.transfer_timer_a_s=2", "ps.charge_timer_a_s=5", *settings)
    yield mpay.start()
    roles = {"payers": "+8869120000{:02d}", "payees": "+8869870000{:02d}",
             "consumers": "+8869330000{:02d}", "merchants": "+8862233000{:02d}"}
    sizes = {"payers": 6, "payees": 6, "consumers": 4, "merchants": 3}
    devices = {}
    for role, pattern in roles.items():
        devices[role] = []
        for index in range(sizes[role]):
            device, _ = yield mpay.ready(pattern.format(index))
            devices[role].append(device)
            if role in ("payers", "consumers"):
                yield mpay.top.ledger.cash_in(device.state.number, FUNDS_MINOR, f"fund-{index}-{role}")
    network = FaultyNetwork(reactor, mpay.address("ps"), plan)
    network.start()
    testcase.addCleanup(network.stop)
    for group in devices.values():
        for device in group:
            yield through(network, device)
    return mpay, network, devices


class FaultRunTests(unittest.TestCase):
    timeout = 300

    @defer.inlineCallbacks
    def run_mixed(self, operations: int, *settings: str):
        plan = FaultPlan(SEED, drop=0.05, duplicate=0.05, reorder=0.05)
        mpay, network, devices = yield faulty_world(self, plan, *settings)
        traffic = MixedTraffic(reactor, seed=SEED, **devices)
        yield traffic.run(operations, CONCURRENCY)
        totals = traffic.outcomes.totals()
        self.assertEqual(totals["attempted"], operations)
        self.assertGreater(totals["succeeded"], 0.9 * operations, traffic.outcomes.summary())
        return mpay, plan, traffic

    @defer.inlineCallbacks
    def test_mixed_traffic_through_drops_duplicates_and_reordering_keeps_the_books(self):
        mpay, plan, traffic = yield self.run_mixed(OPERATIONS)
        self.assertGreater(plan.counts["dropped"], 0)
        self.assertGreater(plan.counts["duplicated"], 0)
        problems = yield check_books(mpay.top.ledger, traffic.outcomes)
        self.assertEqual(problems, [], traffic.outcomes.summary())

    @defer.inlineCallbacks
    def test_the_same_on_redis_and_postgres_keeps_the_books_in_postgres(self):
        backends = Backends.named(("redis", "postgres"), label="faults")
        self.addCleanup(backends.cleanup)             # after the servers have stopped
        mpay, plan, traffic = yield self.run_mixed(PRODUCTION_OPERATIONS, *backends.settings())
        problems = yield check_books(mpay.top.ledger, traffic.outcomes)
        self.assertEqual(problems, [], traffic.outcomes.summary())
        confirmed = set(traffic.outcomes.transfer_journal_ids)
        self.assertGreater(len(confirmed), 0)
        with psycopg.connect(backends.postgres_dsn) as connection:   # the rows are in PostgreSQL
            rows = connection.execute(
                pgsql.SQL("SELECT id FROM {}.journal WHERE kind = 'transfer'")
                .format(pgsql.Identifier(backends.postgres_schema))).fetchall()
        self.assertLessEqual(confirmed, {row[0] for row in rows})

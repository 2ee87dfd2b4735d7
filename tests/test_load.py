"""mpay-load's plain parts (arrival schedules, statistics, the capacity search, the CSV), the
ledger it checks on either backend, and a small sweep on Redis + PostgreSQL for real."""

from __future__ import annotations

import io
import math
import random
import re

from twisted.internet import defer
from twisted.trial import unittest

from mpay.load import schedule
from mpay.load.backends import Backends, parse_names, with_application_name
from mpay.load.books import LedgerRef
from mpay.load.capacity import CapacitySearch
from mpay.load.report import CSV_FIELDS, TIMELINE_FIELDS, ProgressBar, write_csv, write_timeline
from mpay.load.run import RateReport
from mpay.load.stats import Outcome, RunStats, percentile
from tests.support import sweep_once

TIMEOUT_S = 5.0


class ScheduleTests(unittest.TestCase):
    def test_uniform_spreads_a_rate_evenly_over_the_minute(self):
        offsets = schedule.uniform(1_600, 1_600)
        self.assertEqual(offsets[0], 0.0)
        self.assertAlmostEqual(offsets[1], 60 / 1_600)
        self.assertAlmostEqual(offsets[-1], 60 - 60 / 1_600)

    def test_poisson_has_the_rate_on_average_and_is_reproducible(self):
        offsets = schedule.arrivals(schedule.POISSON, 6_000, 20_000, seed=7)
        self.assertEqual(offsets, schedule.arrivals(schedule.POISSON, 6_000, 20_000, seed=7))
        self.assertEqual(offsets, sorted(offsets))
        mean_gap_s = offsets[-1] / (len(offsets) - 1)
        self.assertApproximates(mean_gap_s, 0.01, 0.0005)   # 100 per second

    def test_poisson_gaps_are_not_uniform(self):
        offsets = schedule.poisson(6_000, 1_000, random.Random(1))
        gaps = {round(b - a, 6) for a, b in zip(offsets, offsets[1:])}
        self.assertGreater(len(gaps), 900)

    def test_split_deals_round_robin_and_keeps_every_request(self):
        offsets = schedule.uniform(60, 7)
        parts = schedule.split(offsets, 3)
        self.assertEqual([[index for index, _ in part] for part in parts],
                         [[0, 3, 6], [1, 4], [2, 5]])
        self.assertEqual(sorted(entry for part in parts for entry in part),
                         list(enumerate(offsets)))

    def test_nonsense_is_refused(self):
        self.assertRaises(ValueError, schedule.uniform, 0, 10)
        self.assertRaises(ValueError, schedule.uniform, 100, 0)
        self.assertRaises(ValueError, schedule.arrivals, "bursty", 100, 10)
        self.assertRaises(ValueError, schedule.split, [0.0], 0)


def outcome(index: int, status: int | None, latency_ms: float | None) -> Outcome:
    return Outcome(index, status, None if latency_ms is None else latency_ms / 1000, 0.0,
                   index if status == 200 else None)


class StatsTests(unittest.TestCase):
    def test_percentile_is_nearest_rank(self):
        values = [float(value) for value in range(1, 101)]
        self.assertEqual(percentile(values, 0.50), 50.0)
        self.assertEqual(percentile(values, 0.99), 99.0)
        self.assertEqual(percentile([3.0], 0.99), 3.0)
        self.assertTrue(math.isnan(percentile([], 0.5)))

    def test_all_answered_in_time(self):
        stats = RunStats.from_outcomes(1_600, [outcome(i, 200, 1 + i) for i in range(100)],
                                       TIMEOUT_S)
        self.assertEqual((stats.sent, stats.succeeded, stats.success), (100, 100, 1.0))
        self.assertAlmostEqual(stats.mean_ms, 50.5)
        self.assertAlmostEqual(stats.p50_ms, 50.0)
        self.assertAlmostEqual(stats.p99_ms, 99.0)
        self.assertEqual(stats.statuses, {"200": 100})

    def test_failures_count_as_infinitely_slow_in_the_percentiles(self):
        outcomes = [outcome(i, 200, 2.0) for i in range(98)]
        outcomes += [outcome(98, None, None), outcome(99, 202, 8_000.0)]
        stats = RunStats.from_outcomes(6_000, outcomes, TIMEOUT_S)
        self.assertEqual(stats.succeeded, 98)
        self.assertAlmostEqual(stats.success, 0.98)
        self.assertAlmostEqual(stats.mean_ms, 2.0)        # the mean is over the successes
        self.assertAlmostEqual(stats.p50_ms, 2.0)
        self.assertTrue(math.isinf(stats.p99_ms))
        self.assertEqual(stats.status_text(), "200:98 202:1 none:1")

    def test_a_200_after_the_timeout_is_a_failure(self):
        stats = RunStats.from_outcomes(60, [outcome(0, 200, 1.0), outcome(1, 200, 5_001.0)],
                                       TIMEOUT_S)
        self.assertEqual((stats.succeeded, stats.late, stats.status_text()), (1, 1, "200:2"))

    def test_seconds_say_when_the_slow_requests_were_due(self):
        """A stall of one second in three: the run's p99 is that second's, the others are
        fast; the seconds are the schedule's, whenever the answers came."""
        offsets = schedule.uniform(6_000, 300)              # 100 a second for 3 s
        outcomes = [outcome(i, 200, 80.0 if 100 <= i < 200 else 2.0) for i in range(300)]
        outcomes[150] = outcome(150, None, None)
        stats = RunStats.from_outcomes(6_000, reversed(outcomes), TIMEOUT_S, offsets)
        self.assertEqual(stats.seconds, ((0, 100, 0, 2.0), (1, 100, 1, 80.0), (2, 100, 0, 2.0)))
        self.assertEqual((stats.slow_seconds, stats.worst_second_p99_ms), (1, 80.0))
        self.assertEqual(RunStats.from_outcomes(6_000, outcomes, TIMEOUT_S).seconds, (),
                         "no schedule, no seconds")

    def test_nothing_succeeded(self):
        stats = RunStats.from_outcomes(60, [outcome(0, 503, 1.0)], TIMEOUT_S)
        self.assertEqual(stats.success, 0.0)
        self.assertTrue(math.isnan(stats.mean_ms))


class CapacitySearchTests(unittest.TestCase):
    @staticmethod
    def drive(search: CapacitySearch, success_at) -> list[float]:
        tried = []
        while (rate := search.next_rate()) is not None:
            tried.append(rate)
            search.record(rate, success_at(rate))
        return tried

    def test_doubles_until_failure_then_bisects_to_the_resolution(self):
        def server(rate):    # perfect to 10,000/min, 95 % to 20,000/min, then 50 %
            return 1.0 if rate <= 10_000 else 0.95 if rate <= 20_000 else 0.5

        search = CapacitySearch(1_000, resolution=0.1, max_runs=50)
        tried = self.drive(search, server)
        self.assertEqual(tried[:5], [1_000, 2_000, 4_000, 8_000, 16_000])
        strict, thesis = search.capacity(0.999), search.capacity(0.90)
        self.assertLessEqual(strict, 10_000)
        self.assertGreater(strict * 1.1, search.lowest_failing(0.999))
        self.assertLessEqual(thesis, 20_000)
        self.assertGreater(thesis * 1.1, search.lowest_failing(0.90))

    def test_goes_down_when_the_first_rate_fails(self):
        search = CapacitySearch(8_000, max_runs=50)
        tried = self.drive(search, lambda rate: 1.0 if rate <= 1_500 else 0.0)
        self.assertEqual(tried[:4], [8_000, 4_000, 2_000, 1_000])
        self.assertLessEqual(search.capacity(0.999), 1_500)

    def test_a_lucky_pass_above_a_failure_is_not_the_capacity(self):
        search = CapacitySearch(1_000)
        for rate, success in ((1_000, 1.0), (2_000, 0.5), (4_000, 1.0)):
            search.record(rate, success)
        self.assertEqual(search.capacity(0.999), 1_000)

    def test_stops_at_the_maximum_and_at_the_run_budget(self):
        search = CapacitySearch(1_000, max_per_min=3_000)
        self.assertEqual(self.drive(search, lambda rate: 1.0), [1_000, 2_000, 3_000])
        self.assertEqual(search.capacity(0.999), 3_000)
        budget = CapacitySearch(1_000, max_runs=3)
        self.assertEqual(len(self.drive(budget, lambda rate: 1.0)), 3)

    def test_nothing_passes(self):
        search = CapacitySearch(4, max_runs=50)
        self.drive(search, lambda rate: 0.0)
        self.assertIsNone(search.capacity(0.90))


class ReportTests(unittest.TestCase):
    def test_csv_has_a_row_per_rate_in_rate_order(self):
        def report(rate):
            stats = RunStats.from_outcomes(rate, [outcome(0, 200, 3.0), outcome(1, None, None)],
                                           TIMEOUT_S, server_cpu_pct=40.0,
                                           generator_cpu_pct=20.0, duration_s=1.0)
            return RateReport(stats, True, "", 1, 0, 0)

        stream = io.StringIO()
        write_csv(stream, [report(3_000), report(1_000)])
        lines = stream.getvalue().splitlines()
        self.assertEqual(lines[0], ",".join(CSV_FIELDS))
        self.assertEqual([line.split(",")[0] for line in lines[1:]], ["1000", "3000"])
        row = dict(zip(CSV_FIELDS, lines[1].split(",")))
        self.assertEqual((row["success"], row["p99_ms"], row["statuses"]),
                         ("0.5000", "inf", "200:1 none:1"))

    def test_timeline_has_each_rates_seconds(self):
        offsets = schedule.uniform(60, 3)                   # one a second
        stats = RunStats.from_outcomes(60, [outcome(0, 200, 3.0), outcome(1, 200, 60.0),
                                            outcome(2, None, None)], TIMEOUT_S, offsets)
        stream = io.StringIO()
        write_timeline(stream, [RateReport(stats, True, "", 2, 0, 0)])
        self.assertEqual(stream.getvalue().splitlines(),
                         [",".join(TIMELINE_FIELDS), "60,0,1,0,3.00", "60,1,1,0,60.00",
                          "60,2,1,1,inf"])
        stream = io.StringIO()
        write_csv(stream, [RateReport(stats, True, "", 2, 0, 0)])
        row = dict(zip(CSV_FIELDS, stream.getvalue().splitlines()[1].split(",")))
        self.assertEqual((row["slow_seconds"], row["worst_second_p99_ms"]), ("2/3", "inf"))

    def test_progress_bar_is_silent_off_a_terminal(self):
        stream = io.StringIO()
        bar = ProgressBar(stream)
        bar.start("1000/min")
        bar.update(5, 10)
        bar.finish()
        self.assertEqual(stream.getvalue(), "")


class LedgerRefTests(unittest.TestCase):
    def test_sqlite_and_postgres_are_named_to_mpay_admin_as_its_own_options_name_them(self):
        self.assertEqual(LedgerRef.parse("var/ledger.sqlite3").admin_args(),
                         ["--db", "sqlite:var/ledger.sqlite3"])
        self.assertEqual(LedgerRef.parse("sqlite:///tmp/l.db").admin_args(),
                         ["--db", "sqlite:/tmp/l.db"])
        ledger = LedgerRef.parse("postgresql://127.0.0.1:5432/test", "mpay_x")
        self.assertEqual(ledger.admin_args(),
                         ["--db", "postgresql://127.0.0.1:5432/test", "--schema", "mpay_x"])
        self.assertEqual(ledger.section["backend"], "postgres")

    def test_a_schema_without_postgres_and_a_dsn_admin_cannot_take_are_refused(self):
        self.assertRaises(ValueError, LedgerRef.parse, "ledger.sqlite3", "mpay")
        self.assertRaises(ValueError, LedgerRef.parse, "sqlite:")
        ledger = LedgerRef.postgres("host=127.0.0.1 dbname=test", "mpay")
        self.assertRaises(ValueError, ledger.admin_args)

    def test_the_servers_own_ini_file_is_handed_on(self):
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as stream:
            stream.write("[ledger]\nbackend = postgres\npostgres_dsn = postgresql://db/mpay\n")
        ledger = LedgerRef.from_config(path)
        self.assertEqual((ledger.backend, ledger.admin_args()), ("postgres", ["--config", path]))


class BackendsTests(unittest.TestCase):
    def test_names(self):
        self.assertEqual(parse_names("postgres, redis"), ("postgres", "redis"))
        self.assertEqual(parse_names("embedded"), ())
        self.assertRaises(ValueError, parse_names, "redis,mysql")

    def test_each_run_owns_a_prefix_a_schema_and_an_application_name(self):
        first, second = Backends.named(("redis", "postgres")), Backends.named(("redis",))
        self.assertNotEqual(first.redis_prefix, second.redis_prefix)
        self.assertIsNone(second.postgres_dsn)
        settings = dict(setting.split("=", 1) for setting in first.settings())
        self.assertEqual(settings["location.redis_prefix"], first.redis_prefix)
        self.assertEqual(settings["ledger.postgres_schema"], first.postgres_schema)
        self.assertEqual(settings["ledger.postgres_dsn"],
                         f"postgresql://127.0.0.1:5432/test?application_name="
                         f"{first.application_name}")
        self.assertEqual(with_application_name("postgres://h/db?sslmode=disable&"
                                               "application_name=old", "new"),
                         "postgres://h/db?sslmode=disable&application_name=new")
        self.assertRaises(ValueError, Backends.named, ("postgres",), postgres_dsn="dbname=test")


class ProductionSweepTests(unittest.TestCase):
    """mpay-load's sweep with the server on the Redis and PostgreSQL of 127.0.0.1, for real."""

    timeout = 120    # seconds; a run takes about 15

    @defer.inlineCallbacks
    def test_a_small_sweep_on_redis_and_postgres_keeps_the_books_and_leaves_nothing(self):
        count = 50
        args, report, out = yield sweep_once(self, count, [
            "--rates", "3000", "--payers", "2", "--payees", "2",
            "--workers", "2", "--backends", "redis,postgres"])
        self.assertFalse(math.isnan(report.backend_cpu_pct), "the backends' CPU was measured")
        backends = args.production
        self.assertIn(f"dropped schema {backends.postgres_schema}", out)
        deleted = re.search(r"deleted (\d+) Redis keys", out)
        self.assertGreaterEqual(int(deleted.group(1)), 4, "four devices' bindings were in Redis")
        leftovers = yield backends.leftovers()
        self.assertEqual(leftovers, (0, False), "the run's keys and schema are gone")

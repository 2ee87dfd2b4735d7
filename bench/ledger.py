"""Durable transfers per second: group commit against one commit per transfer.

"service": each run starts a real ``LedgerService`` (writer thread, Deferreds,
the real reactor) on a fresh database, opens ACCOUNTS funded accounts and
submits N random transfers at once, as many concurrent payers would; the clock
stops when the last result has been delivered to its Deferred.  "single" is
the same path with the writer's group size forced to 1, so the ratio is what
grouping buys.  This is what the payment server gets, and the last line.

"store": the synchronous store alone, in this thread: ``run_batch`` of the
backend's group size against one transaction per ``transfer``.  No reactor and
no second thread competing for the GIL: the database's own ceiling.

Every committed transfer is on disk (SQLite WAL + synchronous=FULL;
PostgreSQL synchronous_commit=on) before it counts.  Each figure is the median
of RUNS runs; the machine is shared, so expect some spread.

    python bench/ledger.py [--postgres-dsn DSN] [--quick]

Last line (read by CI): ``ledger: sqlite_grouped_per_s=... sqlite_single_per_s=...
postgres_grouped_per_s=... postgres_single_per_s=...``.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import statistics
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402

from mpay.ledger.postgres import PostgresStore  # noqa: E402
from mpay.ops import collector  # noqa: E402
from mpay.ledger.service import LedgerService  # noqa: E402
from mpay.ledger.sqlite import SQLiteStore  # noqa: E402

ACCOUNTS = 100
FUNDS_MINOR = 10**9
RUNS = 3
SEED = 20240601
DEFAULT_DSN = os.environ.get("MPAY_TEST_POSTGRES_DSN",
                             "host=127.0.0.1 port=5432 dbname=test user=postgres")
# Transfers per run: enough for about a second of work in each mode.
SIZES = {("sqlite", "grouped"): 60_000, ("sqlite", "single"): 1_500,
         ("postgres", "grouped"): 8_000, ("postgres", "single"): 1_500}


@defer.inlineCallbacks
def one_run(reactor, open_store, max_batch: int | None, transfers: int, rng: random.Random):
    """Transfers per second through a fresh LedgerService."""
    service = LedgerService(open_store, reactor, max_batch=max_batch, max_pending=10**6)
    service.startService()
    try:
        yield service.whenOpen()
        numbers = [f"+8869{index:08d}" for index in range(ACCOUNTS)]
        setup = [service.open_account(number) for number in numbers]
        setup += [service.cash_in(number, FUNDS_MINOR, f"fund|{number}") for number in numbers]
        yield defer.gatherResults(setup, consumeErrors=True)
        pairs = [rng.sample(numbers, 2) for _ in range(transfers)]
        results: list = []
        done = defer.Deferred()

        def answered(result):   # one callback each, as the PS's response path adds
            results.append(result)
            if len(results) == transfers:
                done.callback(None)

        def failed(failure):
            if not done.called:
                done.errback(failure)

        started = time.perf_counter()
        for index, (payer, payee) in enumerate(pairs):
            service.transfer(payer, payee, 1, f"bench|{index}").addCallbacks(answered, failed)
        yield done
        elapsed = time.perf_counter() - started
        assert all(result.ok for result in results), "a bench transfer was refused"
        report = yield service.audit()
        assert report.ok, report.format()
        return transfers / elapsed, service.writer.largest_batch
    finally:
        yield service.stopService()


def sqlite_opener(directory: str):
    return functools.partial(SQLiteStore.open, os.path.join(directory, f"{uuid.uuid4().hex}.db"))


def postgres_opener(dsn: str, schemas: list[str]):
    schema = f"mpay_bench_{uuid.uuid4().hex[:12]}"
    schemas.append(schema)
    return functools.partial(PostgresStore.open, dsn, schema)


def store_run(open_store, grouped: bool, transfers: int, rng: random.Random) -> float:
    """Transfers per second through the synchronous store, in this thread."""
    store = open_store()
    try:
        numbers = [f"+8869{index:08d}" for index in range(ACCOUNTS)]
        for number in numbers:
            store.open_account(number)
            store.cash_in(number, FUNDS_MINOR, f"fund|{number}")
        ops = [("transfer", (*rng.sample(numbers, 2), 1, f"bench|{index}", "transfer", "", None))
               for index in range(transfers)]
        started = time.perf_counter()
        if grouped:
            for start in range(0, transfers, store.max_batch):
                results = store.run_batch(ops[start:start + store.max_batch])
                assert all(result.ok for result in results), "a bench transfer was refused"
        else:
            for name, args in ops:
                assert store.transfer(*args[:4]).ok, "a bench transfer was refused"
        elapsed = time.perf_counter() - started
        assert store.audit().ok
        return transfers / elapsed
    finally:
        store.close()


@defer.inlineCallbacks
def main(reactor, argv=None):
    collector.tune()   # the collector as the server sets it (mpay/ops/collector.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres-dsn", default=DEFAULT_DSN)
    parser.add_argument("--quick", action="store_true", help="one run of a tenth the size")
    args = parser.parse_args(argv)
    runs, scale = (1, 0.1) if args.quick else (RUNS, 1.0)
    rng = random.Random(SEED)
    figures: dict[tuple[str, str, str], float] = {}
    schemas: list[str] = []

    def opener(backend: str):
        return (sqlite_opener(directory) if backend == "sqlite"
                else postgres_opener(args.postgres_dsn, schemas))

    with tempfile.TemporaryDirectory(prefix="mpay-bench-") as directory:
        try:
            for level in ("service", "store"):
                for backend in ("sqlite", "postgres"):
                    for mode in ("grouped", "single"):
                        size = int(SIZES[backend, mode] * scale)
                        samples, note = [], ""
                        for _ in range(runs):
                            if level == "store":
                                samples.append(store_run(opener(backend), mode == "grouped",
                                                         size, rng))
                                continue
                            rate, batch = yield one_run(reactor, opener(backend),
                                                        None if mode == "grouped" else 1,
                                                        size, rng)
                            samples.append(rate)
                            note = f"; largest group {batch}"
                        figures[level, backend, mode] = statistics.median(samples)
                        print(f"{level:8s} {backend:9s} {mode:8s}"
                              f" {figures[level, backend, mode]:10,.0f} transfers/s  (runs:"
                              f" {', '.join(f'{s:,.0f}' for s in samples)}{note})", flush=True)
        finally:
            drop_schemas(args.postgres_dsn, schemas)
    print()
    print(f"{'':18s} {'grouped/s':>12s} {'single/s':>12s} {'ratio':>8s}")
    for level in ("service", "store"):
        for backend in ("sqlite", "postgres"):
            grouped = figures[level, backend, "grouped"]
            single = figures[level, backend, "single"]
            print(f"{level:8s} {backend:9s} {grouped:12,.0f} {single:12,.0f}"
                  f" {grouped / single:7.1f}x")
    print("ledger: " + " ".join(f"{backend}_{mode}_per_s={figures['service', backend, mode]:.0f}"
                                for backend in ("sqlite", "postgres")
                                for mode in ("grouped", "single")))


def drop_schemas(dsn: str, schemas: list[str]) -> None:
    if not schemas:
        return
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as connection:
        for schema in schemas:
            connection.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE")
                               .format(sql.Identifier(schema)))


if __name__ == "__main__":
    task.react(main, [sys.argv[1:]])

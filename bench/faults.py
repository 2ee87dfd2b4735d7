"""A seeded fault run: mixed traffic through drops, duplicates and reordering, the books checked.

The servers and the devices share this process; the devices reach the PS
through ``mpay.sim.network.FaultyNetwork`` with DROP of the datagrams lost,
DUPLICATE duplicated and REORDER held back, both ways, from SEED.
OPERATIONS operations (60% transfers, 25% OTCN charges, 15% timed sessions;
``mpay.load.mixed``) run CONCURRENCY at a time.  Then the audit, no
idempotency key twice, every confirmed transfer in the journal.  The
baseline is the same run on a clean network (``--clean``).

The servers run on the embedded defaults (SQLite, memory stores), or with
``--backends redis,postgres`` on the Redis at 127.0.0.1:6379 and the
PostgreSQL database ``test`` at 127.0.0.1:5432 (a key prefix and a schema of
the run's own, removed afterwards; the books are then read from
PostgreSQL).  ``--outages`` adds, on those backends with a redis-server of
the bench's own: Redis killed after REDIS_DOWN_AT of the operations and
started again (empty) REDIS_DOWN_S later, the devices registering again;
PostgreSQL ending every backend of the server after POSTGRES_DROP_AT of
them (what the server sees of a restart).

    python bench/faults.py [--operations N] [--seed S] [--clean]
                           [--backends redis,postgres] [--outages]

Last line: ``faults: attempted=... succeeded=... refused=... timed_out=... books=ok|FAILED``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task, threads  # noqa: E402

from bench.transport import _Cleanups  # noqa: E402
from mpay.load.backends import DEFAULT_REDIS, Backends, parse_names  # noqa: E402
from mpay.load.mixed import MixedTraffic, check_books  # noqa: E402
from mpay.sim.network import FaultPlan  # noqa: E402
from tests.outages import RedisProcess, register_again  # noqa: E402
from tests.test_faults import faulty_world  # noqa: E402

OPERATIONS = 100_000
CONCURRENCY = 200
SEED = 20261201
DROP = DUPLICATE = REORDER = 0.05
REDIS_DOWN_AT = (0.25,)
REDIS_DOWN_S = 3.0
POSTGRES_DROP_AT = (0.5, 0.75)
PROGRESS_EVERY = 5_000


class Outages:
    """Redis stopped and started, PostgreSQL's backends of the server ended, as the run goes."""

    def __init__(self, reactor, backends: Backends, redis: RedisProcess, devices: dict,
                 operations: int):
        self.reactor = reactor
        self.backends = backends
        self.redis = redis
        self.devices = [device for group in devices.values() for device in group]
        self.pending = sorted([(round(at * operations), "redis") for at in REDIS_DOWN_AT]
                              + [(round(at * operations), "postgres") for at in POSTGRES_DROP_AT])
        self.running: list[defer.Deferred] = []
        self.events: list[str] = []

    def progress(self, done: int) -> None:
        while self.pending and done >= self.pending[0][0]:
            _, what = self.pending.pop(0)
            self.running.append(getattr(self, "_" + what)(done))

    def finished(self) -> defer.Deferred:
        return defer.gatherResults(self.running, consumeErrors=True)

    @defer.inlineCallbacks
    def _redis(self, done: int):
        yield self.redis.stop()
        started = time.perf_counter()
        yield task.deferLater(self.reactor, REDIS_DOWN_S, lambda: None)
        yield self.redis.start()
        # It kept nothing: every device registers again (the PS's pool reconnects by itself).
        again = yield defer.gatherResults(
            [register_again(self.reactor, device) for device in self.devices])
        self.events.append(f"Redis killed after {done:,} operations, started again"
                           f" {REDIS_DOWN_S:g} s later; {sum(again)}/{len(again)} devices"
                           f" registered again {time.perf_counter() - started:.1f} s after"
                           " the kill")

    restart_postgres = False   # --restart-postgres: the server itself, not only its backends

    @defer.inlineCallbacks
    def _postgres(self, done: int):
        if self.restart_postgres:
            started = time.perf_counter()
            yield threads.deferToThread(restart_postgres_server)
            self.events.append(f"PostgreSQL restarted after {done:,} operations"
                               f" ({time.perf_counter() - started:.1f} s)")
            return
        ended = yield threads.deferToThread(self.backends.terminate_postgres_backends)
        self.events.append(f"PostgreSQL ended {ended} backends of the server after"
                           f" {done:,} operations")


def restart_postgres_server() -> None:
    """``pg_ctlcluster restart`` of the machine's cluster (root): every connection breaks and
    new ones are refused until it is back.  Only for a machine of one's own."""
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
                   check=True, capture_output=True)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--operations", type=int, default=OPERATIONS)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--clean", action="store_true", help="no faults: the baseline")
    parser.add_argument("--backends", default="", type=parse_names,
                        help="redis, postgres or redis,postgres (default: the embedded ones)")
    parser.add_argument("--outages", action="store_true",
                        help="on Redis (its own) + PostgreSQL: stop and start Redis, end"
                             " PostgreSQL's backends, during the run")
    parser.add_argument("--restart-postgres", action="store_true",
                        help="with --outages: restart the PostgreSQL server (pg_ctlcluster, as"
                             " root) instead of ending the server's backends")
    return parser.parse_args(argv)


@defer.inlineCallbacks
def main(reactor, argv=None):
    args = parse_args(argv)
    probability = 0.0 if args.clean else DROP
    plan = FaultPlan(args.seed, drop=probability, duplicate=0.0 if args.clean else DUPLICATE,
                     reorder=0.0 if args.clean else REORDER)
    redis = RedisProcess(reactor) if args.outages else None
    names = ("postgres", "redis") if args.outages else args.backends
    backends = Backends.named(names, redis=redis.address if redis else DEFAULT_REDIS,
                              label="faults")
    cleanups = _Cleanups()
    outages = None
    print(f"servers on: {backends.describe()}", flush=True)
    try:
        if redis is not None:
            yield redis.start()
        mpay, _, devices = yield faulty_world(cleanups, plan, *backends.settings())
        traffic = MixedTraffic(reactor, seed=args.seed, **devices)
        if redis is not None:
            outages = Outages(reactor, backends, redis, devices, args.operations)
            outages.restart_postgres = args.restart_postgres
        started = time.perf_counter()

        def progress(done, total):
            if outages is not None:
                outages.progress(done)
            if done % PROGRESS_EVERY == 0:
                print(f"  {done:,}/{total:,} operations, {time.perf_counter() - started:.0f} s",
                      file=sys.stderr, flush=True)

        yield traffic.run(args.operations, args.concurrency, progress)
        if outages is not None:
            yield outages.finished()
        elapsed = time.perf_counter() - started
        problems = yield check_books(mpay.top.ledger, traffic.outcomes)
    finally:
        yield cleanups.run()
        if backends.any:
            print((yield backends.cleanup()), flush=True)
        if redis is not None:
            yield redis.stop()
    totals = traffic.outcomes.totals()
    print(f"seed {args.seed}, {'clean network' if args.clean else 'faults'}:"
          f" {dict(plan.counts)}")
    for event in outages.events if outages is not None else ():
        print(f"outage: {event}")
    print(f"{traffic.outcomes.summary()} in {elapsed:.0f} s"
          f" ({totals['attempted'] / elapsed:,.0f} operations/s)")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print(f"faults: attempted={totals['attempted']} succeeded={totals['succeeded']}"
          f" refused={totals['refused']} timed_out={totals['timed out']}"
          f" books={'ok' if not problems else 'FAILED'}")
    if problems:
        raise SystemExit(1)


if __name__ == "__main__":
    task.react(main, [sys.argv[1:]])

"""A seeded fault run: mixed traffic through drops, duplicates and reordering, the books checked.

The servers (embedded defaults) and the devices share this process; the
devices reach the PS through ``mpay.sim.network.FaultyNetwork`` with DROP
of the datagrams lost, DUPLICATE duplicated and REORDER held back, both ways,
from SEED.  OPERATIONS operations (60% transfers, 25% OTCN charges, 15%
timed sessions; ``mpay.load.mixed``) run CONCURRENCY at a time.  Then the
audit, no idempotency key twice, every confirmed transfer in the journal.
The baseline is the same run on a clean network (``--clean``).

    python bench/faults.py [--operations N] [--seed S] [--clean]

Last line: ``faults: attempted=... succeeded=... refused=... timed_out=... books=ok|FAILED``
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402

from bench.transport import _Cleanups  # noqa: E402
from mpay.load.mixed import MixedTraffic, check_books  # noqa: E402
from mpay.sim.network import FaultPlan  # noqa: E402
from tests.test_faults import faulty_world  # noqa: E402

OPERATIONS = 100_000
CONCURRENCY = 200
SEED = 20261201
DROP = DUPLICATE = REORDER = 0.05


@defer.inlineCallbacks
def main(reactor, argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--operations", type=int, default=OPERATIONS)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--clean", action="store_true", help="no faults: the baseline")
    args = parser.parse_args(argv)
    probability = 0.0 if args.clean else DROP
    plan = FaultPlan(args.seed, drop=probability, duplicate=0.0 if args.clean else DUPLICATE,
                     reorder=0.0 if args.clean else REORDER)
    cleanups = _Cleanups()
    try:
        mpay, _, devices = yield faulty_world(cleanups, plan)
        traffic = MixedTraffic(reactor, seed=args.seed, **devices)
        started = time.perf_counter()

        def progress(done, total):
            if done % 5000 == 0:
                print(f"  {done:,}/{total:,} operations, {time.perf_counter() - started:.0f} s",
                      file=sys.stderr, flush=True)

        yield traffic.run(args.operations, args.concurrency, progress)
        elapsed = time.perf_counter() - started
        problems = yield check_books(mpay.top.ledger, traffic.outcomes)
    finally:
        yield cleanups.run()
    totals = traffic.outcomes.totals()
    print(f"seed {args.seed}, {'clean network' if args.clean else 'faults'}:"
          f" {dict(plan.counts)}")
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

"""Scale-out: the mixed-traffic run against one PS process, then against two (issue 8).

Both runs use the real ``twistd mpay`` with Redis and PostgreSQL (a key
prefix and a schema of the run's own, removed afterwards); the second adds
``--workers 2``: two PS processes on one UDP port (SO_REUSEPORT), joined by
the peer relay.  The devices live in this process and drive OPERATIONS
mixed operations (60% transfers, 25% OTCN charges, 15% timed sessions;
``mpay.load.mixed``), CONCURRENCY at a time; then the books are checked:
the audit, no idempotency key twice, every success in the journal.

The machine has two cores and this process (the devices: signing, SIP) is
on them too, so the figure is what one machine gives, not what a second
machine would add.

    python bench/scaleout.py [--operations N] [--concurrency C]

Last line: ``scaleout: one_per_s=X two_per_s=Y ratio=Y/X books=ok|FAILED``
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402

from mpay.ledger import LedgerService, store_opener  # noqa: E402
from mpay.load.backends import Backends  # noqa: E402
from mpay.load.devices import SimDevices  # noqa: E402
from mpay.load.mixed import MixedTraffic, check_books  # noqa: E402
from mpay.load.server import ServerProcess, free_udp_ports  # noqa: E402

OPERATIONS = 20_000
CONCURRENCY = 200
SEED = 20261201
FUNDS_MINOR = 10_000_000
ROLES = {"payers": ("+886912008{:03d}", 6), "payees": ("+886987008{:03d}", 6),
         "consumers": ("+886933008{:03d}", 4), "merchants": ("+886223308{:03d}", 3)}
"""Number pattern and devices per role, before --scale."""

SCALE = 5
"""Devices per role x this: enough accounts that two ledger writers seldom wait on one row."""


@defer.inlineCallbacks
def one_run(reactor, workers: int, operations: int, concurrency: int, scale: int,
            keep: bool = False):
    """(operations per second, the outcomes' summary, problems found in the books)."""
    backends = Backends.named(("postgres", "redis"), label="scale")
    directory = tempfile.mkdtemp(prefix="mpay-")
    as_port, ps_port, relay_port = free_udp_ports(3)
    server = ServerProcess(reactor, directory, as_port, ps_port, workers=workers,
                           relay_port=relay_port, logfile=os.path.join(directory, "server.log"),
                           settings=backends.settings())
    ledger = devices = None
    try:
        server.start()
        yield server.wait_ready()
        ledger = LedgerService(store_opener(dict(server.ledger.section)), reactor)
        ledger.startService()
        devices = SimDevices.for_server(reactor, server)
        groups = {}
        for role, (pattern, size) in ROLES.items():
            groups[role] = []
            for index in range(size * scale):
                number = pattern.format(index)
                groups[role].append((yield devices.ready(number)))
                if role in ("payers", "consumers"):
                    yield ledger.cash_in(number, FUNDS_MINOR, f"fund-{number}")
        traffic = MixedTraffic(reactor, seed=SEED, **groups)
        started, cpu = time.perf_counter(), time.process_time()
        yield traffic.run(operations, concurrency)
        elapsed = time.perf_counter() - started
        print(f"  {workers} PS process(es): the devices' process used"
              f" {100 * (time.process_time() - cpu) / elapsed:.0f}% of a core")
        problems = yield check_books(ledger, traffic.outcomes)
        return operations / elapsed, traffic.outcomes.summary(), problems
    finally:
        if devices is not None:
            yield devices.stop()
        if ledger is not None:
            yield ledger.stopService()
        yield server.stop()
        yield backends.cleanup()
        if keep:
            print(f"  kept {directory} (the server's log: server.log)")
        else:
            shutil.rmtree(directory, True)


@defer.inlineCallbacks
def main(reactor, argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--operations", type=int, default=OPERATIONS)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--scale", type=int, default=SCALE)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="the runs' PS process counts, the first the baseline")
    parser.add_argument("--keep", action="store_true", help="keep each run's directory")
    args = parser.parse_args(argv)
    rates, ok = {}, True
    for workers in args.workers:
        rate, summary, problems = yield one_run(reactor, workers, args.operations, args.concurrency,
                                                 args.scale, args.keep)
        rates[workers] = rate
        ok = ok and not problems
        print(f"{workers} PS process(es): {rate:,.0f} operations/s; {summary}")
        for problem in problems:
            print(f"  books: {problem}")
    if set(rates) == {1, 2}:
        print(f"scaleout: one_per_s={rates[1]:.0f} two_per_s={rates[2]:.0f}"
              f" ratio={rates[2] / rates[1]:.2f} books={'ok' if ok else 'FAILED'}")
    else:
        print("scaleout: " + " ".join(f"workers{n}_per_s={rate:.0f}" for n, rate in rates.items())
              + f" books={'ok' if ok else 'FAILED'}")


if __name__ == "__main__":
    task.react(main)

"""Credit transfers per minute the payment server carries: ``mpay-load --find-capacity``.

The real server (``twistd mpay``, embedded defaults: SQLite, memory location
store) in a process of its own; enrolled payers in WORKERS processes send
fully authenticated, signed transfers at a sustained uniform rate for
SECONDS_PER_RATE each, payees confirm every notice, and the search narrows
the highest rate at which 99.9 % (and 90 %, the thesis's threshold) are
answered 200 within the timeout.  After every rate ``mpay-admin audit``
passes and every 200's journal id is in the journal, or the bench fails.
The baseline is the thesis: 1,600 per minute before success fell under 90 %.
``--backends redis,postgres`` runs the same against the production backends
(the location store on the Redis at 127.0.0.1:6379, the ledger on the
PostgreSQL database ``test`` at 127.0.0.1:5432; a key prefix and a schema of
the run's own, removed afterwards).  ``--server-workers N`` runs N PS
processes on the one port (``twistd mpay --workers N``; needs ``--backends
redis``, with the SQLite file or PostgreSQL as the shared ledger), the server's
CPU summed over them.

    python bench/capacity.py [--quick] [--backends redis,postgres] [--server-workers N]
                             [--generator lean|stack|sipp] [--csv PATH] [--plot PATH]

It is the same as (which the README's table was measured with, longer)::

    mpay-load --find-capacity --start-rate 24000 --seconds 8 --resolution 0.15 --max-runs 7

Last line (read by CI): ``capacity: rate_per_min=R success=S p99_ms=P thesis_ratio=R/1600``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402

from mpay.cli import load  # noqa: E402

START_RATE_PER_MIN = 24_000
SECONDS_PER_RATE = 8
RESOLUTION = 0.15
MAX_RUNS = 7
QUICK = {"SECONDS_PER_RATE": 3, "MAX_RUNS": 3}


@defer.inlineCallbacks
def main(reactor, argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, fewer of them")
    parser.add_argument("--backends", default="",
                        help="redis, postgres or redis,postgres (default: the embedded ones)")
    parser.add_argument("--server-workers", help="PS processes (needs --backends redis)")
    parser.add_argument("--generator", help="lean (mpay-load's default), stack or sipp")
    parser.add_argument("--csv")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    seconds = QUICK["SECONDS_PER_RATE"] if args.quick else SECONDS_PER_RATE
    runs = QUICK["MAX_RUNS"] if args.quick else MAX_RUNS
    command = ["--find-capacity", "--start-rate", str(START_RATE_PER_MIN), "--seconds",
               str(seconds), "--resolution", str(RESOLUTION), "--max-runs", str(runs)]
    for option in ("backends", "server_workers", "generator", "csv", "plot"):
        if getattr(args, option):
            command += [f"--{option.replace('_', '-')}", getattr(args, option)]
    print("mpay-load " + " ".join(command), flush=True)
    status = yield load.run(reactor, load.parse_args(command))
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    task.react(main, [sys.argv[1:]])

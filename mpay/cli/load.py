"""``mpay-load``: how many credit transfers per minute the payment server carries.

    mpay-load                                  # the thesis's rates, 1,000 transfers each
    mpay-load --rates 1000,1600,6000 --count 500 --csv load.csv --plot load.png
    mpay-load --find-capacity                  # search the rate where success falls
    mpay-load --arrival poisson --seed 7       # exponential gaps instead of uniform ones
    mpay-load --rates 30000,60000 --seconds 15 # each rate sustained 15 s (more than --count)
    mpay-load --backends redis,postgres        # on the production backends
    mpay-load --generator stack                # every message through the devices' SIP stack
    mpay-load --generator sipp --seconds 30    # SIPp sends the transfers and answers the notices
    mpay-load --backends redis,postgres --server-workers 2   # two PS processes, one port

By default it starts the real server (``twistd --nodaemon mpay``, embedded
defaults, every file in a temporary directory) and stops it at the end.
``--backends redis,postgres`` puts that server's location store on Redis
and its ledger on PostgreSQL (``--redis``, ``--postgres-dsn``), under a key
prefix and a schema of the run's own, removed afterwards (the schema is kept
with ``--keep``).  ``--server-workers N`` starts it with ``--workers N``: N
PS processes on one port, sharing Redis and the ledger (so it needs
``--backends redis``), its CPU summed over them.  With ``--as``/``--ps``
(and ``--ledger`` or ``--ledger-config``, ``--modem-control``, ``--as-key``)
it loads a server
already running.  Payers and payees are enrolled Sim-DMDs with
real tickets and keys; every request carries ticket, authenticator and the
payer's signature, is committed by the ledger and confirmed by the payee.  A
request succeeds when its payer has the final 200 within ``--timeout``.

Per rate it prints and writes (CSV) the success probability, the mean, p50
and p99 processing time, the server's CPU and the load generator's own, and
checks the books: ``mpay-admin audit`` and every 200's journal id in the
journal.  The last line is the capacity::

    capacity: rate_per_min=R success=S p99_ms=P thesis_ratio=R/1600

Exit status: 0 measured and the books are right, 1 the books are not, 2 bad
usage, 3 the run could not be made (server, enrolment).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile

from twisted.internet import defer, task

from mpay.auth.keyfiles import KeyFileError
from mpay.load import backends as production
from mpay.load import schedule as schedules
from mpay.load import sipp
from mpay.load.books import LedgerRef
from mpay.load.capacity import (
    DEFAULT_MAX_RUNS, DEFAULT_RESOLUTION, STRICT_SUCCESS, THESIS_SUCCESS, CapacitySearch,
)
from mpay.load.report import (
    THESIS_CAPACITY_PER_MIN, ProgressBar, devices_line, plot, summary_line, write_csv,
    write_timeline,
)
from mpay.load.stats import BAR_P99_MS
from mpay.load.run import (
    DEFAULT_COUNT_PER_RATE, DEFAULT_PAYEES, DEFAULT_PAYERS, DEFAULT_WORKERS, RESPONSE_TIMEOUT_S,
    LoadRunner, LoadSettings, RateReport, Target,
)
from mpay.load.server import ServerProcess, free_udp_ports
from mpay.load.sender import GENERATORS, LEAN, PRECOMPUTE_AHEAD_S, SIPP
from mpay.sim.device import DeviceError
from mpay.sip.endpoint import SIPTimeout

DEFAULT_RATES_PER_MIN = (1_000, 1_600, 3_000, 6_000, 12_000)
DEFAULT_SEARCH_START_PER_MIN = 6_000
DEFAULT_SEARCH_MAX_PER_MIN = 600_000
DEFAULT_SEARCH_SECONDS = 15.0
"""--find-capacity keeps each rate up this long: capacity is a rate sustained, not a burst
of --count that a backlog absorbs within the timeout."""
GENERATOR_NICE = 10
"""The generator's niceness.  On two cores the server, its signature process and the
generator's processes all want a CPU at once; at niceness 0 the PS's reactor waited on
a run queue a fifth of the time behind generator work, and every wait is in a latency.
At 10 the generator yields, and its own delays still count (it timestamps the answers).
180,000/min for 30 s, three rounds alternated (session 13), p99 at 0 -> 10: lean 102 -> 103,
119 -> 57, 150 -> 74 ms; sipp 74 -> 110, 225 -> 50, 144 -> 89 ms.  The PS's CPU rises
(85 -> 91 % with lean): served sooner, it wakes for fewer messages at a time."""

BAR_SUCCESS = STRICT_SUCCESS
BAR_RATE_PER_MIN = 180_000
"""Issue 7's bar: 180,000 per minute at success >= 99.9 % with p99 <= 50 ms."""
EXIT_OK, EXIT_BOOKS, EXIT_USAGE, EXIT_FAILED = 0, 1, 2, 3


def _rates(text: str) -> list[float]:
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of rates: {text!r}") from None
    if not rates or any(rate <= 0 for rate in rates):
        raise argparse.ArgumentTypeError("rates are per minute and > 0")
    return rates


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return (host or "127.0.0.1", int(port))


def _backend_names(text: str) -> tuple[str, ...]:
    try:
        return production.parse_names(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mpay-load", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rates", type=_rates, default=list(DEFAULT_RATES_PER_MIN),
                        help="arrival rates, transfers per minute, comma-separated")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT_PER_RATE,
                        help="transfers per rate")
    parser.add_argument("--arrival", choices=schedules.ARRIVALS, default=schedules.UNIFORM)
    parser.add_argument("--seed", type=int, default=0, help="of the Poisson arrivals")
    parser.add_argument("--seconds", type=float,
                        help="keep each rate up at least this long (more than --count);"
                             f" default 0, with --find-capacity {DEFAULT_SEARCH_SECONDS:g}")
    parser.add_argument("--find-capacity", action="store_true",
                        help="search the rates instead of --rates")
    parser.add_argument("--start-rate", type=float, default=DEFAULT_SEARCH_START_PER_MIN,
                        help="--find-capacity: the first rate, per minute")
    parser.add_argument("--max-rate", type=float, default=DEFAULT_SEARCH_MAX_PER_MIN,
                        help="--find-capacity: never above this, per minute")
    parser.add_argument("--max-runs", type=int, default=DEFAULT_MAX_RUNS,
                        help="--find-capacity: at most this many rates")
    parser.add_argument("--resolution", type=float, default=DEFAULT_RESOLUTION,
                        help="--find-capacity: narrow the bracket to within this fraction")
    parser.add_argument("--payers", type=int, default=DEFAULT_PAYERS)
    parser.add_argument("--payees", type=int, default=DEFAULT_PAYEES)
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help="payer processes (each payer lives in one)")
    parser.add_argument("--generator", choices=GENERATORS, default=LEAN,
                        help="lean: requests serialised ahead, responses and notices handled"
                             " on bytes (the generator's CPU is the server's machine's);"
                             " stack: every message through the SIP stack; sipp: SIPp"
                             " (Debian sip-tester) sends the requests built ahead and answers"
                             " the notices (uniform arrivals, a share of at most"
                             f" {PRECOMPUTE_AHEAD_S:.0f} s)")
    parser.add_argument("--nice", type=int, default=GENERATOR_NICE, metavar="N",
                        help="the load generator's processes (this one, once the server is"
                             " started, its senders and SIPp) run at this niceness: on the"
                             " server's own cores they yield to it, and are still measured")
    parser.add_argument("--timeout", type=float, default=RESPONSE_TIMEOUT_S,
                        help="seconds: a later answer is a failure")
    parser.add_argument("--csv", help="write the table here")
    parser.add_argument("--plot", help="write the PNG (success and latency against rate) here")
    parser.add_argument("--timeline", help="write each rate's seconds here (CSV: requests due"
                                           " in the second, failed, p99)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="more configuration for the server started here")
    parser.add_argument("--keep", action="store_true",
                        help="keep the server's directory (ledger, log) and its PostgreSQL"
                             " schema, and say where")
    backends = parser.add_argument_group("the production backends (for the server started here)")
    backends.add_argument("--backends", type=_backend_names, default="embedded",
                          help="redis, postgres or redis,postgres: the location store on Redis,"
                               " the ledger on PostgreSQL")
    backends.add_argument("--server-workers", type=int, default=1, metavar="N",
                          help="PS processes of the server (twistd mpay --workers N);"
                               " N > 1 needs --backends redis")
    backends.add_argument("--redis", type=_host_port, metavar="HOST:PORT",
                          default="{}:{}".format(*production.DEFAULT_REDIS),
                          help="the Redis for --backends redis")
    backends.add_argument("--postgres-dsn", default=production.DEFAULT_POSTGRES_DSN,
                          help="the database for --backends postgres (a postgresql:// URL)")
    external = parser.add_argument_group("a server already running (instead of starting one)")
    external.add_argument("--as", dest="as_addr", type=_host_port, help="AS address HOST:PORT")
    external.add_argument("--ps", dest="ps_addr", type=_host_port, help="PS address HOST:PORT")
    external.add_argument("--ledger", help="its ledger (audit, journal, top-ups): a SQLite file"
                                           " (or sqlite:PATH) or a postgresql:// URL")
    external.add_argument("--schema", help="the PostgreSQL schema of --ledger")
    external.add_argument("--ledger-config", metavar="INI",
                          help="instead of --ledger: the server's INI file ([ledger] section)")
    external.add_argument("--modem-control", help="its simulated modem's control socket")
    external.add_argument("--as-key", help="the AS's public key file (pinned by the devices)")
    external.add_argument("--server-pid", type=int, help="its process, for its CPU")
    args = parser.parse_args(argv)
    given = [args.as_addr, args.ps_addr, args.ledger or args.ledger_config, args.modem_control,
             args.as_key]
    if any(given) and not all(given):
        parser.error("a running server needs --as, --ps, --ledger (or --ledger-config),"
                     " --modem-control and --as-key")
    if args.as_addr and (args.backends or args.server_workers != 1):
        parser.error("--backends and --server-workers are for the server started here;"
                     " a running one has its own")
    if args.server_workers < 1:
        parser.error("--server-workers is at least 1")
    if args.server_workers > 1 and production.REDIS not in args.backends:
        parser.error(f"--server-workers {args.server_workers} needs --backends redis (or"
                     " redis,postgres): the PS processes must share the device locations,"
                     " OTCNs and replay cache, and the memory store is one process's own")
    args.ledger_ref = None
    try:
        if args.ledger_config:
            args.ledger_ref = LedgerRef.from_config(args.ledger_config)
        elif args.ledger:
            args.ledger_ref = LedgerRef.parse(args.ledger, args.schema)
        args.production = production.Backends.named(args.backends, redis=args.redis,
                                                    postgres_dsn=args.postgres_dsn)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    if args.count < 1 or args.payers < args.workers or min(args.payees, args.workers) < 1:
        parser.error("need --count >= 1, --payees >= 1, --workers >= 1 and --payers >= --workers")
    if args.generator == SIPP and args.arrival != schedules.UNIFORM:
        parser.error("--generator sipp opens its calls at a steady rate: --arrival uniform only")
    if args.generator == SIPP and sipp.binary() is None:
        parser.error("--generator sipp: SIPp is not installed (Debian package sip-tester)")
    if args.seconds is None:
        args.seconds = DEFAULT_SEARCH_SECONDS if args.find_capacity else 0.0
    return args


def capacity_line(reports: list[RateReport], threshold: float = STRICT_SUCCESS) -> str:
    """``capacity: rate_per_min=R success=S p99_ms=P thesis_ratio=X`` at *threshold*."""
    search = CapacitySearch(DEFAULT_SEARCH_START_PER_MIN)
    by_rate = {}
    for report in reports:
        search.record(report.stats.rate_per_min, report.stats.success)
        by_rate[report.stats.rate_per_min] = report.stats
    rate = search.capacity(threshold)
    if rate is None:
        return "capacity: rate_per_min=0 success=nan p99_ms=nan thesis_ratio=0.00"
    stats = by_rate[rate]
    p99 = "inf" if math.isinf(stats.p99_ms) else f"{stats.p99_ms:.1f}"
    return (f"capacity: rate_per_min={rate:.0f} success={stats.success:.4f} p99_ms={p99}"
            f" thesis_ratio={rate / THESIS_CAPACITY_PER_MIN:.2f}")


def bar_line(reports: list[RateReport]) -> str:
    """The highest rate run that met issue 7's bar (success and p99 together)."""
    met = [report.stats for report in reports
           if report.stats.success >= BAR_SUCCESS and report.stats.p99_ms <= BAR_P99_MS]
    if not met:
        return f"bar (success >= {BAR_SUCCESS:.1%}, p99 <= {BAR_P99_MS:g} ms): no rate met it"
    best = max(met, key=lambda stats: stats.rate_per_min)
    return (f"bar (success >= {BAR_SUCCESS:.1%}, p99 <= {BAR_P99_MS:g} ms): met up to"
            f" {best.rate_per_min:.0f}/min (p99 {best.p99_ms:.1f} ms) of the rates run;"
            f" issue 7 asks {BAR_RATE_PER_MIN}/min")


@defer.inlineCallbacks
def _start_server(reactor, args: argparse.Namespace, directory: str):
    if args.as_addr:
        return None, Target(args.as_addr, args.ps_addr, args.modem_control, args.as_key,
                            args.ledger_ref, args.server_pid)
    backends = args.production
    workers = args.server_workers
    as_port, ps_port, relay_port = free_udp_ports(3)
    server = ServerProcess(reactor, directory, as_port, ps_port,
                           logfile=os.path.join(directory, "server.log"),
                           settings=(*backends.settings(), *args.set), workers=workers,
                           relay_port=relay_port if workers > 1 else None)
    server.start()
    try:
        yield server.wait_ready()
    except Exception:
        yield server.stop()
        raise
    return server, Target.of(server, backends if backends.any else None)


@defer.inlineCallbacks
def _clean_backends(args: argparse.Namespace):
    """Remove the run's Redis keys and (unless --keep) its schema; say what was done."""
    if args.as_addr or not args.production.any:
        return
    try:
        done = yield args.production.cleanup(keep_schema=args.keep)
    except Exception as exc:     # the run's own result stands; say what is left behind
        print(f"mpay-load: cleaning up {args.production.describe()} failed: {exc}",
              file=sys.stderr, flush=True)
    else:
        print(done, flush=True)


@defer.inlineCallbacks
def sweep(reactor, args: argparse.Namespace, nice_self: bool = False):
    """Start (or find) the server, enrol, run every rate: the reports, by rate.

    The senders and SIPp run at ``--nice``; this process (the payees' answers) too when
    *nice_self* (the command; not a test calling this, which would stay niced)."""
    # Short: the modem's UNIX socket path must stay under 108 bytes.
    directory = tempfile.mkdtemp(prefix="mpay-load-")
    server, runner, reports = None, None, []
    bar = ProgressBar(sys.stderr)
    try:
        server, target = yield _start_server(reactor, args, directory)
        if args.nice and nice_self:
            os.nice(args.nice)      # after the server's start: it keeps the niceness it had
        settings = LoadSettings(count=args.count, arrival=args.arrival, seed=args.seed,
                                payers=args.payers, payees=args.payees, workers=args.workers,
                                timeout_s=args.timeout, min_seconds=args.seconds,
                                generator=args.generator, nice=args.nice)
        runner = LoadRunner(reactor, target, settings, progress=bar.update)
        stores = args.production.describe() if server is not None else target.ledger.describe()
        print(f"enrolling {args.payers} payers and {args.payees} payees"
              f" (server pid {target.pid or 'not known'}; {stores};"
              f" {args.generator} generator)", flush=True)
        yield runner.prepare()
        if runner.holders:
            print(devices_line(runner.devices_by_process(), args.server_workers), flush=True)
        search = CapacitySearch(args.start_rate, max_per_min=args.max_rate,
                                resolution=args.resolution, max_runs=args.max_runs) \
            if args.find_capacity else None
        pending = list(args.rates)
        while True:
            if search is not None:
                rate = search.next_rate()
            else:
                rate = pending.pop(0) if pending else None
            if rate is None:
                break
            bar.start(f"{rate:g}/min")
            report = yield runner.run_rate(rate)
            bar.finish()
            print(summary_line(report), flush=True)
            if not report.audit_ok:
                print(report.audit_output, flush=True)
            reports.append(report)
            if search is not None:
                search.record(rate, report.stats.success)
    finally:
        bar.finish()
        if runner is not None:
            yield runner.stop()
        if server is not None:
            yield server.stop()
        yield _clean_backends(args)
        if args.keep:
            print(f"kept {directory}", flush=True)
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return reports


@defer.inlineCallbacks
def run(reactor, args: argparse.Namespace):
    try:
        reports = yield sweep(reactor, args, nice_self=True)
    except (RuntimeError, OSError, KeyFileError, defer.FirstError, DeviceError,
            SIPTimeout) as exc:
        print(f"mpay-load: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.csv:
        with open(args.csv, "w", encoding="utf-8") as stream:
            write_csv(stream, reports)
    if args.timeline:
        with open(args.timeline, "w", encoding="utf-8") as stream:
            write_timeline(stream, reports)
    if args.plot:
        length = f"{args.count} transfers" + (f" or {args.seconds:g} s" if args.seconds else "")
        plot(args.plot, reports, f"mpay-load ({args.generator} generator): {length} per"
                                 f" rate,\n{args.arrival} arrivals, timeout {args.timeout:g} s")
    books_ok = all(report.books_ok for report in reports)
    print(f"books: {'every audit passed, every 200 is in the journal' if books_ok else 'WRONG'}")
    print("90 % (the thesis's threshold): " + capacity_line(reports, THESIS_SUCCESS))
    print(bar_line(reports))
    print(capacity_line(reports))
    return EXIT_OK if books_ok else EXIT_BOOKS


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def go(reactor):
        return run(reactor, args).addCallback(lambda status: sys.exit(status) if status else None)

    task.react(go)

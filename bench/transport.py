"""Credit transfers per second over UDP, TCP and TLS, in the same run.

For each transport the AS and PS (as ``twistd mpay`` builds them, in this
process) get PAIRS payers and PAIRS payees, enrolled, ticketed and
registered over that transport; then TRANSFERS transfers run with
CONCURRENCY outstanding, each fully authenticated, committed, forwarded to
the payee and confirmed, the receipt verified by the payer.  Devices and
servers share this process (and the GIL), so the figures are for
comparing transports with each other, not for capacity (that is
``bench/capacity.py``).  UDP is the baseline of the ratios.

    python bench/transport.py [--transfers N] [--concurrency C]

Last line: ``transport: udp_per_s=... tcp_per_s=... tls_per_s=... tcp_ratio=... tls_ratio=...``
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402

from tests.flow import MpayFixture  # noqa: E402

TRANSPORTS = ("UDP", "TCP", "TLS")
PAIRS = 10
TRANSFERS = 2_000
CONCURRENCY = 50
FUNDS_MINOR = 10**9


class _Cleanups:
    """What MpayFixture asks of a test case: somewhere to put its cleanups."""

    def __init__(self):
        self.cleanups = []

    def addCleanup(self, function, *args):
        self.cleanups.append((function, args))

    @defer.inlineCallbacks
    def run(self):
        for function, args in reversed(self.cleanups):
            yield defer.maybeDeferred(function, *args)


@defer.inlineCallbacks
def one_transport(transport: str, transfers: int, concurrency: int):
    cleanups = _Cleanups()
    mpay = MpayFixture(cleanups, "ps.transfer_timer_a_s=8", transport=transport)
    try:
        yield mpay.start()
        payers, payees = [], []
        for index in range(PAIRS):
            payer, _ = yield mpay.ready(f"+88691200{index:04d}")
            payee, _ = yield mpay.ready(f"+88698700{index:04d}")
            yield mpay.top.ledger.cash_in(payer.state.number, FUNDS_MINOR, f"fund-{index}")
            payers.append(payer)
            payees.append(payee)
        jobs = iter(range(transfers))
        refused = []

        @defer.inlineCallbacks
        def worker():
            for index in jobs:
                pair = index % PAIRS
                response, _ = yield payers[pair].transfer(payees[pair].state.number, 1)
                if response.status != 200:
                    refused.append(response.status)

        started, cpu = time.perf_counter(), time.process_time()
        yield defer.gatherResults([worker() for _ in range(concurrency)], consumeErrors=True)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        assert not refused, f"{len(refused)} transfers not confirmed: {refused[:5]}"
        report = yield mpay.top.ledger.audit()
        assert report.ok, report.format()
        return transfers / elapsed, cpu / elapsed
    finally:
        yield cleanups.run()
        if mpay.top.running:
            yield mpay.top.stopService()


@defer.inlineCallbacks
def main(reactor, argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transfers", type=int, default=TRANSFERS)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    args = parser.parse_args(argv)
    rates = {}
    for transport in TRANSPORTS:
        rates[transport], busy = yield one_transport(transport, args.transfers, args.concurrency)
        print(f"{transport:4s} {rates[transport]:8,.0f} transfers/s"
              f"  ({args.transfers} transfers, {args.concurrency} outstanding,"
              f" {rates[transport] / rates['UDP']:.2f}x UDP; process CPU {busy:.0%})", flush=True)
    print("transport: " + " ".join(f"{t.lower()}_per_s={rates[t]:.0f}" for t in TRANSPORTS)
          + f" tcp_ratio={rates['TCP'] / rates['UDP']:.2f} tls_ratio={rates['TLS'] / rates['UDP']:.2f}")


if __name__ == "__main__":
    task.react(main, [sys.argv[1:]])

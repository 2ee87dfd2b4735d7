"""The payment server's cost per credit transfer, with no device in the way.

The AS and PS run in this process as ``twistd mpay`` builds them (embedded
defaults: SQLite, memory stores).  One payer and one payee are enrolled for
real; then TRANSFERS signed, ticketed transfer requests are built ahead (not
timed) and fed to the PS's endpoint as datagrams, WINDOW at a time.  What
the PS sends is caught at its socket: each notice to the payee is answered
with a 200 built here, each final response to the payer ends a transfer.
So the figures are the PS alone: parsing, the ticket, authenticator and
signature checks, the ledger (its writer process, or thread), the notice, the receipt.

The baseline is issue 7's budget: 3,000 transfers/s on one core leaves 333 us
of reactor time per transfer.

    python bench/ps_path.py [--transfers N] [--profile] [--prebuilt M]

Instructions per transfer, which do not move with the machine's load: run it
under ``valgrind --tool=callgrind`` with ``--transfers 200 --prebuilt 800``
and ``--transfers 800 --prebuilt 800`` and divide the difference by 600.

Last line: ``ps_path: reactor_us=... writer_us=... per_s=... budget_ratio=...``
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402

from bench.transport import _Cleanups  # noqa: E402
from mpay.load.server import process_cpu_s  # noqa: E402
from tests.flow import MpayFixture  # noqa: E402

TRANSFERS = 5_000
WINDOW = 50            # transfers in flight, as concurrent payers would have
BUDGET_US = 1e6 / 3000
PAYER, PAYEE = "+886912000001", "+886987000001"


_ECHOED = (b"via:", b"from:", b"call-id:", b"cseq:")


def ok_for(request: bytes) -> bytes:
    """The payee's 200 to a notice, by hand: Vias, From, Call-ID and CSeq echoed, To tagged."""
    head = request.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    lines = [b"SIP/2.0 200 OK"]
    for line in head:
        lowered = line[:8].lower()
        if lowered.startswith(_ECHOED):
            lines.append(line)
        elif lowered.startswith(b"to:"):
            lines.append(line + b";tag=bench")
    return b"\r\n".join(lines) + b"\r\nContent-Length: 0\r\n\r\n"


@defer.inlineCallbacks
def main(reactor, argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transfers", type=int, default=TRANSFERS)
    parser.add_argument("--profile", action="store_true", help="print the reactor's top costs")
    parser.add_argument("--window", type=int, default=WINDOW,
                        help="transfers in flight (1: each alone, as at a low arrival rate)")
    parser.add_argument("--prebuilt", type=int, default=0,
                        help="build this many requests ahead (at least --transfers): two runs"
                             " with the same --prebuilt differ by the PS's work alone")
    args = parser.parse_args(argv)
    cleanups = _Cleanups()
    # No shedding: under valgrind (instruction counts) the reactor is always "late".
    mpay = MpayFixture(cleanups, "ps.transfer_timer_a_s=8", "sip.shed_lag_ms=0",
                       *(f"ps.signature_process={v}" for v in os.environ.get("SIGPROC", "true").split()))
    try:
        yield mpay.start()
        payer, _ = yield mpay.ready(PAYER)
        payee, _ = yield mpay.ready(PAYEE)
        yield mpay.top.ledger.cash_in(PAYER, 10**9, "bench-fund")
        ps = mpay.top.endpoints["ps"]
        payer_addr = tuple(payer.endpoint.sent_by)
        payee_addr = tuple(payee.endpoint.sent_by)
        key = payer.state.private_key()
        requests = [payer.transfer_request(PAYEE, 1, signing_key=key).to_bytes()
                    for _ in range(max(args.transfers, args.prebuilt))][:args.transfers]
        pending = iter(requests)
        done = defer.Deferred()
        answered = [0]
        statuses: dict[int, int] = {}

        def feed(count: int) -> None:
            for _ in range(count):
                data = next(pending, None)
                if data is None:
                    return
                ps.datagram_received(data, payer_addr)

        def wire(data: bytes, addr) -> None:
            """The PS's socket: notices are answered, final answers counted (cheaply:
            this is the harness, not the PS)."""
            if not data.startswith(b"SIP/2.0 "):
                reactor.callLater(0, ps.datagram_received, ok_for(data), payee_addr)
                return
            status = int(data[8:11])
            if status < 200:
                return
            statuses[status] = statuses.get(status, 0) + 1
            answered[0] += 1
            if answered[0] == args.transfers:
                done.callback(None)
            else:
                reactor.callLater(0, feed, 1)

        ps.write = wire
        checks = mpay.ps_core.transfer.signatures
        child = checks._link.process.pid if checks._link is not None else None
        child_cpu = process_cpu_s(child) if child else 0.0
        writer_link = getattr(mpay.top.ledger.writer, "_link", None)   # the writer process
        writer = writer_link.process.pid if writer_link is not None else None
        writer_cpu = process_cpu_s(writer) if writer else 0.0
        profile = cProfile.Profile() if args.profile else None
        started, cpu, main_cpu = time.perf_counter(), time.process_time(), time.thread_time()
        if profile:
            profile.enable()
        feed(args.window)
        yield done
        if profile:
            profile.disable()
        elapsed = time.perf_counter() - started
        main_cpu = time.thread_time() - main_cpu
        cpu = time.process_time() - cpu
        child_cpu = process_cpu_s(child) - child_cpu if child else 0.0
        writer_cpu = process_cpu_s(writer) - writer_cpu if writer else 0.0
        assert statuses == {200: args.transfers}, statuses
        report = yield mpay.top.ledger.audit()
        assert report.ok, report.format()
    finally:
        yield cleanups.run()
    n = args.transfers
    reactor_us, writer_us = main_cpu / n * 1e6, (cpu - main_cpu + writer_cpu) / n * 1e6
    if profile:
        stats = pstats.Stats(profile)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats("mpay", 40)
    print(f"payer signatures checked: {checks.in_child} in the signature process "
          f"({child_cpu / n * 1e6:.0f} us of its CPU per transfer), {checks.inline} in the PS")
    print(f"{n} transfers in {elapsed:.2f} s: {n / elapsed:,.0f}/s; reactor thread"
          f" {reactor_us:.0f} us and the ledger's writer (its process, or thread) and readers"
          f" {writer_us:.0f} us of CPU per"
          f" transfer; budget {BUDGET_US:.0f} us of reactor time")
    print(f"ps_path: reactor_us={reactor_us:.0f} writer_us={writer_us:.0f} per_s={n / elapsed:.0f}"
          f" budget_ratio={reactor_us / BUDGET_US:.2f}")


if __name__ == "__main__":
    task.react(main, [sys.argv[1:]])

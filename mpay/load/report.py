"""A sweep's results as the thesis showed them: a CSV table and the Fig 4-6 curves.

The plot has success probability and processing time (mean and p99)
against the arrival rate; matplotlib's Agg backend draws it without a
display.  The progress bar is for a person at a terminal only.
"""

from __future__ import annotations

import csv
import math
from typing import IO, Iterable

from mpay.load.run import RateReport
from mpay.load.stats import BAR_P99_MS

CSV_FIELDS = ("rate_per_min", "count", "succeeded", "success", "mean_ms", "p50_ms", "p99_ms",
              "send_lag_p99_ms", "worst_second_p99_ms", "slow_seconds", "server_processes",
              "server_cpu_pct", "server_cpu_by_process",
              "backend_cpu_pct", "generator_cpu_pct", "payee_cpu_pct",
              "busiest_sender_cpu_pct", "precompute_us", "duration_s",
              "statuses", "late", "resent", "audit_ok", "journal_checked", "journal_missing",
              "devices_by_process", "generator")

THESIS_CAPACITY_PER_MIN = 1_600
"""The thesis's payment server: success fell under 90 % above this rate."""

PROGRESS_BAR_CHARS = 30
PLOT_SIZE_IN = (7.0, 6.0)
PLOT_DPI = 100


def _figure(value: float, digits: int) -> str:
    return "inf" if math.isinf(value) else "" if math.isnan(value) else f"{value:.{digits}f}"


def csv_row(report: RateReport) -> dict[str, str]:
    stats = report.stats
    return {"rate_per_min": f"{stats.rate_per_min:g}", "count": str(stats.sent),
            "succeeded": str(stats.succeeded), "success": f"{stats.success:.4f}",
            "mean_ms": _figure(stats.mean_ms, 2), "p50_ms": _figure(stats.p50_ms, 2),
            "p99_ms": _figure(stats.p99_ms, 2), "send_lag_p99_ms": _figure(stats.lag_p99_ms, 2),
            "worst_second_p99_ms": _figure(stats.worst_second_p99_ms, 2),
            "slow_seconds": f"{stats.slow_seconds}/{len(stats.seconds)}",
            "server_processes": str(report.server_processes or ""),
            "server_cpu_pct": _figure(stats.server_cpu_pct, 1),
            "server_cpu_by_process": " ".join(f"{name}:{_figure(pct, 1)}"
                                              for name, pct in report.server_cpu_by_process),
            "backend_cpu_pct": _figure(report.backend_cpu_pct, 1),
            "generator_cpu_pct": _figure(stats.generator_cpu_pct, 1),
            "payee_cpu_pct": _figure(report.payee_cpu_pct, 1),
            "busiest_sender_cpu_pct": _figure(report.busiest_sender_cpu_pct, 1),
            "precompute_us": _figure(report.precompute_us, 0),
            "duration_s": _figure(stats.duration_s, 2), "statuses": stats.status_text(),
            "late": str(stats.late), "resent": str(report.resent),
            "audit_ok": str(report.audit_ok).lower(),
            "journal_checked": str(report.journal_checked),
            "journal_missing": str(report.journal_missing),
            "devices_by_process": " ".join(f"{name}:{payers}+{payees}"
                                           for name, payers, payees in report.devices_by_process),
            "generator": stats.generator}


TIMELINE_FIELDS = ("rate_per_min", "second", "sent", "failed", "p99_ms")


def write_timeline(stream: IO[str], reports: Iterable[RateReport]) -> None:
    """Each rate's seconds (``--timeline``): where in a run its slow requests were due."""
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(TIMELINE_FIELDS)
    for report in sorted(reports, key=lambda report: report.stats.rate_per_min):
        for second in report.stats.seconds:
            writer.writerow((f"{report.stats.rate_per_min:g}", second.start_s, second.sent,
                             second.failed, _figure(second.p99_ms, 2)))


def write_csv(stream: IO[str], reports: Iterable[RateReport]) -> None:
    writer = csv.DictWriter(stream, CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for report in sorted(reports, key=lambda report: report.stats.rate_per_min):
        writer.writerow(csv_row(report))


def summary_line(report: RateReport) -> str:
    """One line per rate for the terminal."""
    row = csv_row(report)
    books = "ok" if report.books_ok else (
        f"FAILED (audit {'ok' if report.audit_ok else 'failed'},"
        f" {report.journal_missing} of {report.journal_checked} journal ids missing)")
    backends = (f" (+ Redis/PostgreSQL {row['backend_cpu_pct']} %)"
                if row["backend_cpu_pct"] else "")
    processes = (f" [{report.server_processes} processes: {row['server_cpu_by_process']}]"
                 if report.server_processes > 1 else "")
    return (f"{row['rate_per_min']:>8s}/min  success {row['success']}  mean {row['mean_ms']} ms"
            f"  p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms (seconds over"
            f" {BAR_P99_MS:g} ms: {row['slow_seconds']}, worst {row['worst_second_p99_ms']})"
            f"  server CPU"
            f" {row['server_cpu_pct']} %{processes}{backends}"
            f"  generator ({row['generator'] or '?'}) CPU {row['generator_cpu_pct']} %"
            f" (busiest sender {row['busiest_sender_cpu_pct']} %)"
            f"  [{row['statuses']}, late {row['late']}]  books {books}")


def devices_line(spread: tuple[tuple[str, int, int], ...], processes: int) -> str:
    """Where the kernel put the devices (their Redis bindings), and a warning if all on one."""
    held = ", ".join(f"{name} {payers} payers + {payees} payees"
                     for name, payers, payees in spread)
    lonely = f" (all on one of {processes} processes)" if len(spread) == 1 < processes else ""
    return f"devices per PS process (Redis bindings): {held}{lonely}"


def plot(path: str, reports: Iterable[RateReport], title: str) -> None:
    """Success and processing time against the arrival rate (thesis Fig 4-6), as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot, ticker

    ordered = sorted(reports, key=lambda report: report.stats.rate_per_min)
    rates = [report.stats.rate_per_min for report in ordered]
    figure, (upper, lower) = pyplot.subplots(2, 1, sharex=True, figsize=PLOT_SIZE_IN)
    try:
        upper.plot(rates, [100 * report.stats.success for report in ordered], "o-")
        upper.axhline(99.9, linestyle="--", linewidth=0.8, color="green", label="99.9 %")
        upper.axhline(90.0, linestyle=":", linewidth=0.8, color="red", label="90 % (thesis)")
        upper.set_ylabel("success (%)")
        upper.legend(loc="lower left")
        upper.set_title(title, fontsize=10)
        for label, pick in (("mean", lambda s: s.mean_ms), ("p99", lambda s: s.p99_ms)):
            values = [pick(report.stats) for report in ordered]
            lower.plot(rates, [value if math.isfinite(value) else math.nan for value in values],
                       "o-", label=label)
        lower.set_yscale("log")             # 2 ms idle to seconds overloaded
        plain = ticker.FuncFormatter(lambda value, position: f"{value:g}")
        lower.yaxis.set_major_formatter(plain)
        # Minor labels only at 2 and 5 of each decade: all of them overlap on a log axis.
        lower.yaxis.set_minor_formatter(ticker.FuncFormatter(
            lambda value, position: f"{value:g}" if f"{value:g}"[0] in "25" else ""))
        lower.set_ylabel("processing time (ms, log)")
        lower.set_xlabel("arrival rate (credit transfers per minute)")
        lower.legend(loc="upper left")
        for axes in (upper, lower):
            axes.grid(True, linewidth=0.3)
            axes.axvline(THESIS_CAPACITY_PER_MIN, linestyle=":", linewidth=0.8, color="grey")
        upper.annotate("thesis", (THESIS_CAPACITY_PER_MIN, 100), textcoords="offset points",
                       xytext=(3, -12), fontsize=8, color="grey")
        figure.tight_layout()
        figure.savefig(path, dpi=PLOT_DPI)
    finally:
        pyplot.close(figure)


class ProgressBar:
    """``[#####.....] 523/1000  6000/min`` redrawn in place; silent unless *stream* is a TTY."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.enabled = stream.isatty()
        self.label = ""

    def start(self, label: str) -> None:
        self.label = label
        self.update(0, 1)

    def update(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        filled = PROGRESS_BAR_CHARS * done // max(total, 1)
        bar = "#" * filled + "." * (PROGRESS_BAR_CHARS - filled)
        self.stream.write(f"\r[{bar}] {done}/{total}  {self.label}")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * (PROGRESS_BAR_CHARS + 40) + "\r")
            self.stream.flush()

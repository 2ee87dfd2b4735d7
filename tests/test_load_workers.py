"""``mpay-load --server-workers N``: a sweep against N PS processes on one port (issue 7).

The refusal without Redis, the server's CPU summed over its processes (on a
fake ``/proc`` and on real child processes), and a short real sweep against
``twistd mpay --workers 2`` on Redis + PostgreSQL and on Redis + the SQLite
file, with the books checked on the shared ledger.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys

from twisted.internet import defer
from twisted.trial import unittest

from mpay.cli import load
from mpay.load.report import CSV_FIELDS, csv_row, devices_line
from mpay.load.server import (
    WORKER_ONE_NAME, cpu_used, process_cpu_s, process_tree, tree_cpu_s, worker_names,
)
from tests.support import sweep_once

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CHILD_BURN_S = 0.2
SWEEP_COUNT = 300
SWEEP_RATE_PER_MIN = 6_000
"""Three seconds of transfers: low enough for this shared machine that every one succeeds."""


def refusal(argv: list[str]) -> str:
    """What mpay-load says on stderr when it refuses *argv* (it must exit 2)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            load.parse_args(argv)
        except SystemExit as exit_:
            assert exit_.code == 2, exit_.code
            return err.getvalue()
    raise AssertionError(f"{argv} was accepted")


class ServerWorkersOptionTests(unittest.TestCase):
    def test_several_server_processes_without_redis_are_refused_with_the_reason(self):
        for backends in ([], ["--backends", "postgres"]):
            said = refusal(["--server-workers", "2", *backends])
            self.assertIn("--server-workers 2 needs --backends redis", said)
            self.assertIn("share the device locations", said)

    def test_redis_alone_or_with_postgres_is_enough(self):
        for backends in ("redis", "redis,postgres"):
            args = load.parse_args(["--server-workers", "2", "--backends", backends])
            self.assertEqual(args.server_workers, 2)
        self.assertEqual(load.parse_args([]).server_workers, 1)

    def test_a_running_server_keeps_its_own_processes(self):
        running = ["--as", ":5070", "--ps", ":5060", "--ledger", "l.db", "--modem-control", "m",
                   "--as-key", "k", "--server-workers", "2"]
        self.assertIn("are for the server started here", refusal(running))
        self.assertIn("at least 1", refusal(["--server-workers", "0"]))


class FakeProc:
    """A ``/proc`` of a few processes: pid -> (parent, utime + stime ticks, command line)."""

    def __init__(self, root: str, processes: dict[int, tuple[int, int, list[str]]]):
        os.makedirs(root)
        os.makedirs(os.path.join(root, "self"))     # not a pid: skipped
        for pid, (parent, ticks, argv) in processes.items():
            self.write(root, pid, parent, ticks, argv)
        self.root = root

    @staticmethod
    def write(root: str, pid: int, parent: int, ticks: int, argv: list[str]) -> None:
        os.makedirs(os.path.join(root, str(pid)), exist_ok=True)
        # pid (comm) state ppid ... utime stime: the name may hold spaces and a ")".
        fields = ["S", str(parent)] + ["0"] * 9 + [str(ticks - ticks // 2), str(ticks // 2)]
        with open(os.path.join(root, str(pid), "stat"), "w") as stat:
            stat.write(f"{pid} (py thon) x) " + " ".join(fields + ["0"] * 8) + "\n")
        with open(os.path.join(root, str(pid), "cmdline"), "wb") as cmdline:
            cmdline.write(b"\0".join(arg.encode() for arg in argv) + b"\0")


class ServerCPUTests(unittest.TestCase):
    def test_the_servers_cpu_is_the_sum_over_worker_one_and_its_children(self):
        root = self.mktemp()
        child = ["python", "-c", "...", "mpay", "--set", "ps.instance_id=ps2"]
        third = child[:-1] + ["ps.instance_id=ps3"]
        FakeProc(root, {1: (0, 5, ["init"]), 100: (1, 300, ["twistd", "mpay", "--workers", "3"]),
                        101: (100, 200, child), 102: (100, 100, third),
                        103: (101, 10, ["helper"]), 200: (1, 999, ["unrelated"])})
        self.assertEqual(process_tree(100, root), [100, 101, 102, 103])
        self.assertEqual(process_cpu_s(101, root), 200 / CLOCK_TICKS)
        before = tree_cpu_s(100, root)
        self.assertAlmostEqual(sum(before.values()), 610 / CLOCK_TICKS)
        # Meanwhile worker 2 worked 50 ticks, worker 3 died and came back as 104; its
        # last seconds are lost.
        FakeProc.write(root, 101, 100, 250, child)
        for name in os.listdir(os.path.join(root, "102")):
            os.remove(os.path.join(root, "102", name))
        os.rmdir(os.path.join(root, "102"))
        FakeProc.write(root, 104, 100, 7, third)
        used = cpu_used(before, tree_cpu_s(100, root))
        self.assertEqual(sorted(used), [100, 101, 103, 104])
        self.assertAlmostEqual(used[101], 50 / CLOCK_TICKS)
        self.assertAlmostEqual(used[104], 7 / CLOCK_TICKS, msg="a new process counts whole")
        self.assertAlmostEqual(used[100], 0.0)
        self.assertEqual(worker_names(100, sorted(used), root),
                         {100: WORKER_ONE_NAME, 101: "ps2", 103: "pid103", 104: "ps3"})
        self.assertEqual(worker_names(100, [100, 103], root), {100: "ps", 103: "pid103"})
        FakeProc.write(root, 105, 100, 3, ["python", "-m", "mpay.payment.signature_jobs"])
        self.assertEqual(worker_names(100, [100, 105], root), {100: "ps", 105: "signatures105"},
                         "a PS's signature process is not a worker")
        FakeProc.write(root, 106, 100, 3, ["python", "-m", "mpay.ledger.writer_child"])
        self.assertEqual(worker_names(100, [100, 106], root), {100: "ps", 106: "writer106"},
                         "nor is its ledger writer")

    def test_real_children_are_found_and_their_cpu_counted(self):
        # Two children burn CHILD_BURN_S of CPU each, then all three wait for stdin to close.
        child = (f"import sys, time\nend = time.process_time() + {CHILD_BURN_S}\n"
                 "while time.process_time() < end: pass\nprint(flush=True)\nsys.stdin.read()\n")
        parent = subprocess.Popen(
            [sys.executable, "-c",
             "import subprocess, sys\n"
             f"children = [subprocess.Popen([sys.executable, '-c', {child!r}]) for _ in range(2)]\n"
             "sys.stdin.read()\n"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.addCleanup(parent.wait)
        self.addCleanup(parent.stdout.close)
        self.addCleanup(parent.stdin.close)
        parent.stdout.readline()
        parent.stdout.readline()        # both children have burnt theirs
        tree = process_tree(parent.pid)
        self.assertEqual(len(tree), 3, "the parent and its two children")
        seconds = tree_cpu_s(parent.pid)
        self.assertEqual(sorted(seconds), tree)
        self.assertLess(process_cpu_s(parent.pid), CHILD_BURN_S)
        self.assertGreaterEqual(sum(seconds.values()), 2 * CHILD_BURN_S - 2 / CLOCK_TICKS)
        self.assertIn(os.getpid(), process_tree(os.getppid()))


class ReportColumnsTests(unittest.TestCase):
    def test_the_process_count_and_each_processs_share_are_in_the_csv(self):
        from tests.test_load import outcome
        from mpay.load.run import RateReport
        from mpay.load.stats import RunStats

        stats = RunStats.from_outcomes(6_000, [outcome(0, 200, 3.0)], 5.0, server_cpu_pct=90.0,
                                       duration_s=1.0)
        report = RateReport(stats, True, "", 1, 0, 0, server_cpu_by_process=(
            ("ps1", 50.0), ("ps2", 40.0)), devices_by_process=(("ps1", 3, 5), ("ps2", 5, 3)))
        row = csv_row(report)
        self.assertEqual(set(row), set(CSV_FIELDS))
        self.assertEqual((row["server_processes"], row["server_cpu_by_process"],
                          row["devices_by_process"]), ("2", "ps1:50.0 ps2:40.0", "ps1:3+5 ps2:5+3"))
        self.assertIn("backend_cpu_pct", CSV_FIELDS)
        self.assertIn("(all on one of 2 processes)", devices_line((("ps2", 8, 8),), 2))


class ServerWorkersSweepTests(unittest.TestCase):
    """A short sweep against ``twistd mpay --workers 2``, for real."""

    timeout = 150    # seconds; a run takes about 15

    @defer.inlineCallbacks
    def sweep(self, backends: str):
        args, report, out = yield sweep_once(self, SWEEP_COUNT, [
            "--rates", str(SWEEP_RATE_PER_MIN),
            "--server-workers", "2", "--backends", backends])
        self.assertTrue(report.books_ok, report.audit_output)
        names = [name for name, _ in report.server_cpu_by_process]
        self.assertEqual([name for name in names if name.startswith("ps")], ["ps1", "ps2"])
        self.assertEqual(len([name for name in names if name.startswith("signatures")]), 2,
                         "each PS process has its signature process, and its CPU counts")
        self.assertEqual(len([name for name in names if name.startswith("writer")]), 2,
                         "and its ledger writer process")
        self.assertEqual(csv_row(report)["server_processes"], "6")
        self.assertEqual(sum(payers + payees for _, payers, payees in report.devices_by_process),
                         args.payers + args.payees, "every device is bound at some process")
        self.assertIn("devices per PS process (Redis bindings): ps", out)
        leftovers = yield args.production.leftovers()
        self.assertEqual(leftovers, (0, False), "the run's keys and schema are gone")

    def test_two_ps_processes_on_redis_and_postgres_keep_the_books(self):
        return self.sweep("redis,postgres")

    def test_two_ps_processes_on_redis_and_one_sqlite_file_keep_the_books(self):
        return self.sweep("redis")

"""``mpay-load`` end to end: the real server, enrolled payers and payees, two small rates.

The command is run as a user runs it (its own process, which starts
``twistd mpay`` as its child); the test reads what it wrote: the CSV, the
PNG, the books' verdict and the capacity line.  The rates are low enough
for this shared 2-core machine that every transfer must succeed.
"""

from __future__ import annotations

import csv
import os

from twisted.internet import defer, utils
from twisted.trial import unittest

from mpay.load.server import BIN, REPO

MPAY_LOAD = os.path.join(BIN, "mpay-load")
RATES_PER_MIN = (1_500, 3_000)
COUNT_PER_RATE = 50
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class LoadCommandTests(unittest.TestCase):
    timeout = 90    # seconds; a run takes about 15

    @defer.inlineCallbacks
    def test_two_rates_every_transfer_confirmed_and_in_the_books(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        table, picture = os.path.join(directory, "load.csv"), os.path.join(directory, "load.png")
        timeline = os.path.join(directory, "seconds.csv")
        out, err, code = yield utils.getProcessOutputAndValue(
            MPAY_LOAD, ["--rates", ",".join(map(str, RATES_PER_MIN)),
                        "--count", str(COUNT_PER_RATE), "--payers", "2", "--payees", "2",
                        "--workers", "2", "--generator", "stack", "--csv", table, "--plot", picture,
                        "--timeline", timeline],
            env=dict(os.environ), path=REPO)
        output = (out + err).decode("utf-8", "replace")
        self.assertEqual(code, 0, output)
        lines = output.strip().splitlines()
        self.assertIn("books: every audit passed, every 200 is in the journal", lines)
        self.assertTrue(lines[-1].startswith("capacity: rate_per_min=3000 success=1.0000"),
                        output)
        self.assertIn("thesis_ratio=1.88", lines[-1])

        with open(table, encoding="utf-8") as stream:
            rows = list(csv.DictReader(stream))
        self.assertEqual([float(row["rate_per_min"]) for row in rows], list(RATES_PER_MIN))
        for row in rows:
            self.assertEqual((row["count"], row["succeeded"], row["statuses"]),
                             (str(COUNT_PER_RATE), str(COUNT_PER_RATE), f"200:{COUNT_PER_RATE}"))
            self.assertEqual((row["audit_ok"], row["journal_checked"], row["journal_missing"]),
                             ("true", str(COUNT_PER_RATE), "0"))
            self.assertEqual(float(row["success"]), 1.0)
            self.assertGreater(float(row["server_cpu_pct"]), 0.0)
            self.assertGreater(float(row["generator_cpu_pct"]), 0.0)
            self.assertLessEqual(float(row["mean_ms"]), float(row["p99_ms"]))
        with open(picture, "rb") as stream:
            self.assertEqual(stream.read(len(PNG_SIGNATURE)), PNG_SIGNATURE)
        with open(timeline, encoding="utf-8") as stream:
            seconds = list(csv.DictReader(stream))
        for rate, row in zip(RATES_PER_MIN, rows):      # every request in one of its seconds
            mine = [second for second in seconds if float(second["rate_per_min"]) == rate]
            self.assertEqual(sum(int(second["sent"]) for second in mine), COUNT_PER_RATE)
            self.assertEqual({second["failed"] for second in mine}, {"0"})
            self.assertEqual(row["slow_seconds"].split("/")[1], str(len(mine)))

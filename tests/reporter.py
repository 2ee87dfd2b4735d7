"""A trial reporter whose last line is ``tests: N passed, N failed, N skipped``.

CI reads a run's outcome from that plain line; trial's own summary
(``PASSED (successes=N)``) stays just above it for people.
"""

from twisted.trial.reporter import TreeReporter


class CountingReporter(TreeReporter):
    def done(self):
        super().done()
        failed = len(self.failures) + len(self.errors) + len(self.unexpectedSuccesses)
        passed = self.successes + len(self.expectedFailures)
        self._write("tests: %d passed, %d failed, %d skipped\n" % (passed, failed, len(self.skips)))

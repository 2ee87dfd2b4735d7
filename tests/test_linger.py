"""The linger store of completed transactions (mpay/sip/linger.py): never early, a sweep late at most."""

from math import ceil

from hypothesis import given, settings, strategies as st
from twisted.internet import task
from twisted.trial import unittest

from mpay.sip.linger import LINGER_SWEEP_S, Linger

from tests.support import ClockWheel

_FLOAT_SLACK_S = 1e-6


class ClockTimers:
    """``start(delay_s, callback)`` on a task.Clock: exact times, for the property."""

    def __init__(self):
        self.clock = task.Clock()

    def start(self, delay_s, callback, *args):
        return self.clock.callLater(delay_s, callback, *args)

    def run_for(self, seconds):
        """Advance to each call's own time (one ``advance`` runs a re-armed call once)."""
        end = self.clock.seconds() + seconds
        while True:
            due = [call.getTime() for call in self.clock.getDelayedCalls()]
            if not due or min(due) > end:
                break
            self.clock.advance(min(due) - self.clock.seconds())
        self.clock.advance(end - self.clock.seconds())


class LingerTests(unittest.TestCase):
    @settings(max_examples=200, deadline=None)
    @given(delay_s=st.floats(0.05, 40), sweep_s=st.floats(0.01, 1.0),
           gaps=st.lists(st.floats(0, 3), min_size=1, max_size=30))
    def test_an_entry_lives_its_delay_and_at_most_a_sweep_more_rounded_up(self, delay_s, sweep_s, gaps):
        timers = ClockTimers()
        expired = {}
        linger = Linger(timers, delay_s, lambda key, value: expired.setdefault(key, (
            timers.clock.seconds(), value)), sweep_s=sweep_s)
        added = {}
        for n, gap in enumerate(gaps):
            timers.run_for(gap)
            added[n] = timers.clock.seconds()
            linger.add(n, f"v{n}")
        timers.run_for(delay_s + 2 * sweep_s + 1)
        self.assertEqual(set(expired), set(added))
        for n, (at, value) in expired.items():
            self.assertEqual(value, f"v{n}")
            lived = at - added[n]
            self.assertGreaterEqual(lived, delay_s - _FLOAT_SLACK_S, "never early")
            # Whole sweeps: one late at most past the delay rounded up to sweeps.
            self.assertLessEqual(lived, (ceil(delay_s / sweep_s - 1e-9) + 1) * sweep_s
                                 + _FLOAT_SLACK_S)
        self.assertEqual((len(linger), timers.clock.getDelayedCalls()), (0, []),
                         "empty: no timer left running")

    def test_lookups_while_kept(self):
        timers = ClockTimers()
        linger = Linger(timers, 1.0)
        linger.add(("branch", "h", 5060, "MESSAGE"), (b"SIP/2.0 200 OK", ("h", 5060)))
        self.assertIn(("branch", "h", 5060, "MESSAGE"), linger)
        self.assertEqual(linger.get(("branch", "h", 5060, "MESSAGE"))[0], b"SIP/2.0 200 OK")
        self.assertIsNone(linger.get("other"))
        self.assertEqual(len(timers.clock.getDelayedCalls()), 1, "one timer for every entry")
        timers.run_for(1.0 + LINGER_SWEEP_S)
        self.assertNotIn(("branch", "h", 5060, "MESSAGE"), linger)

    def test_a_stalled_reactor_makes_entries_live_longer_never_shorter(self):
        time = ClockWheel(self)
        linger = Linger(time.wheel, 1.0)
        linger.add("k", None)
        time.clock.advance(5.0)          # one reactor turn 5 s late: one sweep, not fifty
        self.assertIn("k", linger)
        time.advance(1.2)
        self.assertNotIn("k", linger)
        self.assertEqual(len(time.wheel), 0)

    def test_a_failing_callback_stops_neither_expiry_nor_the_sweeps(self):
        timers = ClockTimers()
        gone = []

        def on_expire(key, value):
            gone.append(key)
            if key == "bad":
                raise RuntimeError("a bug upstream")

        linger = Linger(timers, 0.3, on_expire, sweep_s=0.1)
        linger.add("bad", None)
        timers.run_for(0.2)
        linger.add("later", None)
        timers.run_for(1.0)
        self.assertEqual(gone, ["bad", "later"])
        self.assertEqual(len(linger), 0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_a_key_completes_once(self):
        linger = Linger(ClockTimers(), 1.0)
        linger.add("k", None)
        self.assertRaises(AssertionError, linger.add, "k", None)

"""Tests for mpay.timewheel: the wheel against a reference model, and its driver.

Work per tick is asserted as a count of moves, never as wall-clock time.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from twisted.internet import task
from twisted.trial import unittest

from mpay.timewheel import MAX_CATCHUP_TICKS, MAX_DELAY_S, TICK_S, TimerHandle, TimeWheel
from mpay.timewheel_service import TimeWheelService

# Small levels so that a few hundred ticks cross every level and the overflow.
SMALL_LEVELS = (3, 12, 48)
VARIANTS = (("balanced", True), ("classic", False))


def assert_wheel_consistent(wheel: TimeWheel) -> None:
    """Every timer sits where its deadline says, and the count adds up."""
    now, held = wheel.now_tick, 0
    for k, ring in enumerate(wheel._rings):
        width, nslots, limit = wheel._widths[k], wheel._nslots[k], wheel._limits[k]
        for i, slot in enumerate(ring):
            for handle in slot:
                assert handle._slot is slot
                assert (handle.deadline_tick // width) % nslots == i
                assert now < handle.deadline_tick < limit, (k, now, handle)
                # Above level 0, a slot is empty by the time its period begins.
                assert k == 0 or handle.deadline_tick >= (now // width + 1) * width, (k, now, handle)
                held += 1
    top = wheel._spans[-1]
    for day, slot in wheel._overflow.items():
        for handle in slot:
            assert handle._slot is slot and handle.deadline_tick // top == day
            assert handle.deadline_tick >= (now // top + 1) * top, (now, handle)
            held += 1
    queued = sum(1 for handle in wheel._queue if handle._slot is not None)
    assert held + queued == len(wheel), (held, queued, len(wheel))


class WheelModel(RuleBasedStateMachine):
    """Both variants driven by the same operations, each checked against a model.

    The model is a dict of expected deadline ticks: a timer must fire on
    exactly that tick (the test drains after every tick), once, and never
    after it was cancelled.  Callbacks may start timers or cancel timers.
    """

    def __init__(self) -> None:
        super().__init__()
        self.wheels = {name: TimeWheel(levels=SMALL_LEVELS, balanced=b) for name, b in VARIANTS}
        self.handles: dict[str, dict[object, TimerHandle]] = {name: {} for name in self.wheels}
        self.due: dict[str, dict[object, int]] = {name: {} for name in self.wheels}
        self.fired: dict[str, set] = {name: set() for name in self.wheels}
        self.cancelled: dict[str, set] = {name: set() for name in self.wheels}
        self.ids: list[object] = []

    def _start(self, name: str, tid: object, ticks: int, half: bool, action: tuple) -> None:
        wheel = self.wheels[name]
        delay_s = (ticks + (0.5 if half else 0.0)) * wheel.tick_s
        self.due[name][tid] = wheel.now_tick + max(1, ticks + half)
        self.handles[name][tid] = wheel.start(delay_s, self._fire, name, tid, action)

    def _cancel(self, name: str, tid: object) -> None:
        if tid not in self.fired[name]:
            self.cancelled[name].add(tid)
        self.handles[name][tid].cancel()

    def _fire(self, name: str, tid: object, action: tuple) -> None:
        now = self.wheels[name].now_tick
        assert tid not in self.fired[name], f"{tid} fired twice"
        assert tid not in self.cancelled[name], f"{tid} fired after cancel"
        assert now == self.due[name][tid], (tid, now, self.due[name][tid])
        self.fired[name].add(tid)
        kind, arg = action
        if kind == "start":  # a child started from the callback
            self._start(name, ("child", tid), arg, False, ("none", 0))
        elif kind == "cancel":
            self._cancel(name, self.ids[arg % len(self.ids)])
        elif kind == "self":
            self._cancel(name, tid)  # too late to matter: must be a no-op

    delays = st.one_of(
        st.sampled_from([0, 1, 2, 3, 4, 11, 12, 13, 24, 47, 48, 49, 96, 143, 144, 145]),
        st.integers(min_value=0, max_value=200),
    )
    actions = st.one_of(
        st.just(("none", 0)),
        st.tuples(st.just("start"), delays),
        st.tuples(st.sampled_from(["cancel", "self"]), st.integers(0, 10_000)),
    )

    @rule(ticks=delays, half=st.booleans(), action=actions)
    def start(self, ticks: int, half: bool, action: tuple) -> None:
        tid = len(self.ids)
        self.ids.append(tid)
        for name in self.wheels:
            self._start(name, tid, ticks, half, action)

    @precondition(lambda self: self.ids)
    @rule(index=st.integers(0, 10_000))
    def cancel(self, index: int) -> None:
        tid = self.ids[index % len(self.ids)]
        for name in self.wheels:
            self._cancel(name, tid)

    @rule(count=st.integers(1, 60))
    def advance(self, count: int) -> None:
        for wheel in self.wheels.values():
            for _ in range(count):
                wheel.tick()
                while wheel.drain(7):
                    pass

    @invariant()
    def consistent(self) -> None:
        for name, wheel in self.wheels.items():
            assert_wheel_consistent(wheel)
            live = set(self.due[name]) - self.fired[name] - self.cancelled[name]
            assert len(wheel) == len(live), (name, len(wheel), len(live))

    def teardown(self) -> None:
        self.advance(2 * 200 + 2)  # the longest chain: a 200-tick child of a 200-tick timer
        for name, wheel in self.wheels.items():
            assert self.fired[name] == set(self.due[name]) - self.cancelled[name], name
            assert len(wheel) == 0 and wheel.pending == 0


def run_until(wheel: TimeWheel, tick: int) -> None:
    while wheel.now_tick < tick:
        wheel.tick()
        wheel.drain()


class TimeWheelTests(unittest.TestCase):
    def test_model_state_machine(self) -> None:
        """Random starts, cancels and callback actions against the model."""
        run_state_machine_as_test(
            WheelModel,
            settings=settings(
                max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
            ),
        )

    def fire_ticks(self, wheel: TimeWheel, delays_s: list[float], until: int) -> dict[float, int]:
        fired: dict[float, int] = {}
        for delay_s in delays_s:
            wheel.start(delay_s, lambda d: fired.setdefault(d, wheel.now_tick), delay_s)
        run_until(wheel, until)
        return fired

    def test_delays_round_up_to_whole_ticks(self) -> None:
        """Delay 0 fires on the next tick; a fraction rounds up; float noise does not."""
        for name, balanced in VARIANTS:
            wheel = TimeWheel(balanced=balanced)
            fired = self.fire_ticks(wheel, [0.0, 0.01, 0.1, 0.25, 0.3, 0.7, 1.1, 2.3], 30)
            expected = {0.0: 1, 0.01: 1, 0.1: 1, 0.25: 3, 0.3: 3, 0.7: 7, 1.1: 11, 2.3: 23}
            self.assertEqual(fired, expected, name)

    def test_default_level_boundaries_and_overflow(self) -> None:
        """Delays of exactly 1 s, 1 min, 1 h, 1 day and just past them (overflow)."""
        delays = [1.0, 1.1, 60.0, 60.1, 3600.0, 3600.1, 7200.0, 86_399.9, 86_400.0, 86_400.1]
        for name, balanced in VARIANTS:
            wheel = TimeWheel(balanced=balanced)
            doomed = wheel.start(86_400.1, self.fail, "cancelled overflow timer fired")
            run_until(wheel, 5)  # start off a boundary too
            doomed.cancel()
            base = wheel.now_tick
            fired = self.fire_ticks(wheel, delays, base + 864_002)
            self.assertEqual(fired, {d: base + round(d * 10) for d in delays}, name)
            self.assertEqual(len(wheel), 0)

    def test_cancel(self) -> None:
        """Cancel is idempotent, works while queued, and is a no-op after firing."""
        wheel, fired = TimeWheel(), []
        kept = wheel.start(0.5, fired.append, "kept")
        dropped = wheel.start(0.5, fired.append, "dropped")
        queued = wheel.start(0.5, fired.append, "queued")
        self.assertEqual(len(wheel), 3)
        dropped.cancel()
        dropped.cancel()
        self.assertFalse(dropped.active)
        self.assertEqual(len(wheel), 2)
        for _ in range(5):
            wheel.tick()
        self.assertEqual(wheel.pending, 2)  # expired but not run yet
        queued.cancel()
        self.assertEqual(wheel.drain(), 1)
        self.assertEqual(fired, ["kept"])
        kept.cancel()
        self.assertEqual((len(wheel), wheel.total_fired, kept.active), (0, 1, False))

    def test_callbacks_start_and_cancel_timers(self) -> None:
        """A callback may start a timer, cancel a sibling due the same tick, or itself."""
        wheel, fired = TimeWheel(), []
        handles: dict[str, TimerHandle] = {}

        def first() -> None:
            fired.append("first")
            handles["first"].cancel()
            handles["sibling"].cancel()
            wheel.start(0, fired.append, "child")

        handles["first"] = wheel.start(0.3, first)
        handles["sibling"] = wheel.start(0.3, fired.append, "sibling")
        run_until(wheel, 3)
        self.assertIn(fired, (["first"], ["sibling", "first"]))
        run_until(wheel, 4)
        self.assertEqual(fired[-1], "child")
        self.assertEqual(len(wheel), 0)

    def test_raising_callback_is_logged_and_others_run(self) -> None:
        wheel, fired = TimeWheel(), []
        wheel.start(0, fired.append, 1)
        wheel.start(0, lambda: 1 / 0)
        wheel.start(0, fired.append, 2)
        wheel.tick()
        self.assertEqual(wheel.drain(), 3)
        self.assertEqual(fired, [1, 2])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_drain_runs_bounded_batches(self) -> None:
        wheel = TimeWheel()
        for _ in range(25):
            wheel.start(0, lambda: None)
        wheel.tick()
        self.assertEqual([wheel.drain(10), wheel.drain(10), wheel.drain(10)], [10, 10, 5])

    def test_rejects_bad_arguments(self) -> None:
        wheel = TimeWheel()
        for delay in (-0.1, float("nan"), MAX_DELAY_S + 1):
            self.assertRaises(ValueError, wheel.start, delay, lambda: None)
        for levels in ((10, 15), (1,), (10, 5), ()):
            self.assertRaises(ValueError, TimeWheel, levels=levels)
        self.assertRaises(ValueError, TimeWheel, tick_s=0)
        self.assertFalse(hasattr(wheel.start(1, lambda: None), "__dict__"))

    def test_balanced_moves_are_flat_classic_bursts(self) -> None:
        """20,000 timers in one hour slot: a trickle per tick against one burst."""
        hour = 36_000  # ticks
        results = {}
        for name, balanced in VARIANTS:
            wheel = TimeWheel(balanced=balanced)
            for i in range(20_000):  # spread over hour 2, which starts at tick 72,000
                wheel.start((2 * hour + (i * 9_973) % hour) * TICK_S, lambda: None)
            run_until(wheel, 3 * hour)
            self.assertEqual((len(wheel), wheel.total_fired), (0, 20_000))
            results[name] = wheel.max_moves
        self.assertLessEqual(results["balanced"], 3)
        self.assertGreaterEqual(results["classic"], 20_000)


class _DrainSpy:
    """A wheel that records what each ``drain()`` ran."""

    def __init__(self, wheel: TimeWheel, batches: list[int]):
        self._wheel, self._batches = wheel, batches

    def __getattr__(self, name: str):
        return getattr(self._wheel, name)

    def drain(self, max_batch: int) -> int:
        ran = self._wheel.drain(max_batch)
        self._batches.append(ran)
        return ran


class TimeWheelServiceTimingTests(unittest.TestCase):
    @given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 80)), min_size=1, max_size=30))
    @settings(max_examples=50, deadline=None)
    def test_never_early_at_most_one_tick_late_in_reactor_time(self, steps: list[tuple[int, int]]) -> None:
        """Timers started between ticks, the clock jumping by odd amounts (1/64 s units)."""
        clock, wheel = task.Clock(), TimeWheel(tick_s=0.125)
        driver = TimeWheelService(wheel, reactor=clock)
        driver.startService()
        timers: list[tuple[float, TimerHandle]] = []
        fired: dict[int, float] = {}
        for advance, delay in steps:
            due = clock.seconds() + delay / 64
            timers.append((due, driver.start(delay / 64, fired.__setitem__, len(timers), due)))
            clock.advance(advance / 64)
        clock.advance(2.0)
        driver.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(len(fired), len(timers))
        for i, (due, handle) in enumerate(timers):
            self.assertGreaterEqual(fired[i], due)
            # The tick it fired on is not before its time, and at most one tick after.
            self.assertTrue(due <= handle.deadline_tick * 0.125 <= due + 0.125, (due, handle))

    def test_tick_count_survives_float_noise(self) -> None:
        """At 0.1 s, k * 0.1 / 0.1 is a hair under k for some k (43 is the first)."""
        clock, wheel = task.Clock(), TimeWheel()
        driver = TimeWheelService(wheel, reactor=clock)
        driver.startService()
        for k in range(1, 200):
            clock.advance(k * 0.1 - clock.seconds())  # where LoopingCall schedules its calls
            self.assertEqual(wheel.now_tick, k)
        driver.stopService()


class TimeWheelServiceTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.wheel = TimeWheel(tick_s=0.125)  # a binary fraction: no float noise in Clock
        self.fired: list[tuple[str, float]] = []
        self.service = TimeWheelService(self.wheel, reactor=self.clock, max_batch=10)
        self.service.startService()
        self.addCleanup(lambda: self.assertEqual(self.clock.getDelayedCalls(), []))
        self.addCleanup(self.service.stopService)

    def record(self, label: str) -> None:
        self.fired.append((label, self.clock.seconds()))

    def test_ticks_fire_timers_on_time(self) -> None:
        for delay in (0.0, 0.125, 0.3, 1.0):
            self.service.start(delay, self.record, str(delay))
        for _ in range(12):
            self.clock.advance(0.125)
        self.assertEqual(self.fired, [("0.0", 0.125), ("0.125", 0.125), ("0.3", 0.375), ("1.0", 1.0)])

    def test_start_counts_from_reactor_time_not_last_tick(self) -> None:
        self.clock.advance(0.1875)  # tick 1 ran at 0.125; we are 0.0625 s past it
        self.service.start(0.125, self.record, "x")
        self.clock.advance(0.0625)  # 0.25: counted from tick 1 it would fire here, early
        self.assertEqual(self.fired, [])
        self.clock.advance(0.125)
        self.assertEqual(self.fired, [("x", 0.375)])

    def test_catches_up_after_stall_without_losing_timers(self) -> None:
        for i in range(5):
            self.wheel.start(1.0 + i, self.record, str(i))
        self.clock.advance(10.0)  # one late LoopingCall call instead of 80
        self.assertEqual(self.wheel.now_tick, 80)
        self.assertEqual([label for label, _ in self.fired], ["0", "1", "2", "3", "4"])
        self.assertEqual(self.service.stalls, 1)

    def spy_on_drain(self) -> list[int]:
        """Record what each drain() ran: the driver drains once per reactor turn.  (The
        compiled wheel's methods cannot be replaced: the driver gets a wheel that tells.)"""
        batches: list[int] = []
        self.service.wheel = _DrainSpy(self.wheel, batches)
        return batches

    def test_long_stall_continues_on_next_turn(self) -> None:
        batches = self.spy_on_drain()
        self.wheel.start(MAX_CATCHUP_TICKS * 0.125 + 1.0, self.record, "late")
        self.clock.advance(MAX_CATCHUP_TICKS * 0.125 + 10.0)
        self.assertEqual(self.wheel.now_tick, MAX_CATCHUP_TICKS + 80)
        self.assertEqual(batches, [0, 1])  # two turns: MAX_CATCHUP_TICKS ticks, then 80
        self.assertEqual([label for label, _ in self.fired], ["late"])

    def test_big_expiry_is_drained_over_several_turns(self) -> None:
        batches = self.spy_on_drain()
        for i in range(25):
            self.wheel.start(0, self.record, str(i))
        self.clock.advance(0.125)  # task.Clock runs the callLater(0) turns at once
        self.assertEqual(batches, [10, 10, 5])
        self.assertEqual(len(self.fired), 25)
        self.assertEqual(self.wheel.pending, 0)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # only the loop

    def test_stop_service_leaves_no_delayed_call(self) -> None:
        self.clock.advance(1.0)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_service_cancels_pending_continuation(self) -> None:
        """Stopped in the same turn, after a batch left the rest for later."""
        for i in range(25):
            self.wheel.start(0, self.record, str(i))
        self.clock.callLater(0.125, self.service.stopService)  # runs after the loop's call
        self.clock.advance(0.125)
        self.assertEqual(len(self.fired), 10)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1.0)
        self.assertEqual(len(self.fired), 10)

    def test_stop_service_from_a_callback(self) -> None:
        def record_and_stop(label: str) -> None:
            self.record(label)
            if len(self.fired) == 5:
                self.service.stopService()

        for i in range(25):
            self.wheel.start(0, record_and_stop, str(i))
        self.clock.advance(0.125)  # the batch in progress completes, no more
        self.assertEqual(len(self.fired), 10)
        self.assertEqual(self.clock.getDelayedCalls(), [])

"""Guess blocking: one suite for the memory guard (time wheel on task.Clock) and the Redis guard."""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.trial import unittest

from mpay.payment.guard import (BLOCK_S, GUESS_LIMIT, GUESS_WINDOW_S, Guess, GuessCounter,
                                MemoryGuessGuard, RedisGuessGuard)
from mpay.stores.otcn import MemoryOTCNStore, RedisOTCNStore

from tests.support import ClockWheel
from tests.test_otcn import RedisFixture

MERCHANT = "+886223456789"
OTHER_MERCHANT = "+886277778888"
CONSUMER = "+886912345678"
NOBODYS_OTCN = "4111111111111111"
# Redis keeps real time: short periods keep the suite quick, the window long
# enough that six failures sent back to back always fall inside it.
REDIS_WINDOW_S = 1.5
REDIS_BLOCK_S = 1.0
REDIS_POLL_LIMIT_S = 5.0


@defer.inlineCallbacks
def answer_charge(guard, otcns, merchant: str, otcn: str):
    """The order the PS follows for a charge naming an OTCN: the status it answers.

    Blocked merchants are refused before the OTCN is looked at, so a blocked
    merchant cannot use up (or learn anything about) a consumer's OTCN.
    """
    if (yield guard.is_blocked(merchant)):
        return 403
    grant = yield otcns.consume(otcn)
    if grant is None:
        return 403 if (yield guard.failure(merchant)) else 404
    return 200


class GuessGuardBehaviour:
    """Subclasses provide self.guard, self.otcns, lapse_window() and lapse_block()."""

    @defer.inlineCallbacks
    def fail(self, times: int, merchant: str = MERCHANT):
        verdicts = []
        for _ in range(times):
            verdicts.append((yield self.guard.failure(merchant)))
        return verdicts

    @defer.inlineCallbacks
    def test_sixth_failure_within_the_window_blocks(self):
        self.assertEqual((yield self.fail(GUESS_LIMIT)), [False] * GUESS_LIMIT)
        self.assertFalse((yield self.guard.is_blocked(MERCHANT)))
        self.assertTrue((yield self.guard.failure(MERCHANT)))
        self.assertTrue((yield self.guard.is_blocked(MERCHANT)))

    @defer.inlineCallbacks
    def test_charge_flow_five_404s_then_403_even_for_a_valid_otcn(self):
        statuses = []
        for _ in range(GUESS_LIMIT + 1):
            statuses.append((yield answer_charge(self.guard, self.otcns, MERCHANT, NOBODYS_OTCN)))
        self.assertEqual(statuses, [404] * GUESS_LIMIT + [403])
        grant = yield self.otcns.issue(CONSUMER, None)
        self.assertEqual((yield answer_charge(self.guard, self.otcns, MERCHANT, grant.otcn)), 403)
        self.assertEqual((yield self.otcns.peek(grant.otcn)), grant, "the consumer's OTCN is unused")
        status = yield answer_charge(self.guard, self.otcns, OTHER_MERCHANT, grant.otcn)
        self.assertEqual(status, 200)

    @defer.inlineCallbacks
    def test_block_lapses_and_gives_the_full_allowance_back(self):
        yield self.fail(GUESS_LIMIT + 1)
        self.assertTrue((yield self.guard.is_blocked(MERCHANT)))
        yield self.lapse_block()
        self.assertFalse((yield self.guard.is_blocked(MERCHANT)))
        self.assertEqual((yield self.fail(GUESS_LIMIT + 1)), [False] * GUESS_LIMIT + [True])

    @defer.inlineCallbacks
    def test_failures_outside_the_window_do_not_accumulate(self):
        yield self.fail(GUESS_LIMIT)
        yield self.lapse_window()
        self.assertEqual((yield self.fail(GUESS_LIMIT)), [False] * GUESS_LIMIT)
        self.assertFalse((yield self.guard.is_blocked(MERCHANT)))

    @defer.inlineCallbacks
    def test_one_merchants_guesses_do_not_block_another(self):
        yield self.fail(GUESS_LIMIT + 1)
        self.assertFalse((yield self.guard.is_blocked(OTHER_MERCHANT)))
        self.assertEqual((yield self.fail(GUESS_LIMIT, OTHER_MERCHANT)), [False] * GUESS_LIMIT)

    @defer.inlineCallbacks
    def test_clear_lifts_a_block(self):
        yield self.fail(GUESS_LIMIT + 1)
        yield self.guard.clear(MERCHANT)
        self.assertFalse((yield self.guard.is_blocked(MERCHANT)))
        self.assertEqual((yield self.fail(GUESS_LIMIT)), [False] * GUESS_LIMIT)


class MemoryGuessGuardTests(GuessGuardBehaviour, unittest.TestCase):
    def setUp(self):
        self.time = ClockWheel(self)
        self.guard = MemoryGuessGuard(self.time.wheel, self.time.clock.seconds)
        self.otcns = MemoryOTCNStore(self.time.wheel, self.time.clock.seconds)

    def lapse_window(self):
        self.time.advance(GUESS_WINDOW_S)
        return defer.succeed(None)

    def lapse_block(self):
        self.time.advance(BLOCK_S)
        return defer.succeed(None)

    def fail_at(self, *times: float):
        """One failure at each of these clock times (s); the verdicts."""
        verdicts = []
        for when in times:
            self.time.advance(when - self.time.clock.seconds())
            verdicts.append(self.successResultOf(self.guard.failure(MERCHANT)))
        return verdicts

    def test_the_window_slides(self):
        # The failure at 0 leaves the window at 600 exactly, so 600 is the
        # fifth in the window and 601 the sixth.
        self.assertEqual(self.fail_at(0, 100, 200, 300, 400, 600, 601), [False] * 6 + [True])

    def test_no_burst_across_a_window_boundary(self):
        verdicts = self.fail_at(*[599.0] * GUESS_LIMIT, 601)
        self.assertEqual(verdicts, [False] * GUESS_LIMIT + [True])

    def test_failures_while_blocked_do_not_extend_the_block(self):
        self.fail_at(*[10.0] * (GUESS_LIMIT + 1))
        self.assertEqual(self.fail_at(10 + BLOCK_S - 1), [True])
        self.time.advance(1)
        self.assertFalse(self.successResultOf(self.guard.is_blocked(MERCHANT)))

    def test_quiet_merchants_are_forgotten(self):
        self.fail_at(0)
        self.successResultOf(self.guard.failure(OTHER_MERCHANT))
        self.assertEqual((len(self.guard), len(self.time.wheel)), (2, 2), "one timer per merchant")
        self.time.advance(GUESS_WINDOW_S)
        self.assertEqual((len(self.guard), len(self.time.wheel)), (0, 0))

    def test_a_blocked_merchant_is_remembered_until_the_block_ends(self):
        self.fail_at(*[0.0] * (GUESS_LIMIT + 1))
        self.time.advance(BLOCK_S - 0.1)
        self.assertEqual(len(self.guard), 1)
        self.time.advance(0.1)
        self.assertEqual((len(self.guard), len(self.time.wheel)), (0, 0))

    def test_limits_must_be_sane(self):
        for limit, window_s, block_s in ((0, 600, 600), (1.5, 600, 600), (10_001, 600, 600),
                                         (5, 0, 600), (5, 600, -1), (5, float("nan"), 600)):
            self.assertRaises(ValueError, GuessCounter, limit, window_s, block_s)


class GuessCounterProperties(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.floats(0, 50, allow_nan=False), max_size=60),
           st.integers(1, 6), st.integers(1, 20), st.integers(1, 20))
    def test_never_more_than_the_limit_within_a_window(self, gaps, limit, window_s, block_s):
        counter = GuessCounter(limit, window_s, block_s)
        now, counted = 0.0, []
        for gap in gaps:
            now += gap
            was_blocked = counter.is_blocked(MERCHANT, now)
            verdict = counter.failure(MERCHANT, now)
            self.assertEqual(verdict is Guess.WAS_BLOCKED, was_blocked)
            if verdict is Guess.COUNTED:
                counted.append(now)
                self.assertLessEqual(len([t for t in counted if t > now - window_s]), limit)
            if verdict is Guess.BLOCKED:
                self.assertEqual(len([t for t in counted if t > now - window_s]), limit)
                self.assertTrue(counter.is_blocked(MERCHANT, now + block_s - 0.5))
                self.assertFalse(counter.is_blocked(MERCHANT, now + block_s))
                counted = []


class RedisGuessGuardTests(RedisFixture, GuessGuardBehaviour, unittest.TestCase):
    """Against the Redis on 127.0.0.1:6379, under a key prefix of this run's own."""

    redis_pool_size = 4

    @defer.inlineCallbacks
    def setUp(self):
        yield self.connect_test_redis()
        self.guard = RedisGuessGuard(self.redis, prefix=self.prefix,
                                     window_s=REDIS_WINDOW_S, block_s=REDIS_BLOCK_S)
        self.otcns = RedisOTCNStore(self.redis, prefix=self.prefix)

    @defer.inlineCallbacks
    def lapse_window(self):
        @defer.inlineCallbacks
        def forgotten():
            return not (yield self.redis.exists(self.prefix + "guess:" + MERCHANT))

        self.assertTrue((yield self.poll_until(forgotten, REDIS_POLL_LIMIT_S)))

    @defer.inlineCallbacks
    def lapse_block(self):
        @defer.inlineCallbacks
        def unblocked():
            return not (yield self.guard.is_blocked(MERCHANT))

        self.assertTrue((yield self.poll_until(unblocked, REDIS_POLL_LIMIT_S)))

    @defer.inlineCallbacks
    def test_concurrent_failures_let_exactly_the_limit_through(self):
        verdicts = yield defer.gatherResults([self.guard.failure(MERCHANT) for _ in range(24)])
        self.assertEqual(verdicts.count(False), GUESS_LIMIT)

    @defer.inlineCallbacks
    def test_keys_stay_small_and_expire(self):
        failures_key = self.prefix + "guess:" + MERCHANT
        block_key = self.prefix + "block:" + MERCHANT
        yield self.fail(GUESS_LIMIT)
        self.assertEqual((yield self.redis.zcard(failures_key)), GUESS_LIMIT)
        failures_ttl_ms = yield self.redis.execute_command("PTTL", failures_key)
        self.assertTrue(0 < failures_ttl_ms <= REDIS_WINDOW_S * 1000, failures_ttl_ms)
        yield self.guard.failure(MERCHANT)
        self.assertFalse((yield self.redis.exists(failures_key)), "the count starts afresh")
        block_ttl_ms = yield self.redis.execute_command("PTTL", block_key)
        self.assertTrue(0 < block_ttl_ms <= REDIS_BLOCK_S * 1000, block_ttl_ms)

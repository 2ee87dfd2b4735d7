"""OTCNs: the Luhn check, what people type, one store suite for memory (time wheel) and Redis."""

import secrets

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mpay.payment import otcn as otcns
from mpay.payment.otcn import (MAX_OTCN_TEXT_CHARS, OTCN_DIGITS, OTCN_LIFETIME_S, InvalidOTCN,
                               OTCNGrant, format_otcn, is_otcn, luhn_valid, new_otcn,
                               normalise_otcn, otcn_in_user, with_check_digit)
from mpay.stores.location import connect_redis
from mpay.stores.otcn import MemoryOTCNStore, OTCNExhausted, RedisOTCNStore
from mpay.timewheel import TimeWheel

from tests.support import ClockWheel

CONSUMER = "+886912345678"
OTHER = "+886987654321"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_READY_TIMEOUT_S = 5        # an unreachable Redis fails the test this soon, never skips it
POLL_INTERVAL_S = 0.05
FUZZ = settings(max_examples=300, deadline=None)

payloads = st.text(alphabet="0123456789", min_size=OTCN_DIGITS - 1, max_size=OTCN_DIGITS - 1)
otcns_drawn = payloads.map(with_check_digit)
EXAMPLE = with_check_digit("400012345678901")


class LuhnTests(unittest.TestCase):
    def test_known_numbers(self):
        self.assertTrue(luhn_valid("79927398713"))
        self.assertTrue(luhn_valid("4111111111111111"))
        self.assertFalse(luhn_valid("4111111111111112"))
        self.assertFalse(luhn_valid(""))
        self.assertFalse(luhn_valid("0"))
        self.assertFalse(luhn_valid("4111 1111 1111 1111"))
        self.assertFalse(luhn_valid("４１１１１１１１１１１１１１１１"))

    def test_new_otcns_are_sixteen_digits_and_pass_the_check(self):
        drawn = [new_otcn() for _ in range(2000)]
        for otcn in drawn:
            self.assertEqual(len(otcn), OTCN_DIGITS)
            self.assertTrue(is_otcn(otcn), otcn)
        self.assertEqual(len(set(drawn)), len(drawn), "10^15 numbers: 2000 draws do not repeat")

    def test_new_otcn_keeps_leading_zeros(self):
        self.patch(otcns.secrets, "randbelow", lambda n: 42)
        self.assertEqual(new_otcn(), with_check_digit("000000000000042"))

    @FUZZ
    @given(otcns_drawn)
    def test_every_generated_otcn_passes(self, otcn):
        self.assertTrue(luhn_valid(otcn))
        self.assertTrue(is_otcn(otcn))

    @FUZZ
    @given(otcns_drawn, st.integers(0, OTCN_DIGITS - 1), st.integers(1, 9))
    def test_one_changed_digit_is_always_caught(self, otcn, position, delta):
        digit = str((int(otcn[position]) + delta) % 10)
        self.assertFalse(luhn_valid(otcn[:position] + digit + otcn[position + 1:]))

    @FUZZ
    @given(otcns_drawn, st.integers(0, OTCN_DIGITS - 2))
    def test_swapped_neighbours_are_caught(self, otcn, position):
        a, b = otcn[position], otcn[position + 1]
        if a == b or {a, b} == {"0", "9"}:
            return  # nothing swapped, or Luhn's one blind spot (see the next test)
        swapped = otcn[:position] + b + a + otcn[position + 2:]
        self.assertFalse(luhn_valid(swapped))

    def test_swapping_09_and_90_is_luhns_blind_spot(self):
        """Documented, not fixed: every other adjacent swap is caught."""
        otcn = with_check_digit("090000000000000")
        self.assertTrue(luhn_valid("9" + "0" + otcn[2:]))

    def test_payload_must_be_fifteen_ascii_digits(self):
        for payload in ("", "12345678901234", "1234567890123456", "12345678901234x", "１" * 15):
            self.assertRaises(ValueError, with_check_digit, payload)


class NormaliseTests(unittest.TestCase):
    def test_what_people_type(self):
        grouped = " ".join(EXAMPLE[i:i + 4] for i in range(0, 16, 4))
        for typed in (EXAMPLE, grouped, grouped.replace(" ", "-"), f"  {grouped}\t",
                      grouped.replace(" ", "\u3000"),                        # ideographic space
                      "".join(chr(ord(c) + 0xFEE0) for c in EXAMPLE)):      # full-width digits
            self.assertEqual(normalise_otcn(typed), EXAMPLE, typed)

    def test_refusals_say_why(self):
        wrong_check = EXAMPLE[:-1] + str((int(EXAMPLE[-1]) + 1) % 10)
        cases = [
            ("", "empty"),
            (" - ", "empty"),
            ("4000-1234-abcd-9017", "only digits, spaces and dashes"),
            ("+886912345678", "only digits, spaces and dashes"),
            ("٤" * 16, "only digits, spaces and dashes"),                    # Arabic-Indic digits
            (EXAMPLE[:-1], "16 digits expected, got 15"),
            (EXAMPLE + "0", "16 digits expected, got 17"),
            (wrong_check, "check digit wrong: a digit mistyped?"),
            ("1" * (MAX_OTCN_TEXT_CHARS + 1), "too long"),
        ]
        for typed, reason in cases:
            with self.assertRaises(InvalidOTCN, msg=typed) as caught:
                normalise_otcn(typed)
            self.assertEqual(caught.exception.reason, reason, typed)
        self.assertRaises(InvalidOTCN, normalise_otcn, None)

    def test_format_in_groups_of_four(self):
        self.assertEqual(format_otcn("4111111111111111"), "4111 1111 1111 1111")
        self.assertRaises(InvalidOTCN, format_otcn, "4111111111111112")

    @FUZZ
    @given(otcns_drawn)
    def test_formatted_otcn_reads_back(self, otcn):
        self.assertEqual(normalise_otcn(format_otcn(otcn)), otcn)

    def test_request_uri_user_part(self):
        self.assertIsNone(otcn_in_user("+886912345678"))
        self.assertEqual(otcn_in_user(EXAMPLE), EXAMPLE)
        self.assertRaises(InvalidOTCN, otcn_in_user, "0912345678")    # a national number
        self.assertRaises(InvalidOTCN, otcn_in_user, "alice")

    def test_grant_json_round_trip(self):
        for cap in (None, 1500):
            grant = OTCNGrant(EXAMPLE, CONSUMER, cap, 1_000.5)
            self.assertEqual(OTCNGrant.from_json(grant.to_json()), grant)


class RedisFixture:
    """A txredisapi pool to the test Redis, a key prefix of this test's own, its keys deleted after.

    Mixed into TestCase classes here and in test_guard.
    """

    redis_pool_size = 2

    @defer.inlineCallbacks
    def connect_test_redis(self):
        self.prefix = f"mpay-test-{secrets.token_hex(4)}:"
        self.redis = connect_redis(REDIS_HOST, REDIS_PORT, pool_size=self.redis_pool_size)
        self._redis_ready = False
        self.addCleanup(self._drop_test_redis)
        # A lazy pool queues requests until it connects: without a bound an
        # unreachable Redis would hang here until trial's timeout.
        yield self.redis.ping().addTimeout(REDIS_READY_TIMEOUT_S, reactor)
        self._redis_ready = True

    @defer.inlineCallbacks
    def _drop_test_redis(self):
        try:
            if self._redis_ready:
                keys = yield self.redis.keys(self.prefix + "*")
                if keys:
                    yield self.redis.delete(keys)
        finally:
            yield self.redis.disconnect()

    @defer.inlineCallbacks
    def poll_until(self, predicate, limit_s: float):
        """Wait (bounded) until ``predicate()`` fires true; Redis expires keys on its own clock."""
        for _ in range(int(limit_s / POLL_INTERVAL_S) + 1):
            if (yield predicate()):
                return True
            yield task.deferLater(reactor, POLL_INTERVAL_S, lambda: None)
        return False


class OTCNStoreBehaviour:
    """Subclasses provide self.store and lapse(otcn, seconds)."""

    @defer.inlineCallbacks
    def test_issue_then_consume_then_gone(self):
        grant = yield self.store.issue(CONSUMER, None)
        self.assertTrue(is_otcn(grant.otcn))
        self.assertEqual((grant.consumer, grant.cap), (CONSUMER, None))
        self.assertEqual((yield self.store.peek(grant.otcn)), grant)
        self.assertEqual((yield self.store.consume(grant.otcn)), grant)
        self.assertIsNone((yield self.store.consume(grant.otcn)), "single use")
        self.assertIsNone((yield self.store.peek(grant.otcn)))

    @defer.inlineCallbacks
    def test_unknown_and_malformed_otcns_resolve_to_nothing(self):
        for otcn in (new_otcn(), "1234", EXAMPLE[:-1] + "x", ""):
            self.assertIsNone((yield self.store.consume(otcn)), otcn)
            self.assertIsNone((yield self.store.peek(otcn)), otcn)

    @defer.inlineCallbacks
    def test_cap_is_carried(self):
        grant = yield self.store.issue(CONSUMER, 1500)
        found = yield self.store.consume(grant.otcn)
        self.assertEqual(found.cap, 1500)

    @defer.inlineCallbacks
    def test_otcn_lapses_unused(self):
        grant = yield self.store.issue(CONSUMER, None, lifetime_s=1)
        yield self.lapse(grant.otcn, 1)
        self.assertIsNone((yield self.store.consume(grant.otcn)))

    @defer.inlineCallbacks
    def test_a_live_otcn_is_never_handed_out_again(self):
        first, second = new_otcn(), new_otcn()
        self.store.generate = iter([first, first, first, second]).__next__
        mine = yield self.store.issue(CONSUMER, None)
        theirs = yield self.store.issue(OTHER, 500)
        self.assertEqual((mine.otcn, theirs.otcn), (first, second))
        self.assertEqual((yield self.store.consume(first)).consumer, CONSUMER)
        self.assertEqual((yield self.store.consume(second)).consumer, OTHER)

    @defer.inlineCallbacks
    def test_issue_gives_up_when_the_generator_only_repeats(self):
        stuck = new_otcn()
        self.store.generate = lambda: stuck
        yield self.store.issue(CONSUMER, None)
        yield self.assertFailure(self.store.issue(OTHER, None), OTCNExhausted)
        holder = yield self.store.peek(stuck)
        self.assertEqual(holder.consumer, CONSUMER, "the first holder keeps it")

    @defer.inlineCallbacks
    def test_bad_caps_and_lifetimes_are_refused(self):
        for cap, lifetime_s in ((0, 600), (-1, 600), (1.5, 600), (True, 600), ("10", 600),
                                (None, 0), (None, 1.5), (None, otcns.OTCN_MAX_LIFETIME_S + 1)):
            yield self.assertFailure(self.store.issue(CONSUMER, cap, lifetime_s), ValueError)


class MemoryOTCNStoreTests(OTCNStoreBehaviour, unittest.TestCase):
    def setUp(self):
        self.time = ClockWheel(self)
        self.store = MemoryOTCNStore(self.time.wheel, self.time.clock.seconds)

    def lapse(self, otcn, seconds):
        self.time.advance(seconds)
        return defer.succeed(None)

    @defer.inlineCallbacks
    def test_lives_exactly_its_lifetime(self):
        self.time.advance(5)
        grant = yield self.store.issue(CONSUMER, None)
        self.assertEqual(grant.expires_at, 5 + OTCN_LIFETIME_S)
        self.time.advance(OTCN_LIFETIME_S - 0.1)
        self.assertEqual((yield self.store.peek(grant.otcn)), grant)
        self.time.advance(0.1)
        self.assertIsNone((yield self.store.peek(grant.otcn)))
        self.assertEqual((len(self.store), len(self.time.wheel)), (0, 0), "the wheel removed it")

    @defer.inlineCallbacks
    def test_consume_cancels_the_expiry_timer(self):
        grant = yield self.store.issue(CONSUMER, None)
        yield self.store.consume(grant.otcn)
        self.assertEqual((len(self.store), len(self.time.wheel)), (0, 0))

    @defer.inlineCallbacks
    def test_a_late_wheel_does_not_let_a_lapsed_otcn_through(self):
        clock = task.Clock()
        store = MemoryOTCNStore(TimeWheel(), clock.seconds)  # a wheel nobody ticks
        grant = yield store.issue(CONSUMER, None, lifetime_s=1)
        clock.advance(1)
        self.assertIsNone((yield store.peek(grant.otcn)))
        self.assertIsNone((yield store.consume(grant.otcn)))
        self.assertEqual(len(store), 0)


class RedisOTCNStoreTests(RedisFixture, OTCNStoreBehaviour, unittest.TestCase):
    """Against the Redis on 127.0.0.1:6379, under a key prefix of this run's own."""

    redis_pool_size = 4

    @defer.inlineCallbacks
    def setUp(self):
        yield self.connect_test_redis()
        self.store = RedisOTCNStore(self.redis, prefix=self.prefix)

    @defer.inlineCallbacks
    def lapse(self, otcn, seconds):
        @defer.inlineCallbacks
        def gone():
            return (yield self.store.peek(otcn)) is None

        self.assertTrue((yield self.poll_until(gone, seconds + 2)), "Redis did not expire the key")

    @defer.inlineCallbacks
    def test_ttl_is_the_lifetime(self):
        grant = yield self.store.issue(CONSUMER, None)
        ttl = yield self.redis.ttl(self.prefix + "otcn:" + grant.otcn)
        self.assertTrue(OTCN_LIFETIME_S - 10 <= ttl <= OTCN_LIFETIME_S, ttl)

    @defer.inlineCallbacks
    def test_concurrent_consumes_have_one_winner(self):
        grant = yield self.store.issue(CONSUMER, 700)
        racers = [self.store.consume(grant.otcn) for _ in range(32)]
        results = yield defer.gatherResults(racers)
        self.assertEqual([r for r in results if r is not None], [grant])

    @defer.inlineCallbacks
    def test_concurrent_issues_get_distinct_otcns(self):
        grants = yield defer.gatherResults([self.store.issue(CONSUMER, None) for _ in range(32)])
        self.assertEqual(len({g.otcn for g in grants}), 32)

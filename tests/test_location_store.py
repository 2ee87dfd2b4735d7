"""One behaviour suite for both location stores: memory (time wheel) and Redis (real server)."""

import secrets

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mpay.stores.location import (
    Binding, BoundedRedis, MemoryLocationStore, RedisLocationStore, connect_redis,
)

from tests.support import ClockWheel

NUMBER = "+886912345678"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def binding(contact="sip:+886912345678@198.51.100.7:5061", host="198.51.100.7", port=5061):
    return Binding(NUMBER, contact, host, port, "UDP", expires_at=1_000.0)


class LocationStoreBehaviour:
    """Subclasses provide self.store and lapse(seconds)."""

    @defer.inlineCallbacks
    def test_bind_then_lookup(self):
        yield self.store.bind(binding(), 3600)
        found = yield self.store.lookup(NUMBER)
        self.assertEqual(found, binding())

    @defer.inlineCallbacks
    def test_unknown_number_is_offline(self):
        found = yield self.store.lookup("+886900000000")
        self.assertIsNone(found)

    @defer.inlineCallbacks
    def test_refresh_replaces_the_contact(self):
        yield self.store.bind(binding(), 3600)
        yield self.store.bind(binding(contact="sip:x@203.0.113.1", host="203.0.113.1"), 3600)
        found = yield self.store.lookup(NUMBER)
        self.assertEqual(found.host, "203.0.113.1")

    @defer.inlineCallbacks
    def test_remove(self):
        yield self.store.bind(binding(), 3600)
        yield self.store.remove(NUMBER)
        found = yield self.store.lookup(NUMBER)
        self.assertIsNone(found)

    @defer.inlineCallbacks
    def test_binding_lapses_unless_refreshed(self):
        yield self.store.bind(binding(), 1)
        yield self.lapse(2)
        found = yield self.store.lookup(NUMBER)
        self.assertIsNone(found)


class MemoryLocationStoreTests(LocationStoreBehaviour, unittest.TestCase):
    def setUp(self):
        self.time = ClockWheel(self)
        self.store = MemoryLocationStore(self.time.wheel)

    def lapse(self, seconds):
        self.time.advance(seconds)
        return defer.succeed(None)

    @defer.inlineCallbacks
    def test_refresh_is_not_undone_by_the_old_timer(self):
        yield self.store.bind(binding(), 1)
        yield self.store.bind(binding(), 10)
        self.time.advance(2)
        found = yield self.store.lookup(NUMBER)
        self.assertIsNotNone(found)
        self.assertEqual(len(self.time.wheel), 1, "the first timer was cancelled, not left behind")

    def test_lookup_now_answers_at_once_as_lookup_does(self):
        """In this process: a transfer looks its payee up with no Deferred."""
        self.assertTrue(self.store.in_process)
        self.store.bind(binding(), 1)
        self.assertEqual(self.store.lookup_now(NUMBER), binding())
        self.time.advance(2)
        self.assertIsNone(self.store.lookup_now(NUMBER))


class RedisLocationStoreTests(LocationStoreBehaviour, unittest.TestCase):
    """Against the Redis on 127.0.0.1:6379, under a key prefix of this run's own."""

    @defer.inlineCallbacks
    def setUp(self):
        self.prefix = f"mpay-test-{secrets.token_hex(4)}:"
        self.redis = yield connect_redis(REDIS_HOST, REDIS_PORT, pool_size=2)
        self.store = RedisLocationStore(self.redis, prefix=self.prefix)

    @defer.inlineCallbacks
    def tearDown(self):
        keys = yield self.redis.keys(self.prefix + "*")
        if keys:
            yield self.redis.delete(keys)
        yield self.redis.disconnect()

    def test_a_lookup_goes_to_redis(self):
        self.assertFalse(self.store.in_process, "no lookup_now: another process may bind")

    @defer.inlineCallbacks
    def test_the_lookups_of_a_turn_are_one_round_trip(self):
        other = Binding("+886987654321", "sip:+886987654321@198.51.100.8:5062", "198.51.100.8",
                        5062, "UDP", expires_at=1_000.0)
        yield self.store.bind(binding(), 3600)
        yield self.store.bind(other, 3600)
        before = self.store.round_trips
        found = yield defer.gatherResults([self.store.lookup(NUMBER),
                                           self.store.lookup("+886900000000"),
                                           self.store.lookup(other.number),
                                           self.store.lookup(NUMBER)])
        self.assertEqual(found, [binding(), None, other, binding()])
        self.assertEqual(self.store.round_trips - before, 1)

    @defer.inlineCallbacks
    def lapse(self, seconds):
        """Redis expires keys on its own clock: wait (bounded) until it has."""
        for _ in range(int(seconds * 20) + 40):
            if (yield self.store.lookup(NUMBER)) is None:
                return
            yield task.deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def test_ttl_is_the_binding_expiry(self):
        yield self.store.bind(binding(), 3600)
        ttl = yield self.redis.ttl(self.prefix + "loc:" + NUMBER)
        self.assertTrue(3590 <= ttl <= 3600, ttl)


class _StallingReactor:
    """Twisted's loop order, modelled: a pass runs the timers that are due (calls made
    during the pass wait for the next one), then the I/O poll delivers what arrived."""

    def __init__(self):
        self.now = 0.0
        self.calls = []
        self.arrived = []     # I/O waiting to be read: callables

    def seconds(self):
        return self.now

    def callLater(self, delay, func, *args):
        call = task.DelayedCall(self.now + delay, func, args, {}, self._cancel, lambda c: None,
                                self.seconds)
        self.calls.append(call)
        return call

    def _cancel(self, call):
        self.calls.remove(call)

    def iterate(self, stall_s=0.0):
        self.now += stall_s
        due = [call for call in self.calls if call.getTime() <= self.now]
        for call in due:
            self.calls.remove(call)
            call.called = 1
            call.func(*call.args)
        arrived, self.arrived = self.arrived, []
        for deliver in arrived:
            deliver()


class _MgetRecorder:
    """A Redis that answers each MGET with what the test says."""

    def __init__(self):
        self.asked = []

    def mget(self, keys):
        self.asked.append((list(keys), defer.Deferred()))
        return self.asked[-1][1]


class RedisLocationBatchTests(unittest.TestCase):
    """The MGET of a turn's lookups, with a Redis that answers as the test says."""

    def setUp(self):
        self.clock = task.Clock()
        self.redis = _MgetRecorder()
        self.store = RedisLocationStore(self.redis, prefix="p:", reactor=self.clock, max_keys=2)

    def test_nothing_is_sent_before_the_turn_ends(self):
        found = self.store.lookup(NUMBER)
        self.assertEqual(self.redis.asked, [])
        self.clock.advance(0)
        self.assertEqual([keys for keys, _ in self.redis.asked], [["p:loc:" + NUMBER]])
        self.redis.asked[0][1].callback([binding().to_json()])
        self.assertEqual(self.successResultOf(found), binding())

    def test_a_turn_past_max_keys_is_sent_as_several_mgets(self):
        found = [self.store.lookup(f"+88691234567{i}") for i in range(3)]
        self.clock.advance(0)
        self.assertEqual([len(keys) for keys, _ in self.redis.asked], [2, 1])
        self.redis.asked[0][1].callback([None, None])
        self.redis.asked[1][1].callback([None])
        self.assertEqual([self.successResultOf(d) for d in found], [None, None, None])
        self.assertEqual((self.store.round_trips, self.store.lookups), (2, 3))

    def test_a_failed_mget_fails_each_of_its_lookups(self):
        found = [self.store.lookup(NUMBER), self.store.lookup("+886900000000")]
        self.clock.advance(0)
        self.redis.asked[0][1].errback(defer.TimeoutError("no answer"))
        for d in found:
            self.failureResultOf(d, defer.TimeoutError)

    def test_a_value_that_is_no_binding_fails_only_its_own_lookup(self):
        found = [self.store.lookup(NUMBER), self.store.lookup("+886900000000")]
        self.clock.advance(0)
        self.redis.asked[0][1].callback(["{not json", binding().to_json()])
        self.failureResultOf(found[0], ValueError)
        self.assertEqual(self.successResultOf(found[1]), binding())

    def test_an_answer_of_the_wrong_length_fails_the_group(self):
        found = [self.store.lookup(NUMBER), self.store.lookup("+886900000000")]
        self.clock.advance(0)
        self.redis.asked[0][1].callback([None])
        for d in found:
            self.failureResultOf(d, ValueError)

    def test_a_redis_that_raises_fails_the_group_not_the_turn(self):
        def refuse(keys):
            raise ConnectionError("pool closed")
        self.redis.mget = refuse
        found = self.store.lookup(NUMBER)
        self.clock.advance(0)
        self.failureResultOf(found, ConnectionError)
        later = self.store.lookup(NUMBER)
        self.redis.mget = _MgetRecorder().mget
        self.clock.advance(0)
        self.assertNoResult(later)


class BoundedRedisTests(unittest.TestCase):
    def setUp(self):
        self.reactor = _StallingReactor()
        self.pending = defer.Deferred()
        pool = type("Pool", (), {"get": lambda _, key: self.pending})()
        self.redis = BoundedRedis(pool, self.reactor, timeout_s=1.0)

    def test_a_reply_that_came_during_a_stall_is_read_before_the_bound_is_decided(self):
        result = self.redis.get("k")
        self.reactor.arrived.append(lambda: self.pending.callback("v"))
        self.reactor.iterate(stall_s=1.5)          # the bound passed while the reply waited
        self.assertEqual(self.successResultOf(result), "v")
        self.assertEqual(self.redis.timeouts, 0)

    def test_no_reply_at_all_fails_with_a_timeout(self):
        result = self.redis.get("k")
        self.reactor.iterate(stall_s=1.5)
        self.assertNoResult(result)
        self.reactor.iterate()
        self.failureResultOf(result, defer.TimeoutError)
        self.assertEqual(self.redis.timeouts, 1)

    def test_a_caller_that_cancels_gets_its_cancel_not_a_timeout(self):
        result = self.redis.get("k")
        result.cancel()
        self.failureResultOf(result, defer.CancelledError)
        self.assertEqual(self.redis.timeouts, 0)
        self.assertEqual(self.reactor.calls, [], "the bound's timer went with it")

    def test_a_reply_in_time_leaves_no_timer_behind(self):
        result = self.redis.get("k")
        self.pending.callback("v")
        self.assertEqual(self.successResultOf(result), "v")
        self.assertEqual(self.reactor.calls, [])

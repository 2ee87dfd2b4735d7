"""One behaviour suite for both location stores: memory (time wheel) and Redis (real server)."""

import secrets

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mpay.stores.location import Binding, MemoryLocationStore, RedisLocationStore, connect_redis

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

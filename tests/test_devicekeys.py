"""The PS's cache of device keys: fresh reads after its lifetime, bounded, never stale on a
re-enrolment (a failed signature reads the key again)."""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial import unittest

from mpay.auth.devicekeys import CachedDeviceKeys, DeviceRecord, MemoryDeviceKeyStore

NUMBER = "+886912345678"


class CachedDeviceKeysTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.store = MemoryDeviceKeyStore()
        self.store.records[NUMBER] = DeviceRecord(NUMBER, b"k", b"1" * 32)
        self.keys = CachedDeviceKeys(self.store, self.clock.seconds, ttl_s=30, max_entries=2)

    @defer.inlineCallbacks
    def test_a_key_is_read_once_per_lifetime(self):
        first = yield self.keys.load(NUMBER)
        self.store.records[NUMBER] = DeviceRecord(NUMBER, b"k", b"2" * 32)   # enrolled anew
        again = yield self.keys.load(NUMBER)
        self.assertEqual((first.device_key, again.device_key), (b"1" * 32, b"1" * 32))
        self.assertEqual((self.keys.hits, self.keys.misses), (1, 1))
        self.assertEqual(self.keys.cached_record(NUMBER).device_key, b"1" * 32)
        self.clock.advance(30)
        self.assertIsNone(self.keys.cached_record(NUMBER))     # stale: the caller reads it
        later = yield self.keys.load(NUMBER)
        self.assertEqual(later.device_key, b"2" * 32)

    @defer.inlineCallbacks
    def test_reload_reads_through_the_cache(self):
        yield self.keys.load(NUMBER)
        self.store.records[NUMBER] = DeviceRecord(NUMBER, b"k", b"3" * 32)
        fresh = yield self.keys.reload(NUMBER)
        self.assertEqual(fresh.device_key, b"3" * 32)
        self.assertTrue(self.keys.cached(NUMBER))

    @defer.inlineCallbacks
    def test_unknown_numbers_are_not_cached_and_the_cache_is_bounded(self):
        self.assertIsNone((yield self.keys.load("+886900000000")))
        self.assertFalse(self.keys.cached("+886900000000"))
        for index in range(5):
            number = f"+88691000000{index}"
            self.store.records[number] = DeviceRecord(number, b"k", b"4" * 32)
            yield self.keys.load(number)
        self.assertEqual(len(self.keys._cache), 2)
        self.assertTrue(self.keys.cached("+886910000004"))

"""The crypto thread: Ed25519 runs off the reactor thread, results come back on it."""

import threading

from twisted.internet import defer, reactor
from twisted.trial import unittest

from mpay.auth import crypto
from mpay.auth.crypto_thread import CryptoThread, InlineCrypto
from mpay.payment import receipt as receipts


def where(*args):
    """The thread a call ran on, and its arguments back."""
    return threading.current_thread(), args


class CryptoThreadTests(unittest.TestCase):

    def started(self) -> CryptoThread:
        worker = CryptoThread(reactor, name="test-crypto")
        worker.startService()
        self.addCleanup(lambda: worker.stopService() if worker.running else None)
        return worker

    @defer.inlineCallbacks
    def test_calls_run_on_the_thread_and_answer_on_the_reactor_thread(self):
        worker = self.started()
        answered_on = []
        calls = [worker.run(where, n).addCallback(
            lambda result: answered_on.append(threading.current_thread()) or result)
            for n in range(20)]
        results = yield defer.gatherResults(calls)
        self.assertEqual([args for _, args in results], [(n,) for n in range(20)], "in order")
        self.assertEqual({thread.name for thread, _ in results}, {"test-crypto"})
        self.assertEqual(set(answered_on), {threading.main_thread()})
        self.assertEqual(worker.calls, 20)
        self.assertLessEqual(worker.passes, 20, "results come back a pass at a time")

    @defer.inlineCallbacks
    def test_an_exception_is_the_callers_errback(self):
        worker = self.started()
        key = crypto.generate_signing_key()
        digest = b"d" * 32
        bad = b"\0" * 64
        with self.assertRaises(receipts.ReceiptError):
            yield worker.run(receipts.verify_request, crypto.public_key_raw(key.public_key()),
                             digest, bad)
        good = key.sign(bytes((len(receipts.REQUEST_SIGNATURE_PURPOSE),))
                        + receipts.REQUEST_SIGNATURE_PURPOSE + digest)
        self.assertIsNone((yield worker.run(
            receipts.verify_request, crypto.public_key_raw(key.public_key()), digest, good)),
            "the thread goes on after an exception")

    @defer.inlineCallbacks
    def test_stopping_answers_everything_queued_first(self):
        worker = self.started()
        calls = [worker.run(where, n) for n in range(50)]
        yield worker.stopService()
        self.assertTrue(all(call.called for call in calls), "answered before the stop fired")
        results = yield defer.gatherResults(calls)
        self.assertEqual(len(results), 50)

    def test_before_start_and_after_stop_calls_run_inline(self):
        worker = CryptoThread(reactor)
        before = worker.run(where, 1)
        self.assertIs(self.successResultOf(before)[0], threading.current_thread())
        worker.startService()
        stopped = worker.stopService()

        def after(_):
            late = worker.run(where, 2)
            self.assertIs(self.successResultOf(late)[0], threading.current_thread())
        return stopped.addCallback(after)

    def test_inline_crypto_fires_at_once_and_fails_as_a_failure(self):
        inline = InlineCrypto()
        self.assertEqual(self.successResultOf(inline.run(lambda a, b: a + b, 2, 3)), 5)
        failure = self.failureResultOf(inline.run(lambda: 1 / 0))
        failure.trap(ZeroDivisionError)

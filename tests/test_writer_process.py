"""The writer process's wire: frames, the store opener it is sent, results that cross it."""

import functools
import pickle

from twisted.trial import unittest

from mpay.ledger import store_opener
from mpay.ledger.api import LedgerError
from mpay.ledger.sqlite import SQLiteStore
from mpay.ledger.writer_wire import (
    FRAME, MAX_FRAME_BYTES, Frames, frame, portable, rebuilt, sendable,
)


class FrameTests(unittest.TestCase):
    def test_frames_split_anywhere_come_out_whole_and_in_order(self):
        stream = frame([("transfer", (1, "a"))]) + frame(None) + frame(("done", [1, 2], 0, 0))
        for cut in range(len(stream) + 1):
            frames = Frames()
            got = frames.feed(stream[:cut]) + frames.feed(stream[cut:])
            self.assertEqual(got, [[("transfer", (1, "a"))], None, ("done", [1, 2], 0, 0)], cut)

    def test_a_frame_longer_than_the_limit_is_refused_before_it_is_buffered(self):
        with self.assertRaises(ValueError):
            Frames().feed(FRAME.pack(MAX_FRAME_BYTES + 1) + b"x")


class PortableOpenerTests(unittest.TestCase):
    def test_the_configured_opener_crosses_as_class_name_and_arguments(self):
        opener = store_opener({"backend": "sqlite", "sqlite_path": "/tmp/x.sqlite3"})
        sent = pickle.loads(pickle.dumps(portable(opener)))
        again = rebuilt(sent)
        self.assertEqual((again.func, again.args, again.keywords),
                         (SQLiteStore.open, ("/tmp/x.sqlite3",), {}))

    def test_any_other_picklable_opener_crosses_as_it_is(self):
        opener = functools.partial(sorted, [2, 1])
        self.assertEqual(rebuilt(pickle.loads(pickle.dumps(portable(opener))))(), [1, 2])


class Unpicklable(Exception):
    def __init__(self, a, b):
        super().__init__(a)     # pickles as Unpicklable(a): cannot be rebuilt


class SendableTests(unittest.TestCase):
    def test_results_and_ledger_errors_go_as_they_are(self):
        self.assertEqual(sendable(7), 7)
        error = LedgerError("no account")
        self.assertIs(sendable(error), error)

    def test_an_exception_that_cannot_cross_goes_as_a_ledger_error_with_its_text(self):
        sent = sendable(Unpicklable("boom", 2))
        pickle.loads(pickle.dumps(sent))
        self.assertIsInstance(sent, LedgerError)
        self.assertEqual(str(sent), "Unpicklable: boom")

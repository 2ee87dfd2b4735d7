"""The payer signature's check in a child process: the records, the link, the real child."""

import os
import signal
import socket

from hypothesis import given, settings, strategies as st
from twisted.internet import defer, reactor, task
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from mpay.auth import crypto
from mpay.payment import receipt as receipts
from mpay.payment import signature_jobs as jobs
from mpay.payment import signatures as sigs
from tests.support import Receivers

FUZZ = settings(max_examples=200, deadline=None)
READY_WAIT_S = 20.0      # a loaded CI machine may take seconds to start a Python


def signed(message: bytes = b"d" * 32) -> tuple[bytes, bytes, bytes]:
    """(public key, digest, signature) of a payer's good signature over *message*."""
    key = crypto.generate_signing_key()
    signature = crypto.decode_b64(receipts.sign_request(key, message).split(" ", 1)[1], 128)
    return crypto.public_key_raw(key.public_key()), message, signature


def job(seq: int, public: bytes, digest: bytes, signature: bytes) -> bytes:
    return jobs.JOB.pack(seq, public, signature, digest)


class RecordTests(unittest.TestCase):
    def test_answers_in_order_and_keeps_a_part_job(self):
        public, digest, signature = signed()
        forged = bytes(64)
        data = job(7, public, digest, signature) + job(8, public, digest, forged)
        answers, left = jobs.answer_jobs(data + data[:10])
        self.assertEqual(list(jobs.ANSWER.iter_unpack(answers)), [(7, 1), (8, 0)])
        self.assertEqual(left, data[:10])

    def test_a_signature_over_another_digest_is_refused(self):
        public, digest, signature = signed()
        answers, _ = jobs.answer_jobs(job(1, public, b"e" * 32, signature))
        self.assertEqual(list(jobs.ANSWER.iter_unpack(answers)), [(1, 0)])

    @FUZZ
    @given(st.binary(max_size=3 * jobs.JOB.size))
    def test_any_bytes_get_one_answer_per_whole_job(self, data):
        answers, left = jobs.answer_jobs(data)
        self.assertEqual(len(answers), len(data) // jobs.JOB.size * jobs.ANSWER.size)
        self.assertEqual(len(left), len(data) % jobs.JOB.size)


class LinkTests(unittest.TestCase):
    """The PS's end, against a test playing the child on the other end of a socketpair."""

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.checks = sigs.SignatureChecks(self.clock)
        ours, self.child = socket.socketpair()
        self.addCleanup(self.child.close)
        self.link = sigs._ChildLink(self.checks, ours)
        self.addCleanup(ours.close)
        self.checks._link = self.link
        self.checks.running = True
        self.link.ready = True

    def jobs(self) -> list[tuple]:
        """What the child reads, once the turn that asked has ended."""
        self.clock.advance(0)
        return list(jobs.JOB.iter_unpack(self.child.recv(1 << 16)))

    def answer(self, *pairs) -> None:
        self.child.sendall(b"".join(jobs.ANSWER.pack(seq, ok) for seq, ok in pairs))
        self.link.doRead()

    def nothing_written(self) -> bool:
        self.child.setblocking(False)
        try:
            self.child.recv(1)
        except BlockingIOError:
            return True
        finally:
            self.child.setblocking(True)
        return False

    def test_a_turns_jobs_go_in_one_write_then_wait_for_its_answers(self):
        good, bad = signed(), signed()
        results = []
        self.checks.check(*good).addCallback(results.append)      # the child is idle
        self.checks.check(good[0], good[1], bad[2]).addCallback(results.append)
        self.assertTrue(self.nothing_written(), "not before the end of the turn")
        self.assertEqual([(seq, public) for seq, public, _, _ in self.jobs()],
                         [(0, good[0]), (1, good[0])], "one write for the turn")
        self.checks.check(*good).addCallback(results.append)
        self.clock.advance(0)
        self.assertTrue(self.nothing_written(), "answers are due: it waits for them")
        self.answer((0, 1), (1, 0))
        self.assertEqual([seq for seq, _, _, _ in self.jobs()], [2], "sent with the answers")
        self.answer((2, 1))
        self.assertEqual(results, [True, False, True])
        self.assertEqual((self.checks.in_child, self.checks.inline), (3, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_link_closed_within_the_turn_writes_nothing_and_leaves_no_call(self):
        self.checks.check(*signed())
        self.link.close()
        self.assertEqual([call for call in self.clock.getDelayedCalls() if call.active()
                          and call.func == self.link._end_of_turn], [])

    def test_out_of_order_answer_checks_here_and_restarts(self):
        good = signed()
        results = []
        self.checks.check(*good).addCallback(results.append)
        self.jobs()
        self.answer((5, 0))                   # not the job in flight: the child is not trusted
        self.assertEqual(results, [True], "checked in the PS instead")
        self.assertIsNone(self.checks._link)
        self.assertEqual((self.checks.inline, self.checks.restarts), (1, 1))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1, "a restart is due")

    def test_child_gone_checks_what_it_had_here(self):
        good, other = signed(), signed()
        results = []
        self.checks.check(*good).addCallback(results.append)
        self.checks.check(other[0], good[1], good[2]).addCallback(results.append)
        self.child.close()
        self.link.doRead()
        self.assertEqual(results, [True, False])
        self.assertEqual(self.checks.restarts, 1)

    def test_a_child_that_dies_starting_is_started_again_later_each_time(self):
        spawned, lost_at = [], []
        self.checks._spawn = lambda: spawned.append(self.clock.seconds())
        for _ in range(3):
            ours, theirs = socket.socketpair()
            self.addCleanup(theirs.close)
            link = sigs._ChildLink(self.checks, ours)
            self.checks._link = link                      # started, never ready
            lost_at.append(self.clock.seconds())
            self.checks.lost(link, "exited 1")
            self.clock.pump([1.0] * int(sigs.MAX_RESTART_DELAY_S))
        self.assertEqual([b - a for a, b in zip(lost_at, spawned)], [2.0, 4.0, 8.0])
        self.checks.became_ready()                        # one came up: back to the start
        self.assertEqual(self.checks._delay_s, sigs.RESTART_DELAY_S)

    def test_a_hung_child_is_given_up_on(self):
        results = []
        self.checks.check(*signed()).addCallback(results.append)
        self.jobs()
        self.clock.advance(sigs.STALL_S / 2)
        self.checks._watch()
        self.assertEqual(results, [], "still within STALL_S")
        self.clock.advance(sigs.STALL_S)
        self.checks._watch()
        self.assertEqual(results, [True], "checked in the PS")
        self.assertEqual(self.checks.restarts, 1)

    def test_malformed_inputs_never_reach_the_child(self):
        public, digest, signature = signed()
        results = []
        self.checks.check(public, digest, signature[:63]).addCallback(results.append)
        self.checks.check(public[:31], digest, signature).addCallback(results.append)
        self.assertEqual(results, [False, False])
        self.assertEqual((self.checks.in_child, self.checks.inline), (0, 2))

    def test_a_half_answer_waits_for_the_rest(self):
        good = signed()
        results = []
        self.checks.check(*good).addCallback(results.append)
        self.jobs()
        whole = jobs.ANSWER.pack(0, 1)
        self.child.sendall(whole[:2])
        self.link.doRead()
        self.assertEqual(results, [])
        self.child.sendall(whole[2:])
        self.link.doRead()
        self.assertEqual(results, [True])


class ChildProcessTests(unittest.TestCase):
    """The real child, started and stopped as the PS does."""

    @defer.inlineCallbacks
    def started(self, **kwargs):
        checks = sigs.SignatureChecks(reactor, **kwargs)
        checks.start()
        self.addCleanup(checks.stop)
        yield self.until(lambda: checks._link is not None and checks._link.ready)
        return checks

    @defer.inlineCallbacks
    def until(self, condition, wait_s: float = READY_WAIT_S):
        for _ in range(int(wait_s / 0.05)):
            if condition():
                return
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.fail("the signature process did not become ready")

    @defer.inlineCallbacks
    def test_the_child_checks_and_stops_with_the_ps(self):
        checks = yield self.started()
        good, other = signed(), signed()
        answers = yield defer.gatherResults([
            checks.check(*good), checks.check(other[0], good[1], good[2]),
            checks.check(good[0], b"x" * 32, good[2])])
        self.assertEqual(answers, [True, False, False])
        self.assertEqual((checks.in_child, checks.inline), (3, 0))
        process = checks._link.process
        yield checks.stop()
        self.assertIsNone(process.pid, "reaped")

    @defer.inlineCallbacks
    def test_check_then_gets_each_verdict_and_a_failing_receiver_keeps_the_link(self):
        checks = yield self.started()
        good, receivers = signed(), Receivers(2)
        checks.check_then(*good, receivers.raising)
        checks.check_then(*good, receivers.kept)
        checks.check_then(good[0], good[1], bytes(64), receivers.kept)
        yield receivers.done
        self.assertEqual(receivers.results, [True, False])
        self.assertEqual((checks.in_child, checks.restarts), (3, 0))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue((yield checks.check(*good)), "the same child answers on")

    @defer.inlineCallbacks
    def test_a_killed_child_costs_no_check_and_is_started_again(self):
        checks = yield self.started(restart_delay_s=0.1)
        first = checks._link.process.pid
        good = signed()
        pending = [checks.check(*good) for _ in range(50)]
        os.kill(first, signal.SIGKILL)
        answers = yield defer.gatherResults(pending)
        self.assertEqual(answers, [True] * 50, "every check answered, here or there")
        yield self.until(lambda: checks._link is not None and checks._link.ready
                         and checks._link.process.pid not in (None, first))
        self.assertEqual(checks.restarts, 1)
        self.assertTrue((yield checks.check(*good)))

    @defer.inlineCallbacks
    def test_without_the_child_every_check_is_made_here(self):
        checks = sigs.SignatureChecks(reactor, use_child=False)
        checks.start()
        good = signed()
        self.assertTrue((yield checks.check(*good)))
        self.assertFalse((yield checks.check(good[0], good[1], bytes(64))))
        self.assertEqual((checks.in_child, checks.inline, checks._link), (0, 2, None))
        yield checks.stop()

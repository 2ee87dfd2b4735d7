"""The payer signature's check, in a process of its own (DESIGN section 6; issue 7).

An Ed25519 verify is the largest single cost of a credit transfer (some 55 us
of the reactor's 450), and it is plain computation on public data: the
payer's enrolled public key, the request digest, the signature.  So the PS
hands it to a child process over a socket, many checks to a write, and goes
on; the child answers in order.  A thread cannot do this
in CPython: each verify must take the GIL back from the busy reactor, and the
hand-offs cost more than the verify (README, "tried and not kept").

No secret crosses the socket: the child holds no key of the PS.  While the
child is not running (starting, or dead and about to be started again) a
check is made in the PS's own process, so no transfer ever waits for it, and
checks in flight when it dies are made there too.  Each check still decides
its transfer: a signature that does not verify is a 403, wherever it was
verified.

The records and the child's loop are in ``signature_jobs.py``.
"""

from __future__ import annotations

import collections
import socket
import sys
from typing import Any, Callable, NamedTuple

from twisted.application import service
from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from mpay.auth import tickets
from mpay.children import child_env
from mpay.auth.crypto import ED25519_PUBLIC_BYTES, ED25519_SIGNATURE_BYTES
from mpay.payment.signature_jobs import (
    ANSWER, DIGEST_BYTES, JOB, READ_BYTES, READY_SEQ, verifies,
)

assert DIGEST_BYTES == tickets.DIGEST_BYTES, "the child's records carry the request digest"

SEQ_MODULUS = READY_SEQ           # sequence numbers wrap below READY_SEQ
MAX_IN_FLIGHT_CHECKS = 20_000     # past this the checks are made in the PS (the child lags)
RESTART_DELAY_S = 1.0             # doubled after each child that never became ready
MAX_RESTART_DELAY_S = 60.0
STOP_GRACE_S = 2.0                # then the child is killed
STALL_S = 2.0                     # a check unanswered this long: the child is hung
CHILD_MODULE = "mpay.payment.signature_jobs"


class _Job(NamedTuple):
    seq: int
    then: Callable[[bool], None]     # gets the verdict
    public: bytes
    digest: bytes
    signature: bytes
    at: float               # when it was asked (the stall watchdog)


def _answer(then: Callable[[bool], None], verdict: bool) -> None:
    """A verdict to its asker, who must not take the link (a reader) down with it."""
    try:
        then(verdict)
    except Exception:
        SignatureChecks.log.failure("ps: a signature verdict's receiver failed")


class SignatureChecks:
    """``check(public, digest, signature)`` -> Deferred[bool], made in the child if it runs;
    ``check_then`` the same without the Deferred (a transfer's path)."""

    log = Logger()

    def __init__(self, reactor: Any, use_child: bool = True,
                 restart_delay_s: float = RESTART_DELAY_S):
        self.reactor = reactor
        self.use_child = use_child
        self.restart_delay_s = restart_delay_s
        self._delay_s = restart_delay_s
        self.in_child = self.inline = self.restarts = 0
        self.running = False
        self._link: _ChildLink | None = None
        self._restart: Any = None
        self._watchdog: Any = None

    def check(self, public: bytes, digest: bytes, signature: bytes) -> defer.Deferred:
        answered: defer.Deferred = defer.Deferred()
        self.check_then(public, digest, signature, answered.callback)
        return answered

    def check_then(self, public: bytes, digest: bytes, signature: bytes,
                   then: Callable[[bool], None]) -> None:
        """``then(verdict)`` once checked: at once when checked here, else when the child
        answers (or fails over)."""
        link = self._link
        if (link is None or not link.ready or len(link.waiting) >= MAX_IN_FLIGHT_CHECKS
                or len(public) != ED25519_PUBLIC_BYTES
                or len(signature) != ED25519_SIGNATURE_BYTES or len(digest) != DIGEST_BYTES):
            self.inline += 1
            _answer(then, verifies(public, digest, signature))
            return
        self.in_child += 1
        link.submit(public, digest, signature, then)

    def start(self) -> None:
        self.running = True
        if self.use_child:
            self._spawn()
            self._watchdog = task.LoopingCall(self._watch)
            self._watchdog.clock = self.reactor
            self._watchdog.start(STALL_S / 2, now=False)

    def _watch(self) -> None:
        """A child that is alive but answers nothing would hold its transfers forever."""
        link = self._link
        if link is not None and link.waiting and \
                link.waiting[0].at < self.reactor.seconds() - STALL_S:
            self.lost(link, f"no answer in {STALL_S} s")

    def stop(self) -> defer.Deferred:
        """Fires when the child has gone; what it still had was checked here first."""
        self.running = False
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        link, self._link = self._link, None
        if link is None:
            return defer.succeed(None)
        self.inline += link.fail_over()
        return link.close()

    def _spawn(self) -> None:
        self._restart = None
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        link = _ChildLink(self, parent)
        try:
            link.process = self.reactor.spawnProcess(
                _ChildProcess(link), sys.executable, [sys.executable, "-m", CHILD_MODULE],
                env=child_env(), childFDs={0: child.fileno(), 1: "r", 2: "r"})
        except Exception:
            self.log.failure("ps: the signature process did not start; checking here")
            parent.close()
            self._again()
            return
        finally:
            child.close()
        self._link = link
        self.reactor.addReader(link)

    def lost(self, link: _ChildLink, why: str) -> None:
        """The child is gone or broke the protocol: what it had is checked here, and
        it is started again."""
        if self._link is not link:
            return
        self._link = None
        self.inline += link.fail_over()
        link.close()
        if self.running:
            self.restarts += 1
            if not link.was_ready:      # it died starting: the next one may too, wait longer
                self._delay_s = min(2 * self._delay_s, MAX_RESTART_DELAY_S)
            self.log.warn("ps: the signature process stopped ({why}); checking here, and "
                          "starting it again in {delay} s", why=why, delay=self._delay_s)
            self._again()

    def _again(self) -> None:
        if self.running:
            self._restart = self.reactor.callLater(self._delay_s, self._spawn)

    def became_ready(self) -> None:
        self._delay_s = self.restart_delay_s


@implementer(IReadDescriptor, IWriteDescriptor)
class _ChildLink:
    """This end of the socket, read and written by the reactor directly: jobs out, answers
    in, in order.

    Self-clocked, as Nagle's algorithm: when the child has nothing to answer,
    the jobs of this reactor turn go in one write at its end (the requests one
    read of the SIP socket brought); else they wait for the answers to the last
    write and go with every job that came meanwhile.  Under load one write
    carries what arrived during a round trip; idle, a check waits only for the
    end of its turn.  (A write per job cost the PS a tenth of its reactor time
    at 150,000 transfers a minute, where the child was often idle.)
    """

    def __init__(self, owner: SignatureChecks, sock: socket.socket):
        sock.setblocking(False)
        self.owner, self.sock, self.reactor = owner, sock, owner.reactor
        self.ready = self.was_ready = self.closed = False
        self.process: Any = None
        self.ended = defer.Deferred()           # the child was reaped
        self.waiting: collections.deque = collections.deque()
        self._jobs: list[bytes] = []            # not yet written
        self._outstanding = 0                   # written, not yet answered
        self._unsent = b""
        self._left = b""
        self._seq = 0
        self._turn_end: Any = None              # the pending end-of-turn flush

    def fileno(self) -> int:
        return -1 if self.closed else self.sock.fileno()

    def logPrefix(self) -> str:
        return "signature-process"

    def submit(self, public: bytes, digest: bytes, signature: bytes,
               then: Callable[[bool], None]) -> None:
        seq = self._seq
        self._seq = (seq + 1) % SEQ_MODULUS
        self.waiting.append(_Job(seq, then, public, digest, signature, self.reactor.seconds()))
        self._jobs.append(JOB.pack(seq, public, signature, digest))
        if self._outstanding == 0 and self._turn_end is None:
            self._turn_end = self.reactor.callLater(0, self._end_of_turn)

    def _end_of_turn(self) -> None:
        self._turn_end = None
        if self._outstanding == 0:
            self.flush()

    def flush(self) -> None:
        if self.closed or not self._jobs:
            return
        data = b"".join(self._jobs)
        self._outstanding += len(self._jobs)
        self._jobs.clear()
        if self._unsent:                        # the socket is full: doWrite goes on
            self._unsent += data
            return
        self._send(data)

    def _send(self, data: bytes) -> None:
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.owner.lost(self, f"send: {exc}")
            return
        self._unsent = data[sent:]
        if self._unsent:
            self.reactor.addWriter(self)

    def doWrite(self) -> None:
        data, self._unsent = self._unsent, b""
        self.reactor.removeWriter(self)
        self._send(data)

    def doRead(self) -> None:
        try:
            data = self.sock.recv(READ_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            self.owner.lost(self, f"recv: {exc}")
            return
        if not data:
            self.owner.lost(self, "it closed its socket")
            return
        data = self._left + data
        whole = len(data) - len(data) % ANSWER.size
        self._left = data[whole:]
        waiting = self.waiting
        for seq, ok in ANSWER.iter_unpack(data[:whole]):
            if self.closed:
                return
            if seq == READY_SEQ:
                self.ready = self.was_ready = True
                self.owner.became_ready()
            elif self._outstanding and waiting[0].seq == seq:
                self._outstanding -= 1
                _answer(waiting.popleft().then, ok == 1)
            else:
                self.owner.lost(self, f"an answer out of order (seq {seq})")
                return
        if self._outstanding == 0:
            self.flush()

    def connectionLost(self, reason: Any) -> None:
        self.owner.lost(self, reason.getErrorMessage())

    def fail_over(self) -> int:
        """Check here what the child still had; how many."""
        pending = list(self.waiting)
        self.waiting.clear()
        self._jobs.clear()
        self._outstanding = 0
        for job in pending:
            _answer(job.then, verifies(job.public, job.digest, job.signature))
        return len(pending)

    def close(self) -> defer.Deferred:
        """Close this end (the child reads EOF and exits); fires once it is reaped."""
        if not self.closed:
            if self._turn_end is not None and self._turn_end.active():
                self._turn_end.cancel()
            self._turn_end = None
            self.reactor.removeReader(self)
            self.reactor.removeWriter(self)
            self.closed = True
            self.sock.close()
            if self.process is None:            # never started: nothing to reap
                self.ended.callback(None)
            elif not self.ended.called:
                kill = self.reactor.callLater(STOP_GRACE_S, self._kill)
                self.ended.addBoth(_cancelling(kill))
        return _follow(self.ended)

    def _kill(self) -> None:
        try:
            self.process.signalProcess("KILL")
        except Exception:   # already gone
            pass


class _ChildProcess(protocol.ProcessProtocol):
    log = Logger()

    def __init__(self, link: _ChildLink):
        self.link = link

    def childDataReceived(self, fd: int, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            self.log.warn("ps: signature process: {line}", line=line)

    def processEnded(self, reason: Any) -> None:
        self.link.ended.callback(None)
        self.link.owner.lost(self.link, reason.getErrorMessage())


class SignatureService(service.Service):
    """Starts the child with the PS and stops it after the listeners."""

    def __init__(self, checks: SignatureChecks):
        self.checks = checks

    def startService(self) -> None:
        super().startService()
        self.checks.start()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return self.checks.stop()


def _cancelling(call: Any) -> Callable[[Any], Any]:
    def cancel(result: Any) -> Any:
        if call.active():
            call.cancel()
        return result
    return cancel


def _follow(ended: defer.Deferred) -> defer.Deferred:
    """A Deferred that fires when *ended* does, without taking its result."""
    follower: defer.Deferred = defer.Deferred()
    ended.addBoth(lambda result: (follower.callback(None), result)[1])
    return follower

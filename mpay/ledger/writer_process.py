"""Group commit in a process of its own: the writer thread's loop, out of the PS's GIL.

``writer.py``'s thread shares the GIL with the reactor.  Each time the
reactor makes a system call (a datagram sent or read, a write to the
signature process) the writer may take the GIL, and the reactor waits to get
it back; with PostgreSQL (psycopg's Python layers) this waiting was a fifth
of the reactor's busy time at 120,000 transfers a minute (README, "Session
15: the ledger writer in a process of its own").  Here the same loop,
``GroupCommitWriter._run``, runs in a child process; the PS keeps the same
interface (``submit_then``, ``whenOpen``, ``stop``) and talks to it over a
socket::

    reactor (PS)                         writer process
    submit_then -> op queued
    end of turn: one frame of ops  ->    GroupCommitWriter._run, its queue the socket:
                                         group, commit, fsync
    results delivered, in order    <-    one frame of results a group

The frames are ``writer_wire.py``'s, the child's loop ``writer_child.py``.
Order is the contract: the child answers operations in the order it was
given them, so the PS matches results to callers by counting.

If the child dies, every operation it had fails with ``LedgerError`` (a
transfer answers 503; its idempotency key makes the payer's re-send safe,
whether or not that group had committed) and a new child is started.  The
ledger's consistency never depends on the child: each group is one database
transaction.
"""

from __future__ import annotations

import collections
import socket
import sys
from typing import Any, Callable

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mpay.children import child_env
from mpay.ledger.api import LedgerBusy, LedgerError, LedgerStopped
from mpay.ledger.writer import (
    COMMIT_DELAY_S, MAX_PENDING, GroupCommitWriter, OpenStore, hand_over,
)
from mpay.ledger.writer_wire import DONE, EXITED, OPEN, READ_BYTES, Frames, frame, portable

CHILD_MODULE = "mpay.ledger.writer_child"
RESTART_DELAY_S = 1.0
STOP_GRACE_S = 10.0                 # a group being committed is let finish; then killed

log = Logger()


class WriterProcess:
    """``GroupCommitWriter``'s interface; the writer runs in a child process."""

    def __init__(self, open_store: OpenStore, reactor: Any, *, max_batch: int | None = None,
                 max_pending: int = MAX_PENDING, commit_delay_s: float = COMMIT_DELAY_S,
                 restart_delay_s: float = RESTART_DELAY_S):
        self._setup = (portable(open_store), max_batch, commit_delay_s)
        self._reactor = reactor
        self._max_pending = max_pending
        self._restart_delay_s = restart_delay_s
        self._link: _Link | None = None
        self._restart: Any = None
        self._running = self._stopping = False
        self._open_result: object = None      # None until the first child opened, or failed to
        self._open_waiters: list[defer.Deferred] = []
        self._stop_waiters: list[defer.Deferred] = []
        self.batches = self.operations = self.largest_batch = 0
        self.retries = self.careful_redos = self.restarts = 0

    # -- the reactor's side, as GroupCommitWriter ----------------------------

    def start(self) -> None:
        self._running = True
        self._spawn()

    @property
    def pending(self) -> int:
        link = self._link
        return 0 if link is None else len(link.waiting)

    def whenOpen(self) -> defer.Deferred:
        if self._open_result is None:
            waiter: defer.Deferred = defer.Deferred()
            self._open_waiters.append(waiter)
            return waiter
        if isinstance(self._open_result, Failure):
            return defer.fail(self._open_result)
        return defer.succeed(None)

    submit = GroupCommitWriter.submit      # the Deferred form, on our submit_then

    def submit_then(self, name: str, args: tuple, then: Callable[[Any], None],
                    failed: Callable[[Failure], None]) -> None:
        link = self._link
        if self._stopping:
            failed(Failure(LedgerStopped("the ledger is stopping")))
        elif link is None or link.closed:
            failed(Failure(LedgerError("the ledger writer is restarting")))
        elif len(link.waiting) >= self._max_pending:
            failed(Failure(LedgerBusy(f"{len(link.waiting)} ledger operations queued")))
        else:
            link.submit(name, args, then, failed)

    def stop(self) -> defer.Deferred:
        """Commit what is queued, then the child closes its store and exits."""
        link = self._link
        if not self._stopping:
            self._stopping, self._running = True, False
            if self._restart is not None and self._restart.active():
                self._restart.cancel()
            if link is not None:
                link.finish()
        if link is None:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()
        kill = self._reactor.callLater(STOP_GRACE_S, link.kill)
        self._stop_waiters.append(waiter)
        return waiter.addBoth(lambda result: (kill.cancel() if kill.active() else None, result)[1])

    # -- the child -------------------------------------------------------------

    def _spawn(self) -> None:
        self._restart = None
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        link = _Link(self, parent)
        try:
            link.process = self._reactor.spawnProcess(
                _ChildProtocol(link), sys.executable, [sys.executable, "-m", CHILD_MODULE],
                env=child_env(), childFDs={0: child.fileno(), 1: "r", 2: "r"})
        except Exception:
            log.failure("ledger: the writer process did not start")
            parent.close()
            self._again()
            return
        finally:
            child.close()
        self._link = link
        self._reactor.addReader(link)
        link.send(frame(self._setup))

    def _again(self) -> None:
        if self._running:
            self._restart = self._reactor.callLater(self._restart_delay_s, self._spawn)

    def opened(self, ok: bool, why: str, first: bool) -> None:
        if not ok:
            log.error("cannot open the ledger database: {why}", why=why)
        elif not first or self.restarts:
            log.info("the ledger database is open again")
        if self._open_result is None:
            self._open_result = True if ok else Failure(LedgerError(why))
            waiters, self._open_waiters = self._open_waiters, []
            for waiter in waiters:
                if ok:
                    waiter.callback(None)
                else:
                    waiter.errback(self._open_result)

    def delivered(self, count: int, retries: int, redos: int) -> None:
        self.batches += 1
        self.operations += count
        self.largest_batch = max(self.largest_batch, count)
        self.retries += retries
        self.careful_redos += redos

    def _stopped(self, _: Any) -> None:
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def lost(self, link: _Link, why: str) -> None:
        """The child ended: what it had fails, and (unless stopping) another starts."""
        if self._link is not link:
            return
        self._link = None
        link.close()
        if self._stopping:
            link.ended.addBoth(self._stopped)
        else:
            self.restarts += 1
            self._again()
        # Last: a caller told of its failure may ask again at once (and be refused).
        failed = link.fail_all(LedgerError(f"the ledger writer process stopped ({why})"))
        if not self._stopping:
            log.warn("ledger: the writer process stopped ({why}); {failed} operations failed;"
                     " starting it again in {delay} s", why=why, failed=failed,
                     delay=self._restart_delay_s)


@implementer(IReadDescriptor, IWriteDescriptor)
class _Link:
    """This end of the socket: operations out (one write a turn), results in."""

    def __init__(self, owner: WriterProcess, sock: socket.socket):
        sock.setblocking(False)
        self.owner, self.sock, self.reactor = owner, sock, owner._reactor
        self.process: Any = None
        self.ended: defer.Deferred = defer.Deferred()     # the child was reaped
        self.closed = False
        self.waiting: collections.deque = collections.deque()   # (then, failed, name)
        self._ops: list[tuple[str, tuple]] = []
        self._unsent = b""
        self._turn_end: Any = None
        self._frames = Frames()

    def fileno(self) -> int:
        return -1 if self.closed else self.sock.fileno()

    def logPrefix(self) -> str:
        return "ledger-writer"

    def submit(self, name: str, args: tuple, then: Callable, failed: Callable) -> None:
        self.waiting.append((then, failed, name))
        self._ops.append((name, args))
        if self._turn_end is None:
            self._turn_end = self.reactor.callLater(0, self._end_of_turn)

    def _end_of_turn(self) -> None:
        self._turn_end = None
        if self._ops and not self.closed:
            ops, self._ops = self._ops, []
            try:
                data = frame(ops)
            except Exception:       # an argument that does not pickle: a caller's bug
                failure = Failure()
                count = len(ops)
                for _ in range(count):
                    _, failed, _ = self.waiting.pop()
                    failed(failure)
                return
            self.send(data)

    def finish(self) -> None:
        """The stop: what is queued goes, then None (the child commits it all and exits)."""
        self._end_of_turn()
        if not self.closed:
            self.send(frame(None))

    def send(self, data: bytes) -> None:
        if self._unsent:
            self._unsent += data
            return
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
        self.send(data)

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
        try:
            messages = self._frames.feed(data)
        except Exception as exc:
            self.owner.lost(self, f"a bad frame: {exc}")
            return
        for message in messages:
            if self.closed:
                return
            kind = message[0]
            if kind == DONE:
                _, results, retries, redos = message
                self._deliver(results)
                self.owner.delivered(len(results), retries, redos)
            elif kind == OPEN:
                _, ok, why, first = message
                self.owner.opened(ok, why, first)
            elif kind != EXITED:
                self.owner.lost(self, f"an unknown message {kind!r}")
                return

    def _deliver(self, results: list) -> None:
        waiting = self.waiting
        assert len(results) <= len(waiting), (len(results), len(waiting))
        for result in results:
            then, failed, name = waiting.popleft()
            hand_over(then, failed, name, result)

    def fail_all(self, error: LedgerError) -> int:
        waiting, self.waiting = self.waiting, collections.deque()
        self._ops.clear()
        for then, failed, name in waiting:
            hand_over(then, failed, name, error)
        return len(waiting)

    def connectionLost(self, reason: Any) -> None:
        self.owner.lost(self, reason.getErrorMessage())

    def close(self) -> None:
        if not self.closed:
            if self._turn_end is not None and self._turn_end.active():
                self._turn_end.cancel()
            self._turn_end = None
            self.reactor.removeReader(self)
            self.reactor.removeWriter(self)
            self.closed = True
            self.sock.close()

    def kill(self) -> None:
        try:
            self.process.signalProcess("KILL")
        except Exception:
            pass


class _ChildProtocol(protocol.ProcessProtocol):
    def __init__(self, link: _Link):
        self.link = link

    def childDataReceived(self, fd: int, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            log.warn("ledger writer process: {line}", line=line)

    def processEnded(self, reason: Any) -> None:
        self.link.ended.callback(None)
        self.link.owner.lost(self.link, reason.getErrorMessage())

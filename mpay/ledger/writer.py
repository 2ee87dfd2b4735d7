"""Group commit: one writer thread per process, Deferreds on the reactor side.

The reactor never waits for the database.  ``LedgerService`` methods queue an
operation and return a Deferred; the writer thread takes whatever is queued
(up to the store's ``max_batch``), runs it as one transaction (its transfers
as one run, ``runs.py``), commits once, and hands every caller its own result in one
``reactor.callFromThread``.  While one group is being fsynced the next one
queues up, so under load a commit is shared by hundreds of payments and
costs one disk flush; an idle ledger commits each payment at once.

::

    reactor thread            writer thread                   database
    transfer() -> Deferred    (transfer_then(): callbacks, no Deferred)
        | SimpleQueue.put  ->  get, drain <= max_batch
                               BEGIN; run of transfers; ... COMMIT  -> fsync
        <- callFromThread(deliver results)
    d.callback(TransferResult)   (or then(TransferResult))

Stopping commits what is queued, closes the connection and joins the thread.
Reads do not come here: ``service.py`` runs them on connections of their own.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mpay.ledger.api import LedgerBusy, LedgerError, LedgerStopped
from mpay.ledger.store import SQLStore

MAX_PENDING = 50_000
"""Operations queued or in flight; past this a request is refused (LedgerBusy, SIP 503)."""

REOPEN_INTERVAL_S = 1.0
"""After the database failed, wait this long before trying to reconnect."""

COMMIT_DELAY_S = 0.002
"""Under load, how long a group waits for more operations before it commits (cf.
PostgreSQL's commit_delay): fewer, fuller groups cost the writer thread less of the
GIL, so the reactor thread gets more of it.  ``mpay-load`` at 96,000 transfers a
minute: the server's CPU 121 % -> 95 %, p50 5.4 -> 4.3 ms."""

COMMIT_SIBLINGS = 2
"""The delay applies only after a group of at least this many: an idle ledger commits
each operation at once."""


def waits_for_more(previous_group: int, batch: int, limit: int, delay_s: float) -> bool:
    """Whether a group of *batch* waits *delay_s* for company before committing."""
    return delay_s > 0 and previous_group >= COMMIT_SIBLINGS and 0 < batch < limit

OpenStore = Callable[..., SQLStore]
"""Opens a store; called as ``open_store(migrate=True|False)``."""

_STOP = object()
log = Logger()


def hand_over(then: Callable[[Any], None], failed: Callable[[Failure], None], name: str,
              result: object) -> None:
    """An operation's result (or exception) to its caller, on the reactor thread; one
    caller's bug must not keep the others of its group from theirs."""
    try:
        if isinstance(result, BaseException):
            if not isinstance(result, (LedgerError, ValueError)):
                log.failure("ledger operation {op} failed", Failure(result), op=name)
            failed(Failure(result))
        else:
            then(result)
    except Exception:
        log.failure("ledger operation {op}: its caller failed on the result", op=name)


class GroupCommitWriter:
    """Owns the writer thread and its store; ``submit`` is called on the reactor thread."""

    def __init__(self, open_store: OpenStore, reactor: Any, *, max_batch: int | None = None,
                 max_pending: int = MAX_PENDING, name: str = "mpay-ledger-writer",
                 commit_delay_s: float = COMMIT_DELAY_S):
        self._open_store = open_store
        self._commit_delay_s = commit_delay_s
        self._reactor = reactor
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._pending = 0
        self._stopping = False
        self._exited_already = False
        self._stop_waiters: list[defer.Deferred] = []
        self._open_result: object = None  # None until the first open attempt, then True/Failure
        self._open_waiters: list[defer.Deferred] = []
        self.batches = self.operations = self.largest_batch = 0
        self.retries = 0  # groups rerun after a deadlock or lock timeout (written by the thread)
        self.restarts = 0  # a thread is never restarted (WriterProcess counts its children)
        self.careful_redos = 0  # groups whose run met the unexpected, redone the careful way

    def start(self) -> None:
        self._thread.start()

    def whenOpen(self) -> defer.Deferred:
        """Fires once the first attempt to open (and migrate) the store has ended."""
        if self._open_result is None:
            waiter = defer.Deferred()
            self._open_waiters.append(waiter)
            return waiter
        if isinstance(self._open_result, Failure):
            return defer.fail(self._open_result)
        return defer.succeed(None)

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, name: str, args: tuple) -> defer.Deferred:
        """Queue ``store._op_<name>(*args)``; the Deferred fires after its group commits."""
        result: defer.Deferred = defer.Deferred()
        self.submit_then(name, args, result.callback, result.errback)
        return result

    def submit_then(self, name: str, args: tuple, then: Callable[[Any], None],
                    failed: Callable[[Failure], None]) -> None:
        """``submit`` without the Deferred (a transfer's path): *then* gets the result after
        its group commits, *failed* a Failure (at once, if the ledger is stopping or full)."""
        if self._stopping:
            failed(Failure(LedgerStopped("the ledger is stopping")))
            return
        if self._pending >= self._max_pending:
            failed(Failure(LedgerBusy(f"{self._pending} ledger operations queued")))
            return
        self._pending += 1
        self._queue.put((then, failed, name, args))

    def stop(self) -> defer.Deferred:
        """Commit what is queued, close the store, end the thread."""
        if not self._stopping:
            self._stopping = True
            if self._thread.ident is None:  # never started
                self._exited_already = True
            else:
                self._queue.put(_STOP)
        if self._exited_already:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._stop_waiters.append(waiter)
        return waiter

    # -- the writer thread --------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException:  # a bug: say so, and keep answering (with errors) until stopped
            self._reactor.callFromThread(log.failure, "the ledger writer failed", Failure())
            item = None
            while item is not _STOP:
                item = self._queue.get()
                if item is not _STOP:
                    error = LedgerError("the ledger writer failed")
                    self._reactor.callFromThread(self._deliver, [item], [error])
        self._reactor.callFromThread(self._exited)

    def _take(self, batch: list[tuple], limit: int, item: Any = None) -> bool:
        """Add what is queued to *batch* (from *item*, if given), up to *limit*; True at _STOP."""
        while len(batch) < limit:
            if item is None:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    return False
            if item is _STOP:
                return True
            batch.append(item)
            item = None
        return False

    def _serve(self) -> None:
        """Take groups off the queue and commit them, until _STOP."""
        store = self._try_open(first=True)
        last_failure = time.monotonic()
        stopping = False
        previous_group = 0
        while not stopping:
            batch: list[tuple] = []
            limit = self._max_batch or (store.max_batch if store else 1)
            stopping = self._take(batch, limit, self._queue.get())
            if not stopping and waits_for_more(previous_group, len(batch), limit,
                                               self._commit_delay_s):
                time.sleep(self._commit_delay_s)
                stopping = self._take(batch, limit)
            previous_group = len(batch)
            if not batch:
                continue
            if store is None and time.monotonic() - last_failure >= REOPEN_INTERVAL_S:
                store = self._try_open(first=False)
                last_failure = time.monotonic()
            if store is None:
                error = LedgerError("the ledger database is unavailable")
                self._reactor.callFromThread(self._deliver, batch, [error] * len(batch))
                continue
            retried, redone = store.batch_retries, store.run_conflicts
            try:
                results: list[object] = store.run_batch([(name, args)
                                                         for _, _, name, args in batch])
                self.retries += store.batch_retries - retried
                self.careful_redos += store.run_conflicts - redone
            except Exception as exc:
                # The group failed as a whole: nothing committed, unless the COMMIT
                # itself was lost in flight (a retry with the same key is safe).
                results = [exc] * len(batch)
                store.close_quietly()
                store, last_failure = None, time.monotonic()
            self._reactor.callFromThread(self._deliver, batch, results)
        if store is not None:
            store.close_quietly()

    def _try_open(self, first: bool) -> SQLStore | None:
        try:
            store = self._open_store(migrate=True)
        except Exception:
            failure = Failure()
            self._reactor.callFromThread(self._opened, failure, first)
            return None
        self._reactor.callFromThread(self._opened, True, first)
        return store

    # -- back on the reactor thread -----------------------------------------

    def _opened(self, result: object, first: bool) -> None:
        if isinstance(result, Failure):
            log.failure("cannot open the ledger database", result)
        elif not first:
            log.info("the ledger database is open again")
        if first:
            self._open_result = result
            waiters, self._open_waiters = self._open_waiters, []
            for waiter in waiters:
                waiter.errback(result) if isinstance(result, Failure) else waiter.callback(None)

    def _deliver(self, batch: list[tuple], results: list[object]) -> None:
        assert len(batch) == len(results), (len(batch), len(results))
        self.batches += 1
        self.operations += len(batch)
        self.largest_batch = max(self.largest_batch, len(batch))
        self._pending -= len(batch)
        for (then, failed, name, _), result in zip(batch, results):
            hand_over(then, failed, name, result)
        assert self._pending >= 0, self._pending

    def _exited(self) -> None:
        self._thread.join()  # it has nothing left to do but return
        assert self._pending == 0, self._pending
        self._exited_already = True
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)

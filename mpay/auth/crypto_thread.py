"""Ed25519 off the reactor thread: the second core for the payer's signature and the receipt.

A credit transfer costs the PS one Ed25519 verify (the payer's signature,
~80-110 us here) and one sign (the receipt, ~30 us): a quarter of its
reactor thread.  ``cryptography`` releases the GIL inside both, so a thread
of their own runs them beside the reactor instead of before it.  The hand-
off is the ledger writer's (``mpay.ledger.writer``): a SimpleQueue in, and
back one ``callFromThread`` for everything the thread finished in one pass.

::

    reactor thread                     crypto thread
    run(fn, *args) -> Deferred
        | SimpleQueue.put         ->   get, drain <= MAX_BATCH
                                       fn(*args) for each (GIL released in C)
        <- callFromThread(deliver the pass's results)
    d.callback(result) / d.errback

Only pure functions go there: what they read is immutable or locked
(``functools.lru_cache`` is), and they touch no Twisted object.
``InlineCrypto`` is the same interface run on the caller's thread, for code
built without a reactor thread to spare (tests of the rules, tools).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer
from twisted.python.failure import Failure

MAX_BATCH = 256
"""Calls run in one pass before their results go back to the reactor."""

_STOP = object()


class InlineCrypto:
    """Runs each call at once on the caller's thread; the result as a fired Deferred."""

    def run(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        return defer.maybeDeferred(fn, *args)


class CryptoThread(service.Service):
    """One daemon thread, started and joined with the service; ``run`` is for the reactor thread.

    Calls made before the service starts, or after it stopped, run inline:
    a transfer in flight at shutdown still gets its answer.
    """

    def __init__(self, reactor: Any, name: str = "mpay-crypto"):
        self._reactor = reactor
        self._name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._inline = InlineCrypto()
        self._stopped: defer.Deferred | None = None
        self.passes = self.calls = 0           # reactor-side counts, for the manhole

    def run(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        if self._thread is None:
            return self._inline.run(fn, *args)
        deferred: defer.Deferred = defer.Deferred()
        self._queue.put((deferred, fn, args))
        return deferred

    def startService(self) -> None:
        super().startService()
        self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
        self._thread.start()

    def stopService(self):
        """Fires once everything queued has been answered and the thread is ending."""
        super().stopService()
        if self._thread is None:
            return None
        self._thread = None
        self._stopped = defer.Deferred()
        self._queue.put(_STOP)
        return self._stopped

    # -- the thread ---------------------------------------------------------------

    def _serve(self) -> None:
        get, get_nowait, empty = self._queue.get, self._queue.get_nowait, queue.Empty
        while True:
            item = get()
            batch: list[tuple] = []
            stop = item is _STOP
            if not stop:
                batch.append(item)
            while not stop and len(batch) < MAX_BATCH:
                try:
                    item = get_nowait()
                except empty:
                    break
                if item is _STOP:
                    stop = True
                else:
                    batch.append(item)
            if batch:
                results = []
                for _, fn, args in batch:
                    try:
                        results.append((True, fn(*args)))
                    except BaseException:
                        results.append((False, Failure()))
                self._reactor.callFromThread(self._deliver, batch, results)
            if stop:
                self._reactor.callFromThread(self._stopped.callback, None)
                return

    # -- back on the reactor thread -----------------------------------------------

    def _deliver(self, batch: list[tuple], results: list[tuple[bool, Any]]) -> None:
        assert len(batch) == len(results), (len(batch), len(results))
        self.passes += 1
        self.calls += len(batch)
        for (deferred, _, _), (ok, value) in zip(batch, results):
            if ok:
                deferred.callback(value)
            else:
                deferred.errback(value)

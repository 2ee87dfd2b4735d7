"""``LedgerService``: the ledger as the payment server sees it, all Deferreds.

Writes go to the one group-commit writer: a child process (``writer_process.py``;
``[ledger] writer_process``, true by default) or a thread (``writer.py``); reads go to a
small pool of threads with connections of their own.  Nothing here blocks the
reactor.  The methods and their arguments are those of the synchronous store
(``store.SQLStore``), which is where the rules and their documentation live.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from mpay.ledger.api import (
    ACTIVE, BLOCKED_STATUS, SETTLEMENT, STATEMENT_ROWS, LedgerError, LedgerStopped,
)
from mpay.ledger.notices import MAX_QUEUED_NOTICES_PER_PAYEE
from mpay.ledger.store import SQLStore
from mpay.ledger.writer import COMMIT_DELAY_S, MAX_PENDING, GroupCommitWriter, OpenStore
from mpay.ledger.writer_process import WriterProcess

READ_THREADS = 2
"""Threads (and connections) answering balance, statement and audit queries."""


class ReadPool:
    """A few threads, each with its own connection, for queries."""

    def __init__(self, open_store: OpenStore, reactor: Any, threads: int,
                 name: str = "mpay-ledger-read"):
        self._open_store = open_store
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name=name)
        self._local = threading.local()
        self._stores: list[SQLStore] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        """Join the threads (each finishes its query first), then close their connections."""
        self._pool.stop()
        with self._lock:
            stores, self._stores = self._stores, []
        for store in stores:
            store.close_quietly()

    def call(self, name: str, *args: object) -> defer.Deferred:
        return deferToThreadPool(self._reactor, self._pool, self._in_thread, name, args)

    def _in_thread(self, name: str, args: tuple) -> object:
        """Run the query; on a broken connection (the database restarted), once more on a
        new one: a read is safe to repeat, and its caller should not see the restart."""
        for attempt in (1, 2):
            store = getattr(self._local, "store", None)
            if store is None:
                store = self._open_store(migrate=False)
                with self._lock:
                    self._stores.append(store)
                self._local.store = store
            try:
                return getattr(store, name)(*args)
            except (LedgerError, ValueError):
                raise
            except Exception:
                self._local.store = None
                with self._lock:
                    self._stores.remove(store)
                store.close_quietly()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


class LedgerService(Service):
    """Start it with the other services; every method returns a Deferred.

    *open_store* opens a synchronous store, e.g.
    ``functools.partial(SQLiteStore.open, "var/ledger.sqlite3")``; it is called
    in the writer thread (``migrate=True``) and in each reader (``migrate=False``).
    """

    name = "ledger"

    def __init__(self, open_store: OpenStore, reactor: Any = None, *,
                 max_batch: int | None = None, max_pending: int = MAX_PENDING,
                 read_threads: int = READ_THREADS, commit_delay_s: float = COMMIT_DELAY_S,
                 writer_process: bool = False):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        writer = WriterProcess if writer_process else GroupCommitWriter
        self.writer: Any = writer(open_store, reactor, max_batch=max_batch,
                                  max_pending=max_pending, commit_delay_s=commit_delay_s)
        self._readers = ReadPool(open_store, reactor, read_threads)
        self._stopped = False

    def startService(self) -> None:
        assert not self._stopped, "a LedgerService is started once"
        super().startService()
        self.writer.start()
        self._readers.start()

    def stopService(self) -> defer.Deferred:
        """Commit everything queued, then close every connection and join every thread."""
        super().stopService()
        self._stopped = True

        def stop_readers(result: object) -> object:
            self._readers.stop()
            return result

        return self.writer.stop().addBoth(stop_readers)

    def whenOpen(self) -> defer.Deferred:
        """Fires when the database is open and migrated (or errbacks why it is not)."""
        return self.writer.whenOpen()

    def _write(self, name: str, *args: object) -> defer.Deferred:
        return self.writer.submit(name, args)

    def _read(self, name: str, *args: object) -> defer.Deferred:
        if self._stopped:
            return defer.fail(LedgerStopped("the ledger is stopping"))
        # Readers never migrate: they wait for the writer to have done it.
        waiting = self.writer.whenOpen()
        waiting.addBoth(lambda _: self._readers.call(name, *args))
        return waiting

    # -- writes (the group-commit writer) -----------------------------------

    def open_account(self, number: str) -> defer.Deferred:
        """Fires with True if created, False if it existed."""
        return self._write("open_account", number)

    def transfer(self, payer: str, payee: str, amount: int, idempotency_key: str,
                 kind: str = "transfer", reference: str = "",
                 payer_signature: bytes | None = None) -> defer.Deferred:
        """Fires with a TransferResult; a repeated key gets the original (DUPLICATE)."""
        return self._write("transfer", payer, payee, amount, idempotency_key, kind, reference,
                           payer_signature)

    def transfer_then(self, then: Callable[[Any], None], failed: Callable[[Any], None],
                      payer: str, payee: str, amount: int, idempotency_key: str,
                      kind: str = "transfer", reference: str = "",
                      payer_signature: bytes | None = None) -> None:
        """``transfer`` without the Deferred (the PS's path): *then* gets the TransferResult,
        *failed* a Failure."""
        self.writer.submit_then("transfer", (payer, payee, amount, idempotency_key, kind,
                                             reference, payer_signature), then, failed)

    def cash_in(self, number: str, amount: int, idempotency_key: str,
                reference: str = "") -> defer.Deferred:
        return self.transfer(SETTLEMENT, number, amount, idempotency_key, "cash_in", reference)

    def cash_out(self, number: str, amount: int, idempotency_key: str,
                 reference: str = "") -> defer.Deferred:
        return self.transfer(number, SETTLEMENT, amount, idempotency_key, "cash_out", reference)

    def block(self, number: str) -> defer.Deferred:
        return self._write("set_status", number, BLOCKED_STATUS)

    def unblock(self, number: str) -> defer.Deferred:
        return self._write("set_status", number, ACTIVE)

    def place_hold(self, number: str, amount: int, session_ref: str) -> defer.Deferred:
        """Fires with a HoldResult (its hold_id when COMMITTED)."""
        return self._write("place_hold", number, amount, session_ref)

    def settle_hold(self, hold_id: int, charge_amount: int, payee: str,
                    idempotency_key: str) -> defer.Deferred:
        """Fires with a TransferResult: the charge moved, the rest of the hold released."""
        return self._write("settle_hold", hold_id, charge_amount, payee, idempotency_key)

    def release_hold(self, hold_id: int) -> defer.Deferred:
        return self._write("release_hold", hold_id)

    def checkpoint_hold(self, hold_id: int, amount_so_far: int) -> defer.Deferred:
        return self._write("checkpoint_hold", hold_id, amount_so_far)

    def open_session(self, consumer: str, merchant: str, rate: int, session_ref: str,
                     owner: str, dialog: str) -> defer.Deferred:
        """Fires with a SessionResult: the session and what the consumer's sessions may spend."""
        return self._write("open_session", consumer, merchant, rate, session_ref, owner, dialog)

    def settle_session(self, session_id: int, charge: int) -> defer.Deferred:
        """Fires with a SessionResult: the charge moved to the merchant (once)."""
        return self._write("settle_session", session_id, charge)

    def checkpoint_sessions(self, owed: list[tuple[int, int]]) -> defer.Deferred:
        """Record (session id, owed so far) pairs, all in one transaction."""
        return self._write("checkpoint_sessions", owed)

    def recover_sessions(self, owner: str) -> defer.Deferred:
        """Settle *owner*'s open sessions at their checkpoints: [(Session, SessionResult)]."""
        return self._write("recover_sessions", owner)

    def store_device_key(self, number: str, encrypted_k: bytes,
                         ed25519_pub: bytes) -> defer.Deferred:
        return self._write("store_device_key", number, encrypted_k, ed25519_pub)

    # -- reads (the read pool) ----------------------------------------------

    def balance(self, number: str) -> defer.Deferred:
        """Fires with a Balance, or errbacks UnknownAccount."""
        return self._read("balance", number)

    def statement(self, number: str, limit: int = STATEMENT_ROWS) -> defer.Deferred:
        """Fires with the newest *limit* JournalEntry rows of *number*, newest first."""
        return self._read("statement", number, limit)

    def journal_page(self, after_id: int = 0, limit: int = STATEMENT_ROWS) -> defer.Deferred:
        """Fires with up to *limit* JournalEntry rows after *after_id*, in id order."""
        return self._read("journal_page", after_id, limit)

    def open_holds(self) -> defer.Deferred:
        return self._read("open_holds")

    def open_sessions(self, owner: str | None = None) -> defer.Deferred:
        return self._read("open_sessions", owner)

    def device_key(self, number: str) -> defer.Deferred:
        return self._read("device_key", number)

    def audit(self) -> defer.Deferred:
        return self._read("audit")

    def stats(self) -> dict[str, int]:
        """Counters for the metrics page and the manhole."""
        return {"pending": self.writer.pending, "batches": self.writer.batches,
                "operations": self.writer.operations,
                "largest_batch": self.writer.largest_batch, "retries": self.writer.retries,
                "careful_redos": self.writer.careful_redos,
                "writer_restarts": self.writer.restarts}

    # -- notices for offline payees (notices.py) ----------------------------

    def queue_notice(self, payee: str, journal_id: int, from_uri: str, body: bytes,
                     max_per_payee: int = MAX_QUEUED_NOTICES_PER_PAYEE) -> defer.Deferred:
        """Fires with a NoticeQueued (the journal ids dropped to keep the bound)."""
        return self._write("queue_notice", payee, journal_id, from_uri, body, max_per_payee)

    def discard_notice(self, payee: str, journal_id: int) -> defer.Deferred:
        """Fires with False if that notice was not queued (any more)."""
        return self._write("discard_notice", payee, journal_id)

    def queued_notices(self, payee: str,
                       limit: int = MAX_QUEUED_NOTICES_PER_PAYEE) -> defer.Deferred:
        """Fires with the Notices waiting for *payee*, oldest first."""
        return self._read("queued_notices", payee, limit)

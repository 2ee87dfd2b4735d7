"""The ledger's rules in SQL, shared by the SQLite and PostgreSQL stores.

A store is synchronous and owns one connection; it is used by one thread at
a time (the group-commit writer, a reader of the service's pool, or the admin
CLI).  Every movement is one journal row plus both balance updates in one
transaction, and every check that guards money is part of the UPDATE that
moves it (``... WHERE balance - held >= ?``), so two processes sharing one
PostgreSQL cannot race between a read and a write.  The UNIQUE index on
``journal.idempotency_key`` is what stops a second debit, not memory.

``run_batch`` is the unit of work: one transaction, one COMMIT.  Consecutive
transfers in it form a run (``runs.py``), decided together against locked
rows; every other operation runs inside a SAVEPOINT, so that a refusal or an
error undoes only that operation.  Should a run find the database other than
it read it, the batch is redone the careful way: every operation, transfers
too, in a savepoint of its own.  The public methods are the same operations,
each in a batch of one.  Subclasses supply the dialect: how to begin, what is
worth retrying, the run's statements.
"""

from __future__ import annotations

import random
import time
from typing import Any, Callable, ClassVar, NoReturn, Sequence

from mpay.ledger import audit as _audit
from mpay.ledger.api import (
    ACTIVE, BLOCKED_STATUS, MAX_STATEMENT_ROWS, SETTLEMENT, STATEMENT_ROWS, Balance, DeviceKey,
    JournalEntry, LedgerError, Outcome, TransferResult, UnknownAccount, check_number,
    validate_movement,
)
from mpay.ledger.holds import HoldOperations
from mpay.ledger.notices import NoticeOperations
from mpay.ledger.runs import TransferRuns, refusal
from mpay.ledger.sessions import SessionOperations

MAX_BATCH_ATTEMPTS = 8
"""Tries of one batch that hit a deadlock, serialization failure or lock timeout."""

RETRY_BACKOFF_S = 0.005
"""First pause before retrying a batch; doubled per attempt, with jitter."""

MAX_BATCH = 512
"""Operations committed together by the group-commit writer (one fsync per group)."""

Op = tuple[str, tuple]

_JOURNAL_COLUMNS = ("id, debit, credit, amount, kind, reference, idempotency_key, payer_signature,"
                    " debit_balance_after, credit_balance_after, created")

# The hot path: guarded balance updates and the journal insert.  SQLite runs
# them bare and reads the result back (cheaper than its RETURNING, and two
# single-row UPDATEs beat one two-row UPDATE there); PostgreSQL appends the
# RETURNING clause and saves a round trip.
_CREDIT = "UPDATE accounts SET balance = balance + ? WHERE number = ? AND status = 'active'"
_DEBIT = ("UPDATE accounts SET balance = balance - ? WHERE number = ? AND status = 'active'"
          " AND balance - held >= ?")
_DEBIT_SETTLEMENT = ("UPDATE accounts SET balance = balance - ? WHERE number = ?"
                     " AND status = 'active'")  # the settlement account has no floor
_INSERT_JOURNAL = (
    "INSERT INTO journal (debit, credit, amount, kind, reference, idempotency_key,"
    " payer_signature, debit_balance_after, credit_balance_after, created)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (idempotency_key) DO NOTHING")
_REPLAY = ("SELECT id, debit, credit, amount, debit_balance_after, created FROM journal"
           " WHERE idempotency_key = ?")


def _entries(cursor: Any) -> list[JournalEntry]:
    """Journal rows as read with _JOURNAL_COLUMNS (the signature as bytes, whatever the driver)."""
    return [JournalEntry(*row[:7], None if row[7] is None else bytes(row[7]), *row[8:])
            for row in cursor.fetchall()]


class _Refused(Exception):
    """Raised inside an operation to undo its savepoint and answer *result*."""

    def __init__(self, result: object):
        super().__init__(result)
        self.result = result


class SQLStore(TransferRuns, HoldOperations, SessionOperations, NoticeOperations):
    """The synchronous ledger on one DB-API connection; see the module docstring."""

    dialect: ClassVar[str]
    max_batch: ClassVar[int] = MAX_BATCH

    def __init__(self, connection: Any, clock: Callable[[], float] = time.time):
        self._conn = connection
        self._clock = clock
        self.batch_retries = 0  # batches run again after a transient conflict

    # -- dialect hooks ------------------------------------------------------

    def _x(self, sql: str, params: Sequence = ()) -> Any:
        """Execute *sql* written with ``?`` placeholders; return the cursor."""
        raise NotImplementedError

    def _begin_batch(self, ops: Sequence[Op]) -> None:
        """Open the write transaction (and lock what *ops* touch, where rows lock one by one)."""
        raise NotImplementedError

    def _control(self, *statements: str) -> None:
        """Run transaction-control statements (no parameters, no results) in order."""
        for statement in statements:
            self._x(statement)

    def _begin_snapshot(self) -> None:
        raise NotImplementedError

    def _is_retryable(self, exc: BaseException) -> bool:
        raise NotImplementedError

    def _update_account(self, sql: str, params: Sequence, number: str) -> tuple[int, int] | None:
        """Run a guarded UPDATE of the account *number*.

        Returns (balance, held) after it, or None when the guard matched no row.
        """
        return self._x(sql + " RETURNING balance, held", params).fetchone()

    def _credit(self, number: str, amount: int) -> tuple[int, int] | None:
        """Pay *amount* into an active account; (balance, held) after, or None."""
        return self._update_account(_CREDIT, (amount, number), number)

    @staticmethod
    def _in_account_order(payer: str, payee: str, debit: Callable[[], Any],
                          credit: Callable[[], Any]) -> tuple[Any, Any]:
        """Run *debit* and *credit* in one global order of account numbers, so two
        movements between the same accounts cannot deadlock; stop at the first None."""
        if payer < payee:
            debited = debit()
            return debited, credit() if debited is not None else None
        credited = credit()
        return debit() if credited is not None else None, credited

    @staticmethod
    def _refuse(result: object) -> NoReturn:
        """Undo the running operation (its savepoint) and answer *result*."""
        raise _Refused(result)

    def _insert_journal(self, params: Sequence) -> int | None:
        """Insert a journal row; its id, or None if the idempotency key is taken."""
        row = self._x(_INSERT_JOURNAL + " RETURNING id", params).fetchone()
        return None if row is None else row[0]

    def close(self) -> None:
        self._conn.close()

    def close_quietly(self) -> None:
        """Close, ignoring a connection that is already gone."""
        try:
            self._conn.close()
        except Exception:
            pass

    # -- the unit of work ---------------------------------------------------

    def run_batch(self, ops: Sequence[Op], careful: bool = False) -> list[object]:
        """Run *ops* in one transaction (module docstring); their results in order.

        A result is the operation's answer, or the exception it raised (that
        operation alone is undone).  A transient conflict (deadlock,
        serialization failure, lock timeout) reruns the whole batch; any other
        failure of the transaction itself raises, and nothing was committed
        unless the COMMIT itself was lost in flight.  *careful* forms no runs
        (what a batch falls back to; tests compare the two ways).
        """
        for attempt in range(1, MAX_BATCH_ATTEMPTS + 1):
            try:
                return self._run_once(ops, careful)
            except Exception as exc:
                self._rollback_quietly()
                if not careful and not self._is_retryable(exc):
                    # A run met something it did not expect: the careful way decides.
                    careful = True
                    self.run_conflicts += 1
                    continue
                if not self._is_retryable(exc) or attempt == MAX_BATCH_ATTEMPTS:
                    raise
                self.batch_retries += 1
                time.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
        raise AssertionError("unreachable")

    def _run_once(self, ops: Sequence[Op], careful: bool) -> list[object]:
        """One try of ``run_batch``; *careful*: no runs, every operation in a savepoint."""
        control = self._control
        self._begin_batch(ops)
        if len(ops) == 1 and (careful or ops[0][0] != "transfer"):
            # Alone in its transaction: the transaction is its savepoint.
            [result] = results = [self._careful(*ops[0])]
            if isinstance(result, (_Refused, Exception)):
                self._rollback_quietly()
                return [result.result if isinstance(result, _Refused) else result]
            control("COMMIT")
            return results
        results: list[object] = []
        in_savepoint = False
        index = 0
        while index < len(ops):
            name, args = ops[index]
            if name == "transfer" and not careful:
                end = index + 1
                while end < len(ops) and ops[end][0] == "transfer":
                    end += 1
                if in_savepoint:
                    control("RELEASE SAVEPOINT op")
                    in_savepoint = False
                results.extend(self._transfer_run([args for _, args in ops[index:end]]))
                index = end
                continue
            # Release the last operation's savepoint and open this one's in one go.
            control(*(("RELEASE SAVEPOINT op",) if in_savepoint else ()), "SAVEPOINT op")
            in_savepoint = True
            result = self._careful(name, args)
            if isinstance(result, (_Refused, Exception)):
                control("ROLLBACK TO SAVEPOINT op")
                result = result.result if isinstance(result, _Refused) else result
            results.append(result)
            index += 1
        control(*(("RELEASE SAVEPOINT op",) if in_savepoint else ()), "COMMIT")
        return results

    def _careful(self, name: str, args: tuple) -> object:
        """Run one operation; its answer, or the _Refused / exception that must undo it."""
        try:
            return getattr(self, "_op_" + name)(*args)
        except _Refused as refused:
            return refused
        except Exception as exc:
            if self._is_retryable(exc):
                raise
            return exc

    def _rollback_quietly(self) -> None:
        try:
            self._x("ROLLBACK")
        except Exception:
            pass  # no transaction open, or the connection is gone: either way nothing commits

    def _one(self, name: str, *args: object) -> Any:
        [result] = self.run_batch([(name, args)])
        if isinstance(result, BaseException):
            raise result
        return result

    # -- writes: the public synchronous API ---------------------------------

    def open_account(self, number: str) -> bool:
        """Create an active, empty account; False if it existed already."""
        return self._one("open_account", number)

    def transfer(self, payer: str, payee: str, amount: int, idempotency_key: str,
                 kind: str = "transfer", reference: str = "",
                 payer_signature: bytes | None = None) -> TransferResult:
        return self._one("transfer", payer, payee, amount, idempotency_key, kind, reference,
                         payer_signature)

    def cash_in(self, number: str, amount: int, idempotency_key: str,
                reference: str = "") -> TransferResult:
        """Money enters the system: settlement -> *number*."""
        return self.transfer(SETTLEMENT, number, amount, idempotency_key, "cash_in", reference)

    def cash_out(self, number: str, amount: int, idempotency_key: str,
                 reference: str = "") -> TransferResult:
        """Money leaves the system: *number* -> settlement, limited by what is available."""
        return self.transfer(number, SETTLEMENT, amount, idempotency_key, "cash_out", reference)

    def block(self, number: str) -> None:
        self._one("set_status", number, BLOCKED_STATUS)

    def unblock(self, number: str) -> None:
        self._one("set_status", number, ACTIVE)

    def store_device_key(self, number: str, encrypted_k: bytes, ed25519_pub: bytes) -> None:
        self._one("store_device_key", number, encrypted_k, ed25519_pub)

    # -- operations (run inside run_batch's transaction and savepoint) -------

    # Which arguments of an operation name an account, and which a hold: a
    # backend that locks rows one by one (PostgreSQL) locks a batch's rows up
    # front, in one global order, so two processes' batches cannot deadlock.
    OP_ACCOUNT_ARGS: ClassVar[dict[str, tuple[int, ...]]] = {
        "transfer": (0, 1), "place_hold": (0,), "settle_hold": (2,), "set_status": (0,),
        "open_session": (0, 1)}
    OP_HOLD_ARGS: ClassVar[dict[str, tuple[int, ...]]] = {
        "settle_hold": (0,), "release_hold": (0,)}
    OP_SESSION_ARGS: ClassVar[dict[str, tuple[int, ...]]] = {"settle_session": (0,)}

    def _op_open_account(self, number: str) -> bool:
        check_number(number)
        row = self._x("INSERT INTO accounts (number, balance, held, status, created)"
                      " VALUES (?, 0, 0, 'active', ?) ON CONFLICT (number) DO NOTHING"
                      " RETURNING number", (number, self._clock())).fetchone()
        return row is not None

    def _op_transfer(self, payer: str, payee: str, amount: int, key: str, kind: str,
                     reference: str, signature: bytes | None) -> TransferResult:
        reason = validate_movement(payer, payee, amount, kind, key, reference, signature)
        if reason:
            return TransferResult(Outcome.INVALID, payer=payer, payee=payee, detail=reason)
        # A used key is found by the journal insert (happy path) or, when the
        # movement would be refused now, by _replay: the original answer wins.
        debit, debit_params = ((_DEBIT_SETTLEMENT, (amount, payer)) if payer == SETTLEMENT
                               else (_DEBIT, (amount, payer, amount)))
        debited, credited = self._in_account_order(
            payer, payee, lambda: self._update_account(debit, debit_params, payer),
            lambda: self._credit(payee, amount))
        if debited is None or credited is None:
            raise _Refused(self._replay(key) or self._refusal(payer, payee))
        assert payer == SETTLEMENT or 0 <= debited[1] <= debited[0], (payer, debited)
        return self._journal(payer, payee, amount, kind, reference, key, signature,
                             debited[0], credited[0])

    def _journal(self, payer: str, payee: str, amount: int, kind: str, reference: str,
                 key: str, signature: bytes | None, payer_after: int,
                 payee_after: int) -> TransferResult:
        now = self._clock()
        journal_id = self._insert_journal((payer, payee, amount, kind, reference, key, signature,
                                           payer_after, payee_after, now))
        if journal_id is None:  # the key is taken: undo this attempt, answer the original
            original = self._replay(key)
            assert original is not None, key
            raise _Refused(original)
        return TransferResult(Outcome.COMMITTED, journal_id, payer, payee, amount, payer_after,
                              now)

    def _replay(self, key: str) -> TransferResult | None:
        row = self._x(_REPLAY, (key,)).fetchone()
        if row is None:
            return None
        journal_id, payer, payee, amount, payer_after, created = row
        return TransferResult(Outcome.DUPLICATE, journal_id, payer, payee, amount, payer_after,
                              created)

    def _refusal(self, payer: str, payee: str | None) -> TransferResult:
        """Why a guarded UPDATE matched no row, in the order the PS reports it."""
        return refusal(payer, payee, {row[0]: row[1] for row in self._x(
            "SELECT number, status FROM accounts WHERE number IN (?, ?)", (payer, payee or payer))})

    def _op_set_status(self, number: str, status: str) -> None:
        if number == SETTLEMENT:
            raise LedgerError("the settlement account cannot be blocked")
        row = self._x("UPDATE accounts SET status = ? WHERE number = ? RETURNING number",
                      (status, number)).fetchone()
        if row is None:
            raise UnknownAccount(number)

    def _op_store_device_key(self, number: str, encrypted_k: bytes, ed25519_pub: bytes) -> None:
        check_number(number)
        if not isinstance(encrypted_k, bytes) or not isinstance(ed25519_pub, bytes) \
                or len(ed25519_pub) != 32:
            raise ValueError("encrypted K must be bytes and the Ed25519 public key 32 bytes")
        self._x("INSERT INTO device_keys (number, encrypted_k, ed25519_pub, created)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (number) DO UPDATE SET"
                " encrypted_k = excluded.encrypted_k, ed25519_pub = excluded.ed25519_pub,"
                " created = excluded.created", (number, encrypted_k, ed25519_pub, self._clock()))

    # -- reads (autocommit; each one statement, so each sees one snapshot) ---

    def balance(self, number: str) -> Balance:
        row = self._x("SELECT balance, held, status FROM accounts WHERE number = ?",
                      (number,)).fetchone()
        if row is None:
            raise UnknownAccount(number)
        assert 0 <= row[1] and (number == SETTLEMENT or row[1] <= row[0]), (number, row)
        return Balance(row[0], row[1], row[0] - row[1], row[2])

    def statement(self, number: str, limit: int = STATEMENT_ROWS) -> list[JournalEntry]:
        """The newest *limit* movements of *number*, newest first."""
        if isinstance(limit, bool) or not isinstance(limit, int) \
                or not 0 < limit <= MAX_STATEMENT_ROWS:
            raise ValueError(f"limit must be 1..{MAX_STATEMENT_ROWS}")
        self.balance(number)  # raises UnknownAccount
        return _entries(self._x(f"SELECT {_JOURNAL_COLUMNS} FROM journal WHERE debit = ? OR"
                                " credit = ? ORDER BY id DESC LIMIT ?", (number, number, limit)))

    def journal_page(self, after_id: int = 0, limit: int = STATEMENT_ROWS) -> list[JournalEntry]:
        """The journal in id order, *limit* rows after *after_id*: the whole journal, page by
        page (an export, a check after a load run), without one huge read."""
        if type(after_id) is not int or isinstance(limit, bool) or not isinstance(limit, int) \
                or not 0 < limit <= MAX_STATEMENT_ROWS:
            raise ValueError(f"after_id must be an int and limit 1..{MAX_STATEMENT_ROWS}")
        return _entries(self._x(f"SELECT {_JOURNAL_COLUMNS} FROM journal WHERE id > ?"
                                " ORDER BY id LIMIT ?", (after_id, limit)))

    def device_key(self, number: str) -> DeviceKey | None:
        row = self._x("SELECT number, encrypted_k, ed25519_pub, created FROM device_keys"
                      " WHERE number = ?", (number,)).fetchone()
        return None if row is None else DeviceKey(row[0], bytes(row[1]), bytes(row[2]), row[3])

    def audit(self) -> _audit.AuditReport:
        """Prove the books balance, on one consistent snapshot."""
        self._begin_snapshot()
        try:
            return _audit.run_audit(lambda sql, params=(): self._x(sql, params).fetchall())
        finally:
            self._rollback_quietly()

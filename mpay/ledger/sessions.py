"""Sessions charged by time: one hold per consumer, shared by all of its sessions.

A consumer may run several timed sessions at once (DESIGN section 7) and they
spend one balance together, so they draw on one hold, the consumer's
*sessions hold* (reference ``SESSIONS_HOLD_REF``).  Opening a session moves
all of the consumer's available money into that hold (creating it for the
first session): while a session runs, nothing else, a transfer or another
merchant's charge, can spend what the sessions may still use.  Each session
settles its own charge out of the hold (``spent`` grows, the money moves to
its merchant, one journal row); the last session to end releases the rest.

The PS records every few seconds what each session owes so far
(``checkpoint_sessions``); a restarted PS calls ``recover_sessions``, which
settles each of its open sessions at that checkpoint, within what the hold
still has, in one transaction.  The session's row keeps the dialog (JSON),
so the PS can send BYE to both sides afterwards.

Settling is idempotent by the session's state (open -> settled, once), and
the journal row's idempotency key is derived from the session reference.
Mixed into ``store.SQLStore``; the operations run inside its batches.
"""

from __future__ import annotations

from typing import Sequence

from mpay.ledger.api import (
    ACTIVE, MAX_DIALOG_CHARS, MAX_REFERENCE_CHARS, SESSIONS_HOLD_REF, SETTLEMENT, Outcome,
    Session, SessionResult, validate_amount,
)

_SESSION_COLUMNS = ("id, hold_id, consumer, merchant, rate, session_ref, owner, opened,"
                    " checkpointed_amount, checkpointed, dialog")
# Settling a session: the charge leaves the consumer's balance and its held
# funds together, so available (balance - held) does not change.
_CONSUMER_PAYS = ("UPDATE accounts SET balance = balance - ?, held = held - ?"
                  " WHERE number = ? AND held >= ? AND balance >= ?")
# The merchant is paid for service already given even if blocked since.
_MERCHANT_PAID = "UPDATE accounts SET balance = balance + ? WHERE number = ?"


def settlement_key(session_ref: str) -> str:
    """The journal idempotency key of a session's charge: one per session."""
    return "session|" + session_ref


class SessionOperations:
    """open / checkpoint / settle / recover; mixed into ``SQLStore``."""

    def open_session(self, consumer: str, merchant: str, rate: int, session_ref: str,
                     owner: str, dialog: str) -> SessionResult:
        return self._one("open_session", consumer, merchant, rate, session_ref, owner, dialog)

    def settle_session(self, session_id: int, charge: int) -> SessionResult:
        return self._one("settle_session", session_id, charge)

    def checkpoint_sessions(self, owed: Sequence[tuple[int, int]]) -> int:
        return self._one("checkpoint_sessions", owed)

    def recover_sessions(self, owner: str) -> list[tuple[Session, SessionResult]]:
        return self._one("recover_sessions", owner)

    # -- operations (inside SQLStore.run_batch's transaction and savepoint) --

    def _op_open_session(self, consumer: str, merchant: str, rate: int, session_ref: str,
                         owner: str, dialog: str) -> SessionResult:
        """Open a session; all of the consumer's available money joins its sessions hold."""
        reason = validate_amount(rate)
        if reason is None and (SETTLEMENT in (consumer, merchant) or consumer == merchant):
            reason = "a session is between two different user accounts"
        if reason is None and not all(isinstance(text, str) for text in (session_ref, owner, dialog)):
            reason = "session reference, owner and dialog must be strings"
        if reason is None and (len(session_ref) > MAX_REFERENCE_CHARS or len(dialog) > MAX_DIALOG_CHARS):
            reason = "session reference or dialog too long"
        if reason:
            return SessionResult(Outcome.INVALID, detail=reason)
        found = self._x("SELECT id, hold_id FROM sessions WHERE session_ref = ?",
                        (session_ref,)).fetchone()
        if found is not None:  # the same dialog again (a retransmission): the same session
            return SessionResult(Outcome.DUPLICATE, found[0], found[1], self._unspent(found[1]))
        accounts = {row[0]: row[1:] for row in self._x(
            "SELECT number, balance, held, status FROM accounts WHERE number IN (?, ?)",
            (consumer, merchant))}
        if consumer not in accounts:
            return SessionResult(Outcome.UNKNOWN_PAYER, detail="consumer has no account")
        if merchant not in accounts:
            return SessionResult(Outcome.UNKNOWN_PAYEE, detail="merchant has no account")
        for number, who in ((consumer, "consumer"), (merchant, "merchant")):
            if accounts[number][2] != ACTIVE:
                return SessionResult(Outcome.BLOCKED, detail=f"{who} is blocked")
        balance, held, _ = accounts[consumer]
        available = balance - held
        pool = self._x("SELECT id, amount - spent FROM holds WHERE account = ? AND status = 'active'"
                       " AND session_ref = ?", (consumer, SESSIONS_HOLD_REF)).fetchone()
        unspent = available + (pool[1] if pool else 0)
        if unspent <= 0:
            return SessionResult(Outcome.INSUFFICIENT, detail="available balance is short")
        if available > 0:
            row = self._update_account("UPDATE accounts SET held = held + ? WHERE number = ?"
                                       " AND status = 'active' AND balance - held >= ?",
                                       (available, consumer, available), consumer)
            if row is None:  # moved since the read (another process): try again later
                self._refuse(SessionResult(Outcome.INSUFFICIENT, detail="balance changed"))
            assert 0 <= row[1] <= row[0], (consumer, row)
        now = self._clock()
        if pool is None:
            hold_id = self._x("INSERT INTO holds (account, amount, session_ref, created,"
                              " checkpointed_amount, status) VALUES (?, ?, ?, ?, 0, 'active')"
                              " RETURNING id", (consumer, available, SESSIONS_HOLD_REF, now)
                              ).fetchone()[0]
        else:
            hold_id = pool[0]
            if available > 0:
                self._x("UPDATE holds SET amount = amount + ? WHERE id = ?", (available, hold_id))
        session_id = self._x(
            "INSERT INTO sessions (hold_id, consumer, merchant, rate, session_ref, owner, opened,"
            " dialog) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (hold_id, consumer, merchant, rate, session_ref, owner, now, dialog)).fetchone()[0]
        return SessionResult(Outcome.COMMITTED, session_id, hold_id, unspent, created=now)

    def _unspent(self, hold_id: int) -> int:
        row = self._x("SELECT amount - spent FROM holds WHERE id = ? AND status = 'active'",
                      (hold_id,)).fetchone()
        return row[0] if row else 0

    def _op_settle_session(self, session_id: int, charge: int) -> SessionResult:
        """Charge the session (within what its hold has left); the last one releases the rest."""
        reason = validate_amount(charge, minimum=0)
        if reason:
            return SessionResult(Outcome.INVALID, session_id, detail=reason)
        row = self._x("UPDATE sessions SET status = 'settled', charged = ? WHERE id = ?"
                      " AND status = 'open' RETURNING hold_id, consumer, merchant, session_ref",
                      (charge, session_id)).fetchone()
        if row is None:
            done = self._x("SELECT hold_id, charged, journal_id FROM sessions WHERE id = ?",
                           (session_id,)).fetchone()
            if done is None:
                return SessionResult(Outcome.NO_HOLD, session_id, detail="no such session")
            created = None
            if done[2] is not None:
                created = self._x("SELECT created FROM journal WHERE id = ?",
                                  (done[2],)).fetchone()[0]
            return SessionResult(Outcome.DUPLICATE, session_id, done[0], self._unspent(done[0]),
                                 done[1], done[2], created)
        hold_id, consumer, merchant, session_ref = row
        journal_id = created = None
        if charge:
            spent = self._x("UPDATE holds SET spent = spent + ? WHERE id = ? AND status = 'active'"
                            " AND amount - spent >= ? RETURNING id", (charge, hold_id, charge)
                            ).fetchone()
            if spent is None:
                self._refuse(SessionResult(Outcome.INVALID, session_id, hold_id,
                                           self._unspent(hold_id),
                                           detail="charge exceeds what the sessions hold has"))
            debited, credited = self._in_account_order(
                consumer, merchant,
                lambda: self._update_account(_CONSUMER_PAYS, (charge, charge, consumer, charge,
                                                              charge), consumer),
                lambda: self._update_account(_MERCHANT_PAID, (charge, merchant), merchant))
            assert debited is not None and credited is not None, (session_id, debited, credited)
            assert 0 <= debited[1] <= debited[0], (consumer, debited)
            result = self._journal(consumer, merchant, charge, "session", session_ref,
                                   settlement_key(session_ref), None, debited[0], credited[0])
            journal_id, created = result.journal_id, result.created
            self._x("UPDATE sessions SET journal_id = ? WHERE id = ?", (journal_id, session_id))
        unspent = self._unspent(hold_id)
        still_open = self._x("SELECT 1 FROM sessions WHERE hold_id = ? AND status = 'open'"
                             " LIMIT 1", (hold_id,)).fetchone()
        if still_open is None:  # the last session: the rest of the hold goes back
            closed = self._x("UPDATE holds SET status = 'settled', charged = spent WHERE id = ?"
                             " AND status = 'active' RETURNING account, amount - spent",
                             (hold_id,)).fetchone()
            if closed is not None and closed[1]:
                self._release(closed[0], closed[1])
            unspent = 0
        return SessionResult(Outcome.COMMITTED, session_id, hold_id, unspent, charge, journal_id,
                             created)

    def _op_checkpoint_sessions(self, owed: Sequence[tuple[int, int]]) -> int:
        """Record what each session owes so far; a checkpoint never goes down."""
        now, recorded = self._clock(), 0
        for session_id, amount in owed:
            reason = validate_amount(amount, minimum=0)
            if reason:
                raise ValueError(reason)
            row = self._x("UPDATE sessions SET checkpointed_amount = ?, checkpointed = ?"
                          " WHERE id = ? AND status = 'open' AND checkpointed_amount <= ?"
                          " RETURNING id", (amount, now, session_id, amount)).fetchone()
            recorded += row is not None
        return recorded

    def _op_recover_sessions(self, owner: str) -> list[tuple[Session, SessionResult]]:
        """Settle every open session of *owner* at its last checkpoint (a PS restart).

        Sessions of one consumer together get at most what their hold has
        left, oldest first; each settlement is the one ``settle_session`` does.
        """
        sessions = [Session(*row) for row in self._x(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE owner = ? AND status = 'open'"
            " ORDER BY hold_id, id", (owner,)).fetchall()]
        settled = []
        for session in sessions:
            charge = min(session.checkpointed_amount, self._unspent(session.hold_id))
            settled.append((session, self._op_settle_session(session.id, charge)))
        return settled

    # -- reads ------------------------------------------------------------

    def open_sessions(self, owner: str | None = None) -> list[Session]:
        """Open sessions (of *owner*, or all), oldest first."""
        where, params = ("status = 'open'", ()) if owner is None else \
            ("status = 'open' AND owner = ?", (owner,))
        return [Session(*row) for row in self._x(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE {where} ORDER BY id", params).fetchall()]

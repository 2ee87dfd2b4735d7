"""Holds: funds reserved for sessions charged by time (DESIGN section 7).

When a timed session starts, the PS places a hold on the consumer's account
for what the session may cost; ``available`` (balance - held) shrinks, so
neither a concurrent transfer nor another session can spend the same money.
While the session runs the PS records what is owed so far
(``checkpoint_hold``, every few seconds); at BYE it settles the hold (the
charge moves to the merchant, the rest is released, one transaction).  Holds
live in the database, so a restarted PS finds every open session in
``open_holds`` and settles each up to its last checkpoint: no money is lost
or made by a crash.

Mixed into ``store.SQLStore``; the operations run inside its batches.
"""

from __future__ import annotations

from mpay.ledger.api import (
    MAX_REFERENCE_CHARS, SESSIONS_HOLD_REF, SETTLEMENT, Hold, HoldResult, Outcome, TransferResult, validate_amount,
)

_HOLD_COLUMNS = "id, account, amount, session_ref, created, checkpointed_amount, status"

# Settling: release the whole hold and take the charge in one UPDATE.  The
# payer's status no longer matters (the funds were reserved while it was
# active); its other holds must stay covered.
_RELEASE_AND_CHARGE = ("UPDATE accounts SET held = held - ?, balance = balance - ?"
                       " WHERE number = ? AND balance - ? >= held - ?")
_RELEASE = "UPDATE accounts SET held = held - ? WHERE number = ? AND held >= ?"


class HoldOperations:
    """place / checkpoint / settle / release, and the queries a restart needs."""

    def place_hold(self, number: str, amount: int, session_ref: str) -> HoldResult:
        """Reserve *amount* of *number*'s available funds for the session *session_ref*."""
        return self._one("place_hold", number, amount, session_ref)

    def settle_hold(self, hold_id: int, charge_amount: int, payee: str,
                    idempotency_key: str) -> TransferResult:
        """Move *charge_amount* (<= the hold) to *payee*, release the rest: see _op_settle_hold."""
        return self._one("settle_hold", hold_id, charge_amount, payee, idempotency_key)

    def release_hold(self, hold_id: int) -> bool:
        """Give the funds back (session declined or failed); False if not active."""
        return self._one("release_hold", hold_id)

    def checkpoint_hold(self, hold_id: int, amount_so_far: int) -> bool:
        """Record what the session owes so far; False if the hold is not active."""
        return self._one("checkpoint_hold", hold_id, amount_so_far)

    # -- operations (inside SQLStore.run_batch's transaction and savepoint) --

    def _op_place_hold(self, number: str, amount: int, session_ref: str) -> HoldResult:
        reason = validate_amount(amount)
        if reason is None and (number == SETTLEMENT or not isinstance(session_ref, str)
                               or len(session_ref) > MAX_REFERENCE_CHARS
                               or session_ref == SESSIONS_HOLD_REF):
            reason = "holds are for user accounts and need a session reference"
        if reason:
            return HoldResult(Outcome.INVALID, detail=reason)
        row = self._update_account("UPDATE accounts SET held = held + ? WHERE number = ?"
                                   " AND status = 'active' AND balance - held >= ?",
                                   (amount, number, amount), number)
        if row is None:
            refusal = self._refusal(number, None)
            self._refuse(HoldResult(refusal.outcome, detail=refusal.detail))
        assert 0 <= row[1] <= row[0], (number, row)
        hold = self._x("INSERT INTO holds (account, amount, session_ref, created,"
                       " checkpointed_amount, status) VALUES (?, ?, ?, ?, 0, 'active')"
                       " RETURNING id",
                       (number, amount, session_ref, self._clock())).fetchone()
        return HoldResult(Outcome.COMMITTED, hold[0], row[0] - row[1])

    def _op_settle_hold(self, hold_id: int, charge: int, payee: str, key: str) -> TransferResult:
        """Charge up to the hold to *payee* and release the rest, in one transaction.

        The funds were reserved while the payer was active, so a payer blocked
        since is still charged; the payee must be able to receive (if not, the
        hold stays open and the caller may release it).  A zero charge moves
        nothing and leaves no journal row.
        """
        reason = validate_amount(charge, minimum=0)
        if reason is None and not isinstance(key, str):
            reason = "idempotency key must be a string"
        if reason:
            return TransferResult(Outcome.INVALID, payee=payee, detail=reason)
        hold = self._x("UPDATE holds SET status = 'settled', charged = ? WHERE id = ?"
                       " AND status = 'active' AND session_ref <> ? AND amount - spent >= ?"
                       " RETURNING account, amount - spent, session_ref",
                       (charge, hold_id, SESSIONS_HOLD_REF, charge)).fetchone()
        if hold is None:
            replayed = self._replay(key)
            if replayed is not None:
                return replayed
            row = self._x("SELECT status, session_ref FROM holds WHERE id = ?",
                          (hold_id,)).fetchone()
            if row is not None and row[1] == SESSIONS_HOLD_REF:
                return TransferResult(Outcome.INVALID, payee=payee,
                                      detail="a sessions hold is settled session by session")
            if row is not None and row[0] == "active":
                return TransferResult(Outcome.INVALID, payee=payee,
                                      detail="charge exceeds the hold")
            return TransferResult(Outcome.NO_HOLD, payee=payee, detail="no active hold")
        payer, held, session_ref = hold
        if payer == payee or payee == SETTLEMENT:
            self._refuse(TransferResult(Outcome.INVALID, payer=payer, payee=payee,
                                        detail="a hold is paid to another user account"))
        if charge == 0:
            self._release(payer, held)
            return TransferResult(Outcome.COMMITTED, None, payer, payee, 0)
        debited, credited = self._in_account_order(
            payer, payee, lambda: self._update_account(
                _RELEASE_AND_CHARGE, (held, charge, payer, charge, held), payer),
            lambda: self._credit(payee, charge))
        if credited is None:
            self._refuse(self._replay(key) or self._refusal(payer, payee))
        assert debited is not None and 0 <= debited[1] <= debited[0], (hold_id, debited)
        result = self._journal(payer, payee, charge, "session", session_ref, key, None,
                               debited[0], credited[0])
        self._x("UPDATE holds SET journal_id = ? WHERE id = ?", (result.journal_id, hold_id))
        return result

    def _op_release_hold(self, hold_id: int) -> bool:
        hold = self._x("UPDATE holds SET status = 'released' WHERE id = ? AND status = 'active'"
                       " AND session_ref <> ? RETURNING account, amount - spent",
                       (hold_id, SESSIONS_HOLD_REF)).fetchone()
        if hold is None:
            return False
        self._release(*hold)
        return True

    def _release(self, account: str, amount: int) -> None:
        row = self._update_account(_RELEASE, (amount, account, amount), account)
        assert row is not None, (account, amount)  # held is the sum of the active holds

    def _op_checkpoint_hold(self, hold_id: int, amount_so_far: int) -> bool:
        """Record what a session owes so far (never less than before, never above the hold)."""
        reason = validate_amount(amount_so_far, minimum=0)
        if reason:
            raise ValueError(reason)
        row = self._x("UPDATE holds SET checkpointed_amount = ? WHERE id = ? AND status = 'active'"
                      " AND amount >= ? AND checkpointed_amount <= ? RETURNING id",
                      (amount_so_far, hold_id, amount_so_far, amount_so_far)).fetchone()
        return row is not None

    # -- reads ------------------------------------------------------------

    def open_holds(self) -> list[Hold]:
        """Every active hold, oldest first: what a restarted PS must settle."""
        rows = self._x(f"SELECT {_HOLD_COLUMNS} FROM holds WHERE status = 'active' ORDER BY id")
        return [Hold(*row) for row in rows.fetchall()]

    def hold(self, hold_id: int) -> Hold | None:
        row = self._x(f"SELECT {_HOLD_COLUMNS} FROM holds WHERE id = ?", (hold_id,)).fetchone()
        return None if row is None else Hold(*row)

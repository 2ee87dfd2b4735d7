"""Runs of transfers: a group's movements decided in memory, written with a few statements.

Group commit shares one fsync among a whole group; what is left per transfer
is statements.  Done one by one (``SQLStore._op_transfer``, the careful path)
a transfer costs seven: a savepoint and its release, two guarded UPDATEs,
two reads back and the journal INSERT.  A *run*, the consecutive transfers of
one batch, costs a handful for all of them::

    SELECT the accounts it names        (locked: see below)
    SELECT the journal rows of its idempotency keys
    ... decide every transfer in order, in memory, by the careful path's rules ...
    INSERT the journal rows             (multi-row INSERTs; PostgreSQL: one pipeline)
    UPDATE each touched account once    (one executemany, compare-and-set)

This is sound because nobody else can change those rows while the run holds
them: SQLite's writer has the database lock (``BEGIN IMMEDIATE``), and on
PostgreSQL the accounts are read ``FOR UPDATE`` in one global order, as the
careful path's batches lock them.  Nothing is remembered between batches.
Should a write not match what was decided (a compare-and-set that finds
another balance, a key that proves to be taken, any database error), the
run raises, the whole batch is rolled back and run again the careful way,
where the guarded UPDATEs and the UNIQUE key decide: the fast path can be
slower than planned, never wrong.  ``tests/test_ledger.py`` checks that both
paths give the same answers and the same books for random mixes.
"""

from __future__ import annotations

from typing import Any, Sequence

from mpay.ledger.api import ACTIVE, SETTLEMENT, Outcome, TransferResult, validate_movement


class RunConflict(Exception):
    """What a run wrote is not what it decided: roll back, redo the batch carefully."""


def refusal(payer: str, payee: str | None, status: dict[str, str]) -> TransferResult:
    """Why a movement between these accounts cannot be made, in the order the PS reports it.

    *status* maps each existing account among them to its status; a short
    balance is the answer when both exist and are active.
    """
    if payer not in status:
        outcome, detail = Outcome.UNKNOWN_PAYER, "payer has no account"
    elif payee is not None and payee not in status:
        outcome, detail = Outcome.UNKNOWN_PAYEE, "payee has no account"
    elif status[payer] != ACTIVE:
        outcome, detail = Outcome.BLOCKED, "payer is blocked"
    elif payee is not None and status[payee] != ACTIVE:
        outcome, detail = Outcome.BLOCKED, "payee is blocked"
    else:
        outcome, detail = Outcome.INSUFFICIENT, "available balance is short"
    return TransferResult(outcome, payer=payer, payee=payee or "", detail=detail)


JournalRow = tuple  # (debit, credit, amount, kind, reference, key, signature, debit_after,
#                      credit_after, created): the journal's columns, in _INSERT_JOURNAL's order


def decide(ops: Sequence[tuple], accounts: dict[str, list], taken: dict[str, Any],
           now: float) -> tuple[list, list[JournalRow]]:
    """Decide each transfer of *ops* in order; (plan, journal rows to insert).

    *accounts* maps number -> [balance, held, status] and is updated in place;
    *taken* maps each idempotency key already in the journal to its original
    result and gains this run's keys.  A plan entry is the final result, an
    ``int`` (commits journal row i), or ``("dup", i)`` (replays row i).
    """
    plan: list = []
    rows: list[JournalRow] = []
    for payer, payee, amount, key, kind, reference, signature in ops:
        reason = validate_movement(payer, payee, amount, kind, key, reference, signature)
        if reason:
            plan.append(TransferResult(Outcome.INVALID, payer=payer, payee=payee, detail=reason))
            continue
        original = taken.get(key)
        if original is not None:  # the key binds: the original answer wins, refused or not
            plan.append(original if isinstance(original, TransferResult) else ("dup", original))
            continue
        debited, credited = accounts.get(payer), accounts.get(payee)
        if debited is None or credited is None or debited[2] != ACTIVE \
                or credited[2] != ACTIVE \
                or (payer != SETTLEMENT and debited[0] - debited[1] < amount):
            plan.append(refusal(payer, payee, {number: accounts[number][2]
                                               for number in (payer, payee) if number in accounts}))
            continue
        debited[0] -= amount
        credited[0] += amount
        assert payer == SETTLEMENT or 0 <= debited[1] <= debited[0], (payer, debited)
        taken[key] = len(rows)
        plan.append(len(rows))
        rows.append((payer, payee, amount, kind, reference, key, signature, debited[0],
                     credited[0], now))
    return plan, rows


_new_tuple = tuple.__new__  # a NamedTuple's own __new__ is a Python function: twice the cost
assert TransferResult._fields[-1] == "detail" and len(TransferResult._fields) == 8


def results(plan: list, rows: list[JournalRow], ids: Sequence[int]) -> list[TransferResult]:
    """The plan's answers, now that the journal rows have their ids."""
    assert len(ids) == len(rows), (len(ids), len(rows))
    answers: list[TransferResult] = []
    for entry in plan:
        if type(entry) is TransferResult:
            answers.append(entry)
            continue
        outcome = Outcome.COMMITTED
        if type(entry) is tuple:
            outcome, entry = Outcome.DUPLICATE, entry[1]
        payer, payee, amount, _, _, _, _, payer_after, _, created = rows[entry]
        answers.append(_new_tuple(TransferResult, (outcome, ids[entry], payer, payee, amount,
                                                   payer_after, created, "")))
    return answers


class TransferRuns:
    """``_transfer_run``, mixed into ``SQLStore``; the dialect supplies the four statements."""

    _clock: Any
    run_conflicts = 0  # runs redone the careful way (a class default; counted per store)

    def _read_accounts(self, numbers: list[str]) -> list[tuple]:
        """(number, balance, held, status) of each existing account in *numbers*, locked."""
        raise NotImplementedError

    def _read_keys(self, keys: list[str]) -> list[tuple]:
        """The journal rows of *keys*, as ``_REPLAY`` reads them, plus the key first."""
        raise NotImplementedError

    def _insert_journal_rows(self, rows: list[JournalRow]) -> list[int]:
        """Insert *rows* (none of whose keys is taken); their ids, in order."""
        raise NotImplementedError

    def _write_balances(self, writes: list[tuple[int, str, int]]) -> int:
        """``UPDATE accounts SET balance = new WHERE number = n AND balance = old`` for each
        (new, n, old); how many rows changed."""
        raise NotImplementedError

    def _transfer_run(self, ops: Sequence[tuple]) -> list[TransferResult]:
        """Answer the transfers *ops* (``_op_transfer``'s arguments) as one run."""
        numbers = sorted({number for op in ops for number in op[:2] if type(number) is str})
        accounts = {number: [balance, held, status]
                    for number, balance, held, status in self._read_accounts(numbers)}
        before = {number: account[0] for number, account in accounts.items()}
        keys = sorted({op[3] for op in ops if type(op[3]) is str})
        taken: dict[str, Any] = {
            key: TransferResult(Outcome.DUPLICATE, journal_id, payer, payee, amount, payer_after,
                                created)
            for key, journal_id, payer, payee, amount, payer_after, created in self._read_keys(keys)}
        plan, rows = decide(ops, accounts, taken, self._clock())
        if not rows:
            return results(plan, rows, [])
        ids = self._insert_journal_rows(rows)
        writes = [(account[0], number, before[number]) for number, account in accounts.items()
                  if account[0] != before[number]]
        if len(ids) != len(rows) or self._write_balances(writes) != len(writes):
            raise RunConflict(f"{len(rows)} journal rows, {len(writes)} balances: not as read")
        return results(plan, rows, ids)

"""The audit: prove from the database alone that the books balance.

It trusts nothing the writer maintains incrementally.  Every stored balance
is recomputed from the journal (credits - debits); the balances must sum to
zero (money only enters through the settlement account); no user balance is
negative; every account's ``held`` equals what its active holds have unspent;
every open session draws on an active hold and every active sessions hold has
an open session; every journal row moves a positive amount between two
different accounts.  The checks run in one snapshot, so a live server does not cause false alarms.
A nonzero exit of ``mpay-admin audit`` means an operator must look.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from mpay.ledger.api import SESSIONS_HOLD_REF, SETTLEMENT

MAX_REPORTED_PROBLEMS = 20
"""Discrepancies listed one by one; beyond this only their number is reported."""

Query = Callable[..., Sequence[tuple]]

_BALANCE_VS_JOURNAL = """
SELECT a.number, a.balance,
       COALESCE(c.total, 0) - COALESCE(d.total, 0)
FROM accounts a
LEFT JOIN (SELECT credit AS number, CAST(SUM(amount) AS BIGINT) AS total
           FROM journal GROUP BY credit) c ON c.number = a.number
LEFT JOIN (SELECT debit AS number, CAST(SUM(amount) AS BIGINT) AS total
           FROM journal GROUP BY debit) d ON d.number = a.number
WHERE a.balance <> COALESCE(c.total, 0) - COALESCE(d.total, 0)
ORDER BY a.number"""

_HELD_VS_HOLDS = """
SELECT a.number, a.held, COALESCE(h.total, 0)
FROM accounts a
LEFT JOIN (SELECT account AS number, CAST(SUM(amount - spent) AS BIGINT) AS total
           FROM holds WHERE status = 'active' GROUP BY account) h ON h.number = a.number
WHERE a.held <> COALESCE(h.total, 0)
ORDER BY a.number"""


@dataclass(frozen=True)
class AuditReport:
    """What the audit saw; ``ok`` is False on any discrepancy."""

    accounts: int
    journal_rows: int
    active_holds: int
    total_balance: int
    settlement_balance: int
    problems: tuple[str, ...]
    problem_count: int

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def format(self) -> str:
        """A short report for people: one summary line, then each problem."""
        verdict = "OK" if self.ok else f"FAILED ({self.problem_count} problems)"
        lines = [f"audit {verdict}: {self.accounts} accounts, {self.journal_rows} journal rows,"
                 f" {self.active_holds} active holds, sum of balances {self.total_balance},"
                 f" settlement {self.settlement_balance}"]
        lines += [f"  - {problem}" for problem in self.problems]
        if self.problem_count > len(self.problems):
            lines.append(f"  ... and {self.problem_count - len(self.problems)} more")
        return "\n".join(lines)


def run_audit(query: Query) -> AuditReport:
    """Run every check through *query(sql, params)*, which returns all rows."""
    problems: list[str] = []
    accounts, total = query("SELECT COUNT(*), CAST(COALESCE(SUM(balance), 0) AS BIGINT)"
                            " FROM accounts")[0]
    journal_rows = query("SELECT COUNT(*) FROM journal")[0][0]
    active_holds = query("SELECT COUNT(*) FROM holds WHERE status = 'active'")[0][0]
    settlement = query("SELECT balance FROM accounts WHERE number = ?", (SETTLEMENT,))
    if not settlement:
        problems.append("the settlement account is missing")
    if total != 0:
        problems.append(f"balances sum to {total}, not 0")
    for number, stored, computed in query(_BALANCE_VS_JOURNAL):
        problems.append(f"{number}: balance {stored} but the journal says {computed}")
    for number, balance in query("SELECT number, balance FROM accounts"
                                 " WHERE balance < 0 AND number <> ?", (SETTLEMENT,)):
        problems.append(f"{number}: negative balance {balance}")
    for number, held, balance in query("SELECT number, held, balance FROM accounts WHERE held < 0"
                                       " OR (held > balance AND number <> ?)", (SETTLEMENT,)):
        problems.append(f"{number}: held {held} outside 0..balance {balance}")
    for number, held, computed in query(_HELD_VS_HOLDS):
        problems.append(f"{number}: held {held} but active holds sum to {computed}")
    for session_id, hold_id in query(
            "SELECT s.id, s.hold_id FROM sessions s JOIN holds h ON h.id = s.hold_id"
            " WHERE s.status = 'open' AND h.status <> 'active' ORDER BY s.id"):
        problems.append(f"session {session_id}: open, but its hold {hold_id} is not active")
    for (hold_id,) in query(
            "SELECT h.id FROM holds h WHERE h.status = 'active' AND h.session_ref = ? AND NOT"
            " EXISTS (SELECT 1 FROM sessions s WHERE s.hold_id = h.id AND s.status = 'open')"
            " ORDER BY h.id", (SESSIONS_HOLD_REF,)):
        problems.append(f"sessions hold {hold_id}: active without an open session")
    for row_id, debit, credit, amount in query(
            "SELECT id, debit, credit, amount FROM journal WHERE amount <= 0 OR debit = credit"
            " ORDER BY id"):
        problems.append(f"journal row {row_id}: {amount} from {debit} to {credit}")
    for (row_id,) in query("SELECT j.id FROM journal j WHERE NOT EXISTS"
                           " (SELECT 1 FROM accounts a WHERE a.number = j.debit) OR NOT EXISTS"
                           " (SELECT 1 FROM accounts a WHERE a.number = j.credit) ORDER BY j.id"):
        problems.append(f"journal row {row_id}: names an account that does not exist")
    return AuditReport(
        accounts=int(accounts), journal_rows=int(journal_rows), active_holds=int(active_holds),
        total_balance=int(total), settlement_balance=int(settlement[0][0]) if settlement else 0,
        problems=tuple(problems[:MAX_REPORTED_PROBLEMS]), problem_count=len(problems))

"""Mixed traffic for fault runs: transfers, OTCN charges and timed sessions, with the books checked.

Every operation is what a careful device does: a transfer that times out,
or is refused 503 (overload: after its Retry-After), is re-sent as the same
request (Call-ID, CSeq) in a new transaction, so the PS answers it with its
first result; an OTCN request or a charge refused 503 is made again later.
An OTCN is asked for, then charged by the merchant; a timed session is
opened, runs a moment and is hung up.  Each
operation ends *succeeded*, *refused* (a final non-2xx) or *timed out* (no
final answer even after re-sending).  :func:`check_books` then proves from
the ledger that nothing was applied twice and that everything a device saw
succeed is in the journal.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, task

from mpay.sim.device import Device, DeviceError
from mpay.sip.endpoint import SIPTimeout

MIX = (("transfer", 0.6), ("otcn_charge", 0.25), ("session", 0.15))
"""What share of the operations each kind is."""

TRANSFER_RESENDS = 4
"""Times a timed-out transfer is re-sent (each a new transaction: 32 s of retransmissions)."""

SESSION_RUN_S = (0.05, 0.3)
"""How long a timed session runs before the merchant hangs up (uniform, seconds)."""

JOURNAL_PAGE_ROWS = 10_000
"""Journal rows read at a time by :func:`check_books`."""

RETRIES_ON_503 = 4
"""Times an OTCN request or a charge refused with 503 (overload) is tried again."""

RETRY_AFTER_MAX_S = 5.0
"""Longest wait a 503's Retry-After is granted."""

TRANSFER_AMOUNT_MINOR = 1
CHARGE_AMOUNT_MINOR = 2
SESSION_RATE_MINOR_PER_S = 3


@dataclass
class Outcomes:
    counts: Counter = field(default_factory=Counter)            # (kind, ending) -> n
    reasons: Counter = field(default_factory=Counter)           # (kind, "403 ...") -> n
    transfer_journal_ids: list[int] = field(default_factory=list)  # from verified receipts
    charge_journal_ids: list[int] = field(default_factory=list)
    sessions_charged: int = 0                                    # minor units, as the PS said

    def note(self, kind: str, ending: str, reason: str = "") -> None:
        self.counts[(kind, ending)] += 1
        if reason:
            self.reasons[(kind, reason)] += 1

    def totals(self) -> Counter:
        totals: Counter = Counter()
        for (_, ending), count in self.counts.items():
            totals[ending] += count
        totals["attempted"] = sum(self.counts.values())
        return totals

    def summary(self) -> str:
        totals = self.totals()
        kinds = ", ".join(f"{kind} {ending} {count}" for (kind, ending), count
                          in sorted(self.counts.items()))
        why = ", ".join(f"{kind}: {reason} x{count}" for (kind, reason), count
                        in self.reasons.most_common(5))
        return (f"attempted {totals['attempted']} / succeeded {totals['succeeded']} / refused"
                f" {totals['refused']} / timed out {totals['timed out']} ({kinds})"
                + (f"; refusals: {why}" if why else ""))


class MixedTraffic:
    """Runs *operations* operations, *concurrency* at a time, among the given devices."""

    def __init__(self, reactor: Any, *, payers: list[Device], payees: list[Device],
                 consumers: list[Device], merchants: list[Device], seed: int):
        self.reactor = reactor
        self.payers, self.payees = payers, payees
        self.consumers, self.merchants = consumers, merchants
        self.rng = random.Random(seed)
        self.outcomes = Outcomes()
        for consumer in consumers:
            consumer.charge_policy = lambda asked: 200

    def run(self, operations: int, concurrency: int, progress=None) -> defer.Deferred:
        kinds = [self._kind() for _ in range(operations)]
        jobs = iter(enumerate(kinds))
        done = [0]

        @defer.inlineCallbacks
        def worker():
            for index, kind in jobs:
                yield getattr(self, "_" + kind)(index)
                done[0] += 1
                if progress is not None:
                    progress(done[0], operations)

        return defer.gatherResults([worker() for _ in range(concurrency)], consumeErrors=True)

    def _kind(self) -> str:
        point, total = self.rng.random(), 0.0
        for kind, share in MIX:
            total += share
            if point < total:
                return kind
        return MIX[-1][0]

    @defer.inlineCallbacks
    def _transfer(self, index: int):
        payer = self.payers[index % len(self.payers)]
        payee = self.payees[self.rng.randrange(len(self.payees))]
        request = payer.transfer_request(payee.state.number, TRANSFER_AMOUNT_MINOR)
        for attempt in range(TRANSFER_RESENDS + 1):
            try:
                response = yield payer.endpoint.send_request(request, payer.ps_addr)
            except SIPTimeout:
                request = payer.resend(request)
                continue
            if response.status == 503 and attempt < TRANSFER_RESENDS:   # overloaded: later
                yield self._retry_after(response)
                request = payer.resend(request)
                continue
            if response.status in (200, 202):
                receipt = payer.verified_receipt(response, payee.state.number,
                                                 TRANSFER_AMOUNT_MINOR)
                self.outcomes.transfer_journal_ids.append(receipt.journal_id)
                self.outcomes.note("transfer", "succeeded")
            else:
                self.outcomes.note("transfer", "refused", f"{response.status} {response.reason}")
            return
        self.outcomes.note("transfer", "timed out")

    def _retry_after(self, response: Any) -> defer.Deferred:
        """Wait as a 503's Retry-After asks (within RETRY_AFTER_MAX_S), jittered."""
        try:
            wait = min(float(response.headers.get("Retry-After") or 1), RETRY_AFTER_MAX_S)
        except ValueError:
            wait = 1.0
        return task.deferLater(self.reactor, wait * self.rng.uniform(0.5, 1.0), lambda: None)

    @defer.inlineCallbacks
    def _overloaded(self, call, *args, **kwargs):
        """*call* (a new request each time), again after each 503, RETRIES_ON_503 times."""
        for attempt in range(RETRIES_ON_503 + 1):
            try:
                response = yield call(*args, **kwargs)
            except DeviceError as exc:
                if " 503 " not in f" {exc} " or attempt == RETRIES_ON_503:
                    raise
                yield task.deferLater(self.reactor, self.rng.uniform(0.5, 1.0), lambda: None)
                continue
            if getattr(response, "status", None) != 503 or attempt == RETRIES_ON_503:
                return response
            yield self._retry_after(response)

    def _consumer(self, index: int, sessions: bool) -> Device:
        """Consumers with timed sessions have all their money held by them (by design), so
        event charges go to the other half of the consumers."""
        group = self.consumers[1::2] if sessions else self.consumers[0::2]
        return (group or self.consumers)[index % len(group or self.consumers)]

    @defer.inlineCallbacks
    def _otcn_charge(self, index: int):
        consumer = self._consumer(index, sessions=False)
        merchant = self.merchants[self.rng.randrange(len(self.merchants))]
        try:
            grant = yield self._overloaded(consumer.request_otcn)
            response = yield self._overloaded(merchant.charge, grant["otcn"], CHARGE_AMOUNT_MINOR)
        except SIPTimeout:
            self.outcomes.note("otcn_charge", "timed out")
            return
        except DeviceError as exc:
            self.outcomes.note("otcn_charge", "refused", str(exc))
            return
        if response.status == 200:
            self.outcomes.note("otcn_charge", "succeeded")
        else:
            self.outcomes.note("otcn_charge", "refused", f"{response.status} {response.reason}")

    @defer.inlineCallbacks
    def _session(self, index: int):
        consumer = self._consumer(index, sessions=True)
        merchant = self.merchants[self.rng.randrange(len(self.merchants))]
        try:
            response = yield self._overloaded(merchant.charge, consumer.state.number,
                                              rate=SESSION_RATE_MINOR_PER_S)
        except SIPTimeout:
            self.outcomes.note("session", "timed out")
            return
        if response.status != 200:
            self.outcomes.note("session", "refused", f"{response.status} {response.reason}")
            return
        yield task.deferLater(self.reactor, self.rng.uniform(*SESSION_RUN_S), lambda: None)
        if response.call_id not in merchant.sessions:   # the PS ended it first (no ACK seen)
            self.outcomes.note("session", "succeeded")
            return
        try:
            end = yield merchant.end_session(response.call_id)
        except (SIPTimeout, DeviceError):
            self.outcomes.note("session", "timed out")
            return
        self.outcomes.sessions_charged += end.get("charged") or 0
        self.outcomes.note("session", "succeeded")


@defer.inlineCallbacks
def check_books(ledger: Any, outcomes: Outcomes):
    """Problems found in the ledger after a run (empty: the books are right).

    The audit must pass; each journal id a device got a verified receipt for
    must be in the journal, once; and no idempotency key is in the journal
    twice (the UNIQUE constraint's promise, checked, not assumed).
    """
    problems = []
    report = yield ledger.audit()
    if not report.ok:
        problems.append(report.format())
    entries = {}
    after = 0
    while True:   # the whole journal, page by page (a statement is capped per account)
        page = yield ledger.journal_page(after, JOURNAL_PAGE_ROWS)
        if not page:
            break
        entries.update((entry.id, entry) for entry in page)
        after = page[-1].id
    keys = Counter(entry.idempotency_key for entry in entries.values())
    twice = [key for key, count in keys.items() if count > 1]
    if twice:
        problems.append(f"{len(twice)} idempotency keys applied twice, e.g. {twice[0]}")
    missing = [journal_id for journal_id in outcomes.transfer_journal_ids
               if journal_id not in entries]
    if missing:
        problems.append(f"{len(missing)} confirmed transfers not in the journal, e.g. {missing[0]}")
    confirmed = set(outcomes.transfer_journal_ids)   # re-sends of one transfer share a row
    transfers = sum(1 for entry in entries.values() if entry.kind == "transfer")
    if transfers < len(confirmed):
        problems.append(f"{transfers} transfer rows for {len(confirmed)} confirmed transfers")
    return problems

"""The PS side of charged-by-time sessions: Timer C, checkpoints, settlement, BYE.

:class:`SessionKeeper` is the glue between the sans-IO pieces (the Fig 4-4
machine of each session, :class:`~mpay.payment.charged_by_time.ConsumerSessions`
of each consumer) and the world: the ledger (open, checkpoint, settle,
recover), one Timer C per consumer on the time wheel, and in-dialog BYEs.
``ChargeService`` hands it the effects of timed sessions.

After a crash the ledger still has every open session with its dialogs; at
start the keeper settles them at their last checkpoint (``recover``) and
sends BYE to both sides, with a ``Reason`` (RFC 3326) saying why.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet import defer
from twisted.logger import Logger

from mpay.ledger.api import Outcome
from mpay.payment import receipt as receipts
from mpay.payment.charged_by_time import ConsumerSessions
from mpay.sip.dialog import Dialog
from mpay.timewheel import MAX_DELAY_S

if TYPE_CHECKING:
    from mpay.payment.receive import _Live

SESSION_END_CONTENT_TYPE = "application/vnd.mpay.session-end+json"
CHECKPOINT_S = 5.0            # how often what each session owes is written to the ledger
ENDED_MEMORY_S = 32.0         # 64 x T1: a BYE that crossed ours still gets its 200 and receipt
TIMER_C_SLACK_S = 1e-3        # Timer C firing this close to exhaustion counts as exhaustion
ANONYMOUS = "anonymous"

REASON_EXHAUSTED = 'SIP ;cause=402 ;text="Credit Exhausted"'
REASON_NO_ACK = 'SIP ;cause=408 ;text="Merchant Did Not Acknowledge"'
REASON_RESTART = 'SIP ;cause=503 ;text="Payment Server Restarted"'
REASON_REFUSED = 'SIP ;cause=402 ;text="Session Refused By The Ledger"'


class SessionKeeper:
    log = Logger()

    def __init__(self, *, ledger: Any, timers: Any, clock: Callable[[], float], ps_key: Any,
                 currency: str, owner: str, checkpoint_s: float = CHECKPOINT_S):
        self.ledger = ledger
        self.timers = timers
        self.clock = clock
        self.ps_key = ps_key
        self.currency = currency
        self.owner = owner
        self.checkpoint_s = checkpoint_s
        self.endpoint: Any = None
        self.consumers: dict[str, ConsumerSessions] = {}
        self.members: dict[str, dict[str, _Live]] = {}     # consumer -> key -> session
        self._timer_c: dict[str, Any] = {}
        self._checkpointing: Any = None
        self.ended: dict[str, tuple[list, bytes]] = {}     # Call-ID -> 200's headers and body
        self.stats = {"opened": 0, "settled": 0, "exhausted": 0, "recovered": 0, "checkpoints": 0}

    # -- life cycle ------------------------------------------------------------
    def start(self) -> None:
        self._checkpointing = self.timers.start(self.checkpoint_s, self._checkpoint)

    def stop(self) -> None:
        for handle in [self._checkpointing, *self._timer_c.values()]:
            if handle is not None:
                handle.cancel()
        self._timer_c.clear()
        self._checkpointing = None

    # -- opening ---------------------------------------------------------------
    def open(self, live: _Live) -> defer.Deferred:
        """OpenSession: the ledger holds the consumer's money; fires with the SessionResult."""
        charge = live.charge
        live.merchant_dialog = Dialog.as_uas(live.request, live.txn.to_tag, live.txn.addr)
        live.consumer_dialog = Dialog.as_uac(live.forwarded, live.accepted, live.consumer_addr)
        dialog = json.dumps({"merchant": live.merchant_dialog.to_json(),
                             "consumer": live.consumer_dialog.to_json(),
                             "anonymous": charge.anonymous, "digest": live.digest})
        opened = self.ledger.open_session(charge.consumer, charge.merchant, charge.rate,
                                          f"{charge.merchant}|{live.key}", self.owner, dialog)

        def answered(result):
            if result.ok:
                live.session_id = result.session_id
                self.consumers.setdefault(charge.consumer, ConsumerSessions(charge.consumer))
                self.members.setdefault(charge.consumer, {})[live.key] = live
                self._unspent(charge.consumer, result.unspent)
                self.stats["opened"] += 1
            return result

        return opened.addCallback(answered)

    def started(self, live: _Live) -> None:
        """SessionStarted (the merchant's ACK): the clock runs; Timer C moves for all."""
        consumer = live.charge.consumer
        self.consumers[consumer].start(live.key, live.charge.rate, self.clock())
        self._arm(consumer)

    def _unspent(self, consumer: str, unspent: int) -> None:
        sessions = self.consumers.get(consumer)
        if sessions is not None:
            sessions.unspent = unspent
            self._arm(consumer)

    # -- Timer C -----------------------------------------------------------------
    def _arm(self, consumer: str) -> None:
        handle = self._timer_c.pop(consumer, None)
        if handle is not None:
            handle.cancel()
        sessions = self.consumers.get(consumer)
        delay = sessions.exhaustion_delay_s(self.clock()) if sessions is not None else None
        if delay is not None:
            self._timer_c[consumer] = self.timers.start(min(delay, MAX_DELAY_S), self._fire_c,
                                                        consumer)

    def _fire_c(self, consumer: str) -> None:
        self._timer_c.pop(consumer, None)
        sessions = self.consumers.get(consumer)
        if sessions is None:
            return
        now = self.clock()
        delay = sessions.exhaustion_delay_s(now)
        if delay is None:
            return
        if delay > TIMER_C_SLACK_S:  # the unspent amount grew, or the delay was clamped
            self._arm(consumer)
            return
        charges = sessions.exhaust(now)
        self.stats["exhausted"] += len(charges)
        members = self.members.get(consumer, {})
        for key, amount in charges.items():
            live = members.get(key)
            if live is not None:
                live.exhausted_charge = amount
                live.fire("C")

    # -- settling ----------------------------------------------------------------
    def settle(self, live: _Live, exhausted: bool) -> defer.Deferred:
        """Settle: the session's charge moves (once); fires with the SessionResult or None."""
        consumer = live.charge.consumer
        sessions = self.consumers.get(consumer)
        if exhausted:
            amount = live.exhausted_charge
        else:
            amount = sessions.end(live.key, self.clock()) if sessions is not None else 0
        if live.session_id is None:   # refused or never opened: nothing to settle
            return defer.succeed(None)
        settled = self.ledger.settle_session(live.session_id, amount)

        def answered(result):
            if result.outcome is Outcome.INVALID and result.unspent < amount:
                # Our unspent figure was ahead of the ledger's: take what there is.
                return self.ledger.settle_session(live.session_id, result.unspent).addCallback(answered)
            self._left(live, result.unspent if result.ok else None)
            if result.ok:
                self.stats["settled"] += 1
                self._receipts(live, result)
            else:
                self.log.error("ps: session {session} not settled: {detail}",
                               session=live.session_id, detail=result.detail)
            return result

        def failed(failure):
            self._left(live, None)
            self.log.failure("ps: session {session} not settled (the ledger will on restart)",
                             failure, session=live.session_id)
            return None

        return settled.addCallbacks(answered, failed)

    def _left(self, live: _Live, unspent: int | None) -> None:
        """A session is over: the consumer's others get a new Timer C (or the entry goes)."""
        consumer = live.charge.consumer
        members = self.members.get(consumer, {})
        members.pop(live.key, None)
        if not members:
            self.members.pop(consumer, None)
            self.consumers.pop(consumer, None)
            handle = self._timer_c.pop(consumer, None)
            if handle is not None:
                handle.cancel()
        elif unspent is not None:
            self._unspent(consumer, unspent)
        else:
            self._arm(consumer)

    def _receipts(self, live: _Live, result: Any) -> None:
        live.charged = result.charged
        if not result.charged:
            return
        charge = live.charge
        for side, payer in (("merchant", ANONYMOUS if charge.anonymous else charge.consumer),
                            ("consumer", charge.consumer)):
            receipt = receipts.Receipt(result.journal_id, payer, charge.merchant, result.charged,
                                       self.currency, result.created or 0.0, live.digest)
            live.receipts[side] = receipts.sign_receipt(self.ps_key, receipt)

    # -- BYE ---------------------------------------------------------------------
    def end_message(self, live: _Live, side: str) -> tuple[list, bytes]:
        """Headers and body telling *side* what the session cost."""
        headers = [("Content-Type", SESSION_END_CONTENT_TYPE)]
        if side in live.receipts:
            headers.append((receipts.RECEIPT_HEADER, live.receipts[side]))
        body = json.dumps({"charged": live.charged, "currency": self.currency}).encode()
        return headers, body

    def bye(self, dialog: Dialog, headers: list, body: bytes, reason: str | None = None) -> None:
        """A BYE of ours on *dialog*; its answer only matters to the log."""
        extra = [h for h in headers if h[0] != "Content-Type"]
        if reason:
            extra.append(("Reason", reason))
        request = dialog.request("BYE", self.endpoint.sent_by, branch=self.endpoint.new_branch(),
                                 headers=extra, body=body,
                                 content_type=SESSION_END_CONTENT_TYPE)
        self.endpoint.send_request(request, dialog.peer).addErrback(
            lambda failure: self.log.info("ps: BYE to {peer} unanswered: {why}",
                                          peer=dialog.peer, why=failure.getErrorMessage()))

    def remember_end(self, live: _Live) -> None:
        """A BYE that crossed ours, or a retransmission after we forgot, gets the same 200."""
        for side, dialog in (("merchant", live.merchant_dialog), ("consumer", live.consumer_dialog)):
            if dialog is not None:
                self.ended[dialog.call_id] = self.end_message(live, side)
                self.timers.start(ENDED_MEMORY_S, self.ended.pop, dialog.call_id, None)

    # -- checkpoints and restart -------------------------------------------------------
    def _checkpoint(self) -> None:
        self._checkpointing = self.timers.start(self.checkpoint_s, self._checkpoint)
        now, owed = self.clock(), []
        for consumer, sessions in self.consumers.items():
            members = self.members.get(consumer, {})
            for key, amount in sessions.checkpoint(now).items():
                live = members.get(key)
                if live is not None and live.session_id is not None:
                    owed.append((live.session_id, amount))
        if owed:
            self.stats["checkpoints"] += 1
            self.ledger.checkpoint_sessions(owed).addErrback(
                lambda failure: self.log.failure("ps: session checkpoint failed", failure))

    @defer.inlineCallbacks
    def recover(self, adopted: tuple[str, ...] = ()):
        """At start: settle this PS's sessions left open by a crash, BYE both sides; also
        those of the *adopted* instances, which will not come back (``[ps] adopt_sessions``)."""
        recovered = []
        for owner in (self.owner, *adopted):
            recovered += (yield self.ledger.recover_sessions(owner))
        for session, result in recovered:
            try:
                dialog = json.loads(session.dialog)
                legs = {side: Dialog.from_json(dialog[side]) for side in ("merchant", "consumer")}
            except (ValueError, KeyError, TypeError):
                self.log.error("ps: session {id} settled, but its dialog is unreadable: no BYE",
                               id=session.id)
                continue
            for side, leg in legs.items():
                headers = [("Content-Type", SESSION_END_CONTENT_TYPE)]
                if result.ok and result.charged:
                    payer = ANONYMOUS if side == "merchant" and dialog.get("anonymous") \
                        else session.consumer
                    receipt = receipts.Receipt(result.journal_id, payer, session.merchant,
                                               result.charged, self.currency, result.created or 0.0,
                                               dialog.get("digest", ""))
                    headers.append((receipts.RECEIPT_HEADER, receipts.sign_receipt(self.ps_key, receipt)))
                body = json.dumps({"charged": result.charged, "currency": self.currency}).encode()
                self.bye(leg, headers, body, REASON_RESTART)
        self.stats["recovered"] += len(recovered)
        if recovered:
            self.log.info("ps: settled {count} sessions left open at the last stop",
                          count=len(recovered))
        return len(recovered)


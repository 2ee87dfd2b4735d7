"""RECEIVE at the PS: a merchant charges a consumer (DESIGN section 7, event charging).

The merchant's RECEIVE names the consumer by number or by OTCN; the PS
resolves it, forwards a RECEIVE of its own to the consumer's device (the PS
is a back-to-back user agent here, so the merchant never learns the
consumer's address or number) and carries out the effects of the Fig 4-4
machine in :mod:`mpay.payment.charging`.  A ``rate`` instead of an
``amount`` makes it a session charged by time: the dialogs then live on
until a BYE from either side or Timer C, whose money side is
:class:`mpay.payment.sessions.SessionKeeper`.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger

from mpay import e164
from mpay.auth.crypto import encode_b64
from mpay.auth.wire import digest_of
from mpay.ledger.api import MAX_AMOUNT_MINOR
from mpay.payment import charging as fsm
from mpay.payment import receipt as receipts
from mpay.payment.body import json_body
from mpay.payment.otcn import InvalidOTCN, otcn_in_user
from mpay.payment.sessions import (
    REASON_EXHAUSTED, REASON_NO_ACK, REASON_REFUSED, SessionKeeper,
)
from mpay.payment.transfer import ANONYMOUS, ANONYMOUS_URI, REFUSALS
from mpay.sip.dialog import Dialog
from mpay.sip.endpoint import SIPTimeout
from mpay.sip.stream import address_of
from mpay.sip.uri import parse_uri
from mpay.sip.message import Request
from mpay.sip.transaction import ServerTransaction
from mpay.sip.useragent import build_request, new_call_id

CHARGE_CONTENT_TYPE = "application/vnd.mpay.charge+json"
MAX_CHARGE_BODY_BYTES = 1024
ACK_WAIT_S = 32.0        # 64 x T1: the merchant's ACK of our 200 is late past this


class _Live:
    """One charge in progress: the machine and the SIP state its effects need."""

    def __init__(self, service: "ChargeService", charge: fsm.ChargeRequest, txn: ServerTransaction,
                 request: Request, consumer_addr: tuple[str, int]):
        self.service = service
        self.charge = charge
        self.txn = txn
        self.request = request
        self.key = request.call_id            # the merchant's dialog names the charge
        self.digest = encode_b64(digest_of(request))
        self.consumer_addr = consumer_addr
        self.forwarded: Request | None = None
        self.accepted = None          # the consumer's 2xx, whose To tag the ACK needs
        self.timers: dict[str, Any] = {}
        self.receipt: receipts.Receipt | None = None
        # Charged by time only:
        self.session_id: int | None = None
        self.merchant_dialog = self.consumer_dialog = None
        self.exhausted_charge = 0
        self.charged = 0
        self.receipts: dict[str, str] = {}     # side -> signed receipt of the session's charge
        self.settlement: defer.Deferred | None = None
        self.bye_txn: ServerTransaction | None = None

    def fire(self, name: str) -> None:
        self.timers.pop(name, None)
        self.service._run(self, self.charge.timer(name))


class ChargeService:
    log = Logger()

    def __init__(self, *, authenticate: Callable, ledger: Any, locations: Any, otcns: Any,
                 guard: Any, ps_key: Any, currency: str, domain: str, timers: Any,
                 clock: Callable[[], float], timer_a_s: float = fsm.CHARGE_TIMER_A_S,
                 owner: str = "ps", checkpoint_s: float = 5.0):
        self.authenticate = authenticate
        self.ledger = ledger
        self.locations = locations
        self.otcns = otcns
        self.guard = guard
        self.ps_key = ps_key
        self.currency = currency
        self.domain = domain
        self.timers = timers
        self.timer_a_s = timer_a_s
        self._endpoint: Any = None
        self.live: dict[str, _Live] = {}          # by the merchant's Call-ID
        self.by_consumer_call: dict[str, _Live] = {}  # timed sessions, by the consumer's Call-ID
        self.outcomes: dict[str, int] = {}
        self.sessions = SessionKeeper(ledger=ledger, timers=timers, clock=clock, ps_key=ps_key,
                                      currency=currency, owner=owner, checkpoint_s=checkpoint_s)

    @property
    def endpoint(self) -> Any:
        return self._endpoint

    @endpoint.setter
    def endpoint(self, endpoint: Any) -> None:
        self._endpoint = self.sessions.endpoint = endpoint

    def __call__(self, txn: ServerTransaction, request: Request) -> None:
        self.authenticate(txn, request, lambda verified: self._authenticated(txn, request, verified))

    def _authenticated(self, txn: ServerTransaction, request: Request, verified: Any) -> None:
        def failed(failure):
            self.log.failure("ps: charge failed", failure)
            if not txn.final:
                txn.respond_with(503, "Service Unavailable", headers=[("Retry-After", "5")])

        self._start(txn, request, verified.number).addErrback(failed)

    def _refuse(self, txn: ServerTransaction, status: int, reason: str) -> None:
        self.outcomes[reason] = self.outcomes.get(reason, 0) + 1
        txn.respond_with(status, reason)

    @defer.inlineCallbacks
    def _start(self, txn: ServerTransaction, request: Request, merchant: str):
        if (yield self.guard.is_blocked(merchant)):
            return self._refuse(txn, 403, "Too Many Unknown OTCNs")
        try:
            amount, rate = self._read(request)
        except ValueError as exc:
            return self._refuse(txn, 400, str(exc))
        try:
            user = parse_uri(request.uri).user or ""
            otcn = otcn_in_user(user)
            consumer = e164.normalise(user, "ZZ") if otcn is None else None
        except (InvalidOTCN, e164.InvalidNumber, ValueError):
            otcn, consumer = "", None
        if consumer is None:
            grant = (yield self.otcns.consume(otcn)) if otcn else None
            if grant is None:
                blocked = yield self.guard.failure(merchant)
                return self._refuse(txn, 403, "Too Many Unknown OTCNs") if blocked else \
                    self._refuse(txn, 404, "Unknown OTCN")
            if grant.cap is not None and rate is not None:
                return self._refuse(txn, 403, "Capped OTCN Is For Fixed Amounts")
            if grant.cap is not None and amount > grant.cap:
                return self._refuse(txn, 403, "Amount Over OTCN Cap")
            consumer = grant.consumer
        if consumer == merchant:
            return self._refuse(txn, 400, "Merchant Is Consumer")
        binding = yield self.locations.lookup(consumer)
        if binding is None:
            return self._refuse(txn, 404, "Consumer Not Reachable")
        charge = fsm.ChargeRequest(merchant, consumer, amount=amount, rate=rate,
                                   anonymous=otcn is not None, timer_a_s=self.timer_a_s)
        live = _Live(self, charge, txn, request, address_of(binding))
        self.live[request.call_id] = live
        self._forward(live)
        self._run(live, charge.start())

    @staticmethod
    def _read(request: Request) -> tuple[int | None, int | None]:
        body = json_body(request, CHARGE_CONTENT_TYPE, MAX_CHARGE_BODY_BYTES, "Charge")
        amount, rate = body.get("amount"), body.get("rate")
        for value in (amount, rate):
            if value is not None and (type(value) is not int or not 0 < value <= MAX_AMOUNT_MINOR):
                raise ValueError("Invalid Amount")
        if (amount is None) == (rate is None):
            raise ValueError("Amount Or Rate Required")
        return amount, rate

    # -- towards the consumer --------------------------------------------------
    def _forward(self, live: _Live) -> None:
        charge = live.charge
        host, port = self.endpoint.sent_by
        addr = live.consumer_addr
        asked = {"merchant": charge.merchant, "currency": self.currency}
        asked.update({"rate": charge.rate} if charge.timed else {"amount": charge.amount})
        body = json.dumps(asked).encode()
        request = build_request("RECEIVE", f"sip:{charge.consumer}@{addr[0]}:{addr[1]}",
                                sent_by=(host, port), from_uri=e164.sip_uri(charge.merchant, self.domain),
                                to_uri=e164.sip_uri(charge.consumer, self.domain),
                                call_id=new_call_id(host), cseq=1, contact=f"sip:ps@{host}:{port}",
                                body=body, content_type=CHARGE_CONTENT_TYPE,
                                branch=self.endpoint.new_branch(), from_tag=self.endpoint.new_tag())
        live.forwarded = request

        def provisional(response):
            self._run(live, charge.consumer_answered(response.status, response.reason))

        def final(response):
            if 200 <= response.status < 300:
                live.accepted = response
            self._run(live, charge.consumer_answered(response.status, response.reason))

        def unreachable(failure):
            failure.trap(SIPTimeout)
            self._run(live, charge.timer("A"))

        self.endpoint.send_request(request, addr, provisional).addCallbacks(final, unreachable)

    def _in_dialog(self, live: _Live, method: str, branch: str | None = None) -> Request:
        """ACK or CANCEL for the forwarded RECEIVE (RFC 3261 9.1, 13.2.2.4)."""
        forwarded = live.forwarded
        to_tag = live.accepted.to_addr.tag if (method == "ACK" and live.accepted) else None
        return build_request(method, forwarded.uri, sent_by=self.endpoint.sent_by,
                             from_uri=forwarded.from_addr.uri, to_uri=forwarded.to_addr.uri,
                             call_id=forwarded.call_id, cseq=forwarded.cseq[0],
                             from_tag=forwarded.from_addr.tag, to_tag=to_tag, branch=branch)

    # -- effects -----------------------------------------------------------------
    def _run(self, live: _Live, effects: list) -> None:
        for effect in effects:
            kind = type(effect)
            if kind is fsm.ToMerchant:
                self._to_merchant(live, effect)
            elif kind is fsm.StartTimer:
                live.timers[effect.name] = self.timers.start(effect.delay_s, live.fire, effect.name)
            elif kind is fsm.CancelTimer:
                handle = live.timers.pop(effect.name, None)
                if handle is not None:
                    handle.cancel()
            elif kind is fsm.Charge:
                self._charge(live, effect.amount)
            elif kind is fsm.OpenSession:
                self._open_session(live)
            elif kind is fsm.CancelConsumer:
                cancel = self._in_dialog(live, "CANCEL", branch=live.forwarded.top_via.branch)
                self.endpoint.send_request(cancel, live.consumer_addr).addErrback(lambda f: None)
            elif kind is fsm.RelayAck:
                self._ack_consumer(live)
            elif kind is fsm.SessionStarted:
                self.sessions.started(live)
            elif kind is fsm.Settle:
                live.settlement = self.sessions.settle(live, effect.exhausted)
            elif kind is fsm.ForwardBye:
                live.settlement.addCallback(self._forward_bye, live, effect.to)
            elif kind is fsm.ByeBoth:
                reason = REASON_EXHAUSTED if live.charge.outcome == "exhausted" else REASON_NO_ACK
                live.settlement.addCallback(self._bye_both, live, reason)
            elif kind is fsm.Done:
                self._done(live, effect.outcome)

    def _ack_consumer(self, live: _Live) -> None:
        ack = self._in_dialog(live, "ACK", branch=self.endpoint.new_branch())
        self.endpoint.send(ack.to_bytes(), live.consumer_addr)

    def _to_merchant(self, live: _Live, effect: fsm.ToMerchant) -> None:
        if live.txn.final:
            return
        headers = []
        if effect.status == 200 and live.receipt is not None:
            headers.append((receipts.RECEIPT_HEADER, receipts.sign_receipt(self.ps_key, live.receipt)))
        if effect.status == 200 and live.charge.anonymous:
            # The merchant sees that it was paid, never by whom (RFC 3323).
            headers.append(("P-Asserted-Identity", f"<{ANONYMOUS_URI}>"))
        if effect.status == 200 and live.charge.timed:
            host, port = self.endpoint.sent_by
            headers.append(("Contact", f"<sip:ps@{host}:{port}>"))
        live.txn.respond_with(effect.status, effect.reason, headers=headers)
        if effect.status == 200:
            # Money moved or a session is open: past 64 x T1 without an ACK, the machine decides.
            live.timers["ACK"] = self.timers.start(ACK_WAIT_S, live.fire, "ACK")
        elif live.accepted is not None:
            self._ack_consumer(live)  # the consumer said yes, the ledger no: close its dialog
            if live.charge.timed:
                self._bye_consumer_refused(live)

    def _charge(self, live: _Live, amount: int) -> None:
        charge = live.charge
        key = f"{charge.merchant}|{live.request.call_id}|{live.request.cseq[0]}"
        moved = self.ledger.transfer(charge.consumer, charge.merchant, amount, key, "charge",
                                     reference=live.request.call_id)

        def answered(result):
            if result.ok:
                payer = ANONYMOUS if charge.anonymous else charge.consumer
                live.receipt = receipts.Receipt(result.journal_id, payer, charge.merchant, amount,
                                                self.currency, result.created or 0.0,
                                                live.digest)
                self._run(live, charge.charged(True))
            else:
                status, reason = REFUSALS.get(result.outcome, (400, result.detail or "Invalid Charge"))
                self._run(live, charge.charged(False, status, reason))

        def failed(failure):
            self.log.failure("ps: charge not committed", failure)
            self._run(live, charge.charged(False, 503, "Ledger Unavailable"))

        moved.addCallbacks(answered, failed)

    # -- charged by time -----------------------------------------------------------
    def _open_session(self, live: _Live) -> None:
        charge = live.charge

        def answered(result):
            if result.ok:
                self.by_consumer_call[live.forwarded.call_id] = live
                self._run(live, charge.charged(True))
            else:
                status, reason = REFUSALS.get(result.outcome, (400, result.detail or "Invalid Session"))
                self._run(live, charge.charged(False, status, reason))

        def failed(failure):
            self.log.failure("ps: session not opened", failure)
            self._run(live, charge.charged(False, 503, "Ledger Unavailable"))

        self.sessions.open(live).addCallbacks(answered, failed)

    def _bye_consumer_refused(self, live: _Live) -> None:
        dialog = Dialog.as_uac(live.forwarded, live.accepted, live.consumer_addr)
        self.sessions.bye(dialog, [], b"", REASON_REFUSED)

    def _forward_bye(self, _result: Any, live: _Live, to: str) -> None:
        """After settling: the BYE's sender gets 200 with its receipt, the other side a BYE."""
        sender = "merchant" if to == "consumer" else "consumer"
        if live.bye_txn is not None and not live.bye_txn.final:
            headers, body = self.sessions.end_message(live, sender)
            live.bye_txn.respond_with(200, headers=headers, body=body)
        self._bye_to(live, to)
        self.sessions.remember_end(live)

    def _bye_both(self, _result: Any, live: _Live, reason: str) -> None:
        for side in ("merchant", "consumer"):
            self._bye_to(live, side, reason)
        self.sessions.remember_end(live)

    def _bye_to(self, live: _Live, side: str, reason: str | None = None) -> None:
        dialog = live.merchant_dialog if side == "merchant" else live.consumer_dialog
        if dialog is None:
            return
        headers, body = self.sessions.end_message(live, side)
        self.sessions.bye(dialog, headers, body, reason)

    def bye(self, txn: ServerTransaction, request: Request) -> None:
        """BYE from the merchant or the consumer of a timed session."""
        self.authenticate(txn, request, lambda verified: self._bye(txn, request, verified))

    def _bye(self, txn: ServerTransaction, request: Request, verified: Any) -> None:
        live = self.live.get(request.call_id)
        side = "merchant"
        if live is None:
            live, side = self.by_consumer_call.get(request.call_id), "consumer"
        if live is None or not live.charge.timed:
            ended = self.sessions.ended.get(request.call_id)
            if ended is not None:   # crossed ours, or re-sent after the end: the same answer
                headers, body = ended
                txn.respond_with(200, headers=headers, body=body)
            else:
                txn.respond_with(481, "No Such Session")
            return
        party = live.charge.merchant if side == "merchant" else live.charge.consumer
        if verified.number != party:
            txn.respond_with(403, "Not A Party To This Session")
            return
        effects = live.charge.bye(side)
        if not effects:
            txn.respond_with(481, "No Such Session")
            return
        live.bye_txn = txn
        self._run(live, effects)

    def start(self) -> None:
        self.sessions.start()

    def stop(self) -> None:
        self.sessions.stop()

    def _done(self, live: _Live, outcome: str) -> None:
        self._forget(live)
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def _forget(self, live: _Live) -> None:
        for handle in live.timers.values():
            handle.cancel()
        live.timers.clear()
        if self.live.get(live.key) is live:
            del self.live[live.key]
        if live.forwarded is not None and self.by_consumer_call.get(live.forwarded.call_id) is live:
            del self.by_consumer_call[live.forwarded.call_id]

    def ack_received(self, request: Request) -> None:
        """The merchant's ACK of our 200: relayed to the consumer."""
        live = self.live.get(request.call_id)
        if live is not None:
            handle = live.timers.pop("ACK", None)
            if handle is not None:
                handle.cancel()
            self._run(live, live.charge.merchant_ack())

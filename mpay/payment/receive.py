"""RECEIVE at the PS: a merchant charges a consumer (DESIGN section 7, event charging).

The merchant's RECEIVE names the consumer by number or by OTCN; the PS
resolves it, forwards a RECEIVE of its own to the consumer's device (the PS
is a back-to-back user agent here, so the merchant never learns the
consumer's address or number) and carries out the effects of the Fig 4-4
machine in :mod:`mpay.payment.charging`.  Charged-by-time sessions (a
``rate``) are refused with 501 until their holds and restart settlement
land.
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
from mpay.payment.transfer import ANONYMOUS, ANONYMOUS_URI, REFUSALS
from mpay.sip.endpoint import SIPTimeout
from mpay.sip.uri import parse_uri
from mpay.sip.message import Request
from mpay.sip.transaction import ServerTransaction
from mpay.sip.useragent import build_request, new_branch, new_call_id

CHARGE_CONTENT_TYPE = "application/vnd.mpay.charge+json"
MAX_CHARGE_BODY_BYTES = 1024
ACK_WAIT_S = 32.0        # 64 x T1: the merchant's ACK of our 200 is late past this


class _Live:
    """One charge in progress: the machine and the SIP state its effects need."""

    def __init__(self, charge: fsm.ChargeRequest, txn: ServerTransaction, request: Request,
                 consumer_addr: tuple[str, int]):
        self.charge = charge
        self.txn = txn
        self.request = request
        self.consumer_addr = consumer_addr
        self.forwarded: Request | None = None
        self.accepted = None          # the consumer's 2xx, whose To tag the ACK needs
        self.timers: dict[str, Any] = {}
        self.receipt: receipts.Receipt | None = None


class ChargeService:
    log = Logger()

    def __init__(self, *, authenticate: Callable, ledger: Any, locations: Any, otcns: Any,
                 guard: Any, ps_key: Any, currency: str, domain: str, timers: Any,
                 timer_a_s: float = fsm.CHARGE_TIMER_A_S):
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
        self.endpoint: Any = None
        self.live: dict[str, _Live] = {}          # by the merchant's Call-ID
        self.outcomes: dict[str, int] = {}

    def __call__(self, txn: ServerTransaction, request: Request) -> None:
        verified = self.authenticate(txn, request)
        if verified is None:
            return

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
        if rate is not None:
            return self._refuse(txn, 501, "Charged By Time Not Yet Available")
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
            if grant.cap is not None and amount > grant.cap:
                return self._refuse(txn, 403, "Amount Over OTCN Cap")
            consumer = grant.consumer
        if consumer == merchant:
            return self._refuse(txn, 400, "Merchant Is Consumer")
        binding = yield self.locations.lookup(consumer)
        if binding is None:
            return self._refuse(txn, 404, "Consumer Not Reachable")
        charge = fsm.ChargeRequest(merchant, consumer, amount=amount, anonymous=otcn is not None,
                                   timer_a_s=self.timer_a_s)
        live = _Live(charge, txn, request, (binding.host, binding.port))
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
        body = json.dumps({"merchant": charge.merchant, "amount": charge.amount,
                           "currency": self.currency}).encode()
        request = build_request("RECEIVE", f"sip:{charge.consumer}@{addr[0]}:{addr[1]}",
                                sent_by=(host, port), from_uri=e164.sip_uri(charge.merchant, self.domain),
                                to_uri=e164.sip_uri(charge.consumer, self.domain),
                                call_id=new_call_id(host), cseq=1, contact=f"sip:ps@{host}:{port}",
                                body=body, content_type=CHARGE_CONTENT_TYPE)
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
                live.timers[effect.name] = self.timers.start(effect.delay_s, self._fire, live, effect.name)
            elif kind is fsm.CancelTimer:
                handle = live.timers.pop(effect.name, None)
                if handle is not None:
                    handle.cancel()
            elif kind is fsm.Charge:
                self._charge(live, effect.amount)
            elif kind is fsm.CancelConsumer:
                cancel = self._in_dialog(live, "CANCEL", branch=live.forwarded.top_via.branch)
                self.endpoint.send_request(cancel, live.consumer_addr).addErrback(lambda f: None)
            elif kind is fsm.RelayAck:
                ack = self._in_dialog(live, "ACK", branch=new_branch())
                self.endpoint.send(ack.to_bytes(), live.consumer_addr)
            elif kind is fsm.Done:
                self._done(live, effect.outcome)

    def _fire(self, live: _Live, name: str) -> None:
        live.timers.pop(name, None)
        self._run(live, live.charge.timer(name))

    def _to_merchant(self, live: _Live, effect: fsm.ToMerchant) -> None:
        if live.txn.final:
            return
        headers = []
        if effect.status == 200 and live.receipt is not None:
            headers.append((receipts.RECEIPT_HEADER, receipts.sign_receipt(self.ps_key, live.receipt)))
        if effect.status == 200 and live.charge.anonymous:
            # The merchant sees that it was paid, never by whom (RFC 3323).
            headers.append(("P-Asserted-Identity", f"<{ANONYMOUS_URI}>"))
        live.txn.respond_with(effect.status, effect.reason, headers=headers)
        if effect.status == 200:
            # The money moved; only the ACK relay is left.  Without an ACK, forget it at 64 x T1.
            live.timers["ACK"] = self.timers.start(ACK_WAIT_S, self._forget, live)

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
                                                encode_b64(digest_of(live.request)))
                self._run(live, charge.charged(True))
            else:
                status, reason = REFUSALS.get(result.outcome, (400, result.detail or "Invalid Charge"))
                self._run(live, charge.charged(False, status, reason))

        def failed(failure):
            self.log.failure("ps: charge not committed", failure)
            self._run(live, charge.charged(False, 503, "Ledger Unavailable"))

        moved.addCallbacks(answered, failed)

    def _done(self, live: _Live, outcome: str) -> None:
        self._forget(live)
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def _forget(self, live: _Live) -> None:
        for handle in live.timers.values():
            handle.cancel()
        live.timers.clear()
        if self.live.get(live.request.call_id) is live:
            del self.live[live.request.call_id]

    def ack_received(self, request: Request) -> None:
        """The merchant's ACK of our 200: relayed to the consumer."""
        live = self.live.get(request.call_id)
        if live is not None:
            self._run(live, live.charge.merchant_ack())

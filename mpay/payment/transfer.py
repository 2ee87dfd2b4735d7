"""Credit transfer at the PS (thesis Fig 4-3, DESIGN section 6).

    MESSAGE ─ ticket, authenticator, payer signature ─> Authenticated
      │ 400 bad body, 403 signature, 404 payee, 402 "Insufficient Credit"
      v
    Committed (one journal row, both balances, one database transaction)
      │ notice -> payee's registered contact
      v
    WaitPayee ──200 from the payee──> Confirmed: 200 + receipt to the payer
      └─ Timer A, offline, refusal ──> Queued: 202 "Payee Offline, Notice Queued"

The thesis answered 408 when the payee stayed silent; that invites the payer
to pay again although the money has moved, so the design answers 202 and
delivers the notice when the payee next registers: queued notices are kept
in the ledger database (``notices.py``), so a restart of the PS loses none,
and each is sent until the payee's device answers 2xx.  A request re-sent after
its response was lost (same payer, Call-ID, CSeq) meets the ledger's
idempotency key and gets the original receipt, never a second debit; the
payee is told again (devices drop a journal id they have seen).
"""

from __future__ import annotations

import enum
import json
from typing import Any, Callable, NamedTuple

from twisted.internet import defer
from twisted.logger import Logger

from mpay import e164
from mpay.auth.crypto import encode_b64
from mpay.ledger.api import MAX_AMOUNT_MINOR, Outcome, TransferResult
from mpay.payment import receipt as receipts
from mpay.payment.body import json_body
from mpay.payment.notices import NoticeQueue
from mpay.payment.signatures import SignatureChecks
from mpay.sip.stream import address_of
from mpay.sip.endpoint import SIPTimeout
from mpay.sip.message import Request
from mpay.sip.transaction import ServerTransaction
from mpay.sip.useragent import build_request, new_call_id

TRANSFER_CONTENT_TYPE = "application/vnd.mpay.transfer+json"
NOTICE_CONTENT_TYPE = "application/vnd.mpay.notice+json"
RESULT_CONTENT_TYPE = "application/vnd.mpay.result+json"
TRANSFER_TIMER_A_S = 8.0
MAX_TRANSFER_BODY_BYTES = 1024
ANONYMOUS_URI = "sip:anonymous@anonymous.invalid"    # RFC 3323
ANONYMOUS = "anonymous"

REFUSALS = {
    Outcome.INSUFFICIENT: (402, "Insufficient Credit"),
    Outcome.UNKNOWN_PAYEE: (404, "Unknown Payee"),
    Outcome.UNKNOWN_PAYER: (403, "Payer Has No Account"),
    Outcome.BLOCKED: (403, "Account Blocked"),
}


class TransferState(enum.Enum):
    AUTHENTICATED = "Authenticated"
    COMMITTED = "Committed"
    WAIT_PAYEE = "WaitPayee"
    CONFIRMED = "Confirmed"
    QUEUED = "Queued"
    REFUSED = "Refused"


_TRANSITIONS = {
    TransferState.AUTHENTICATED: {TransferState.COMMITTED, TransferState.REFUSED},
    TransferState.COMMITTED: {TransferState.WAIT_PAYEE, TransferState.QUEUED},
    TransferState.WAIT_PAYEE: {TransferState.CONFIRMED, TransferState.QUEUED},
}


class TransferFlow:
    """One transfer's place in Fig 4-3; a transition the figure lacks is a bug, asserted."""

    __slots__ = ("payer", "call_id", "state")

    def __init__(self, payer: str, call_id: str):
        self.payer = payer
        self.call_id = call_id
        self.state = TransferState.AUTHENTICATED

    def advance(self, state: TransferState) -> None:
        assert state in _TRANSITIONS.get(self.state, ()), f"transfer {self.state} -> {state}"
        self.state = state

    @property
    def done(self) -> bool:
        return self.state not in _TRANSITIONS


class TransferRequest(NamedTuple):
    payee: str
    amount: int
    conceal: bool


class BadTransfer(ValueError):
    """The request cannot be a transfer; the message is the reason phrase (400)."""


def read_transfer(request: Request, currency: str, default_region: str) -> TransferRequest:
    try:
        body = json_body(request, TRANSFER_CONTENT_TYPE, MAX_TRANSFER_BODY_BYTES, "Transfer")
    except ValueError as exc:
        raise BadTransfer(str(exc)) from None
    amount = body.get("amount")
    # bool is an int in Python; a float or a string is never an amount of minor units.
    if type(amount) is not int or not 0 < amount <= MAX_AMOUNT_MINOR:
        raise BadTransfer("Invalid Amount")
    if body.get("currency", currency) != currency:
        raise BadTransfer(f"Currency Not Supported (only {currency})")
    conceal = body.get("conceal", False)
    if type(conceal) is not bool:
        raise BadTransfer("Invalid Conceal Flag")
    try:
        payee = e164.number_from_uri(request.uri)
    except e164.InvalidNumber as exc:
        raise BadTransfer(f"Invalid Payee Number ({exc.reason})") from None
    return TransferRequest(payee, amount, conceal)


class CreditTransfer:
    """The MESSAGE handler of the PS; one call per new transfer transaction."""

    log = Logger()

    def __init__(self, *, authenticate: Callable, ledger: Any, device_keys: Any, locations: Any,
                 notices: NoticeQueue, ps_key: Any, currency: str, domain: str,
                 default_region: str, timers: Any, timer_a_s: float = TRANSFER_TIMER_A_S,
                 signatures: SignatureChecks | None = None):
        self.authenticate = authenticate
        self.ledger = ledger
        self.device_keys = device_keys
        self.locations = locations
        self.notices = notices
        self.ps_key = ps_key
        self.currency = currency
        self.domain = domain
        self.default_region = default_region
        self.timers = timers
        self.timer_a_s = timer_a_s
        self.signatures = signatures or SignatureChecks(None, use_child=False)
        self.endpoint: Any = None
        self.outcomes: dict[str, int] = {}
        self.active: dict[tuple[str, str], TransferFlow] = {}   # live transfers, for the manhole

    def __call__(self, txn: ServerTransaction, request: Request) -> None:
        self.authenticate(txn, request, lambda verified: self._authenticated(txn, request, verified),
                          idempotent=True)

    def _authenticated(self, txn: ServerTransaction, request: Request, verified: Any) -> None:
        flow = TransferFlow(verified.number, request.call_id)
        self.active[(flow.payer, flow.call_id)] = flow
        work = self._transfer(txn, request, flow, verified.digest)

        def failed(failure):
            self.log.failure("ps: transfer failed", failure)
            if not txn.final:
                txn.respond_with(503, "Ledger Unavailable", headers=[("Retry-After", "5")])

        def forget(_):
            if self.active.get((flow.payer, flow.call_id)) is flow:
                del self.active[(flow.payer, flow.call_id)]

        work.addErrback(failed).addBoth(forget)

    def _refuse(self, txn: ServerTransaction, flow: TransferFlow, status: int, reason: str) -> None:
        flow.advance(TransferState.REFUSED)
        self.outcomes[reason] = self.outcomes.get(reason, 0) + 1
        txn.respond_with(status, reason)

    @defer.inlineCallbacks
    def _transfer(self, txn: ServerTransaction, request: Request, flow: TransferFlow,
                  digest: bytes):
        payer = flow.payer
        try:
            asked = read_transfer(request, self.currency, self.default_region)
            signature = receipts.request_signature(request.headers.get(receipts.SIGNATURE_HEADER))
        except BadTransfer as exc:
            return self._refuse(txn, flow, 415 if str(exc) == "Not A Transfer" else 400, str(exc))
        except receipts.ReceiptError as exc:
            return self._refuse(txn, flow, 403, str(exc))
        if asked.payee == payer:
            return self._refuse(txn, flow, 400, "Payer Is Payee")
        keys = self.device_keys
        was_cached = keys.cached(payer)
        refusal = yield self._refusal((yield keys.load(payer)), digest, signature)
        if refusal and was_cached:      # the device may have enrolled anew: read it again
            refusal = yield self._refusal((yield keys.reload(payer)), digest, signature)
        if refusal:
            return self._refuse(txn, flow, 403, refusal)
        key = f"{payer}|{request.call_id}|{request.cseq[0]}"
        result: TransferResult = yield self.ledger.transfer(
            payer, asked.payee, asked.amount, key, "transfer", reference=request.call_id,
            payer_signature=signature)
        if result.outcome in REFUSALS:
            return self._refuse(txn, flow, *REFUSALS[result.outcome])
        if not result.ok:
            return self._refuse(txn, flow, 400, result.detail or "Invalid Transfer")
        flow.advance(TransferState.COMMITTED)
        receipt = receipts.Receipt(result.journal_id, payer, result.payee, result.amount,
                                   self.currency, result.created or 0.0, encode_b64(digest))
        # A DUPLICATE is the re-sent request of a lost response (or a crash): the money
        # moved once, and the same receipt is due.  Whether the payee ever heard of it is
        # not known here, so it is told again (it drops a journal id it has seen): 200
        # still means "the payee confirmed", never only "committed".
        signed = receipts.sign_receipt(self.ps_key, receipt)   # once: payer and payee share it
        status, reason = yield self._notify_payee(flow, receipt, asked.conceal, signed)
        self._answer(txn, status, reason, signed, result)

    def _refusal(self, record: Any, digest: bytes, signature: bytes) -> defer.Deferred:
        """Fires with why *record*'s key did not sign *digest* (403's reason), or None."""
        if record is None:
            return defer.succeed("Payer Not Enrolled")
        return self.signatures.check(record.device_key, digest, signature).addCallback(
            lambda verifies: None if verifies else "Payer Signature Invalid")

    def _answer(self, txn: ServerTransaction, status: int, reason: str, signed_receipt: str,
                result: TransferResult) -> None:
        self.outcomes[reason] = self.outcomes.get(reason, 0) + 1
        body = json.dumps({"journal_id": result.journal_id, "amount": result.amount,
                           "balance": result.payer_balance_after}).encode()
        txn.respond_with(status, reason, headers=[
            (receipts.RECEIPT_HEADER, signed_receipt),
            ("Content-Type", RESULT_CONTENT_TYPE)], body=body)

    # -- the payee's notice ----------------------------------------------------
    def notice(self, receipt: receipts.Receipt, conceal: bool, signed: str | None = None) -> bytes:
        """What the payee is told: the payer only when not concealed (RFC 3323).

        *signed* is the payer's receipt, already signed: the same one serves the
        payee unless the payer is concealed (then the payee's says "anonymous").
        """
        shown = receipt._replace(payer=ANONYMOUS) if conceal else receipt
        if conceal or signed is None:
            signed = receipts.sign_receipt(self.ps_key, shown)
        return json.dumps({"journal_id": shown.journal_id, "from": shown.payer,
                           "amount": shown.amount, "currency": shown.currency,
                           "created": shown.created, "receipt": signed}).encode()

    @defer.inlineCallbacks
    def _notify_payee(self, flow: TransferFlow, receipt: receipts.Receipt, conceal: bool,
                      signed: str):
        """(status, reason) for the payer: 200 once the payee confirmed, else 202 once the
        notice is queued in the ledger (if that fails, the payer's 503 invites a safe re-send)."""
        payee, journal_id = receipt.payee, receipt.journal_id
        notice = (ANONYMOUS_URI if conceal else e164.sip_uri(receipt.payer, self.domain),
                  self.notice(receipt, conceal, signed))
        try:
            binding = yield self.locations.lookup(payee)
        except Exception:
            # The money has moved; where the payee is cannot be told: like an offline
            # payee, its notice waits in the ledger for its next REGISTER.
            self.log.failure("ps: location store failed; the notice for {payee} is queued",
                             payee=payee)
            binding = None
        if binding is None:
            yield self.notices.push(payee, journal_id, notice)
            flow.advance(TransferState.QUEUED)
            return (202, "Payee Offline, Notice Queued")
        flow.advance(TransferState.WAIT_PAYEE)
        delivered = self._send_notice(payee, address_of(binding), notice)
        confirmed = yield self._within_timer_a(delivered)
        if not confirmed:
            queued = self.notices.push(payee, journal_id, notice)

            def late(confirmed: bool) -> None:
                if confirmed:   # after Timer A, but it did arrive: the queued copy may go
                    queued.addCallback(lambda _: self.notices.discard(payee, journal_id))
                    queued.addErrback(lambda failure: self.log.failure(
                        "ps: a confirmed notice stays queued", failure))

            delivered.addCallback(late)
            yield queued
        flow.advance(TransferState.CONFIRMED if confirmed else TransferState.QUEUED)
        return (200, "OK") if confirmed else (202, "Payee Offline, Notice Queued")

    def _within_timer_a(self, delivered: defer.Deferred) -> defer.Deferred:
        """Fires with *delivered*'s answer, or with False when Timer A runs out first;
        *delivered* goes on to fire with the payee's answer, however late."""
        answer: defer.Deferred = defer.Deferred()

        def timer_a() -> None:
            if not answer.called:
                answer.callback(False)

        timer = self.timers.start(self.timer_a_s, timer_a)

        def answered(confirmed: bool) -> bool:
            if not answer.called:
                timer.cancel()
                answer.callback(confirmed)
            return confirmed

        delivered.addCallback(answered)
        return answer

    def _send_notice(self, payee: str, addr: tuple[str, int], notice: tuple[str, bytes]) -> defer.Deferred:
        """Fires with True when the payee's device confirmed with a 2xx, else False."""
        host, port = self.endpoint.sent_by
        from_uri, body = notice
        request = build_request("MESSAGE", f"sip:{payee}@{addr[0]}:{addr[1]}", sent_by=(host, port),
                                from_uri=from_uri, to_uri=e164.sip_uri(payee, self.domain),
                                call_id=new_call_id(host), cseq=1, body=body,
                                content_type=NOTICE_CONTENT_TYPE,
                                branch=self.endpoint.new_branch(), from_tag=self.endpoint.new_tag())
        sent = self.endpoint.send_request(request, addr)
        sent.addCallback(lambda response: 200 <= response.status < 300)

        def unreachable(failure):
            failure.trap(SIPTimeout)
            return False

        return sent.addErrback(unreachable)

    def deliver_queued(self, number: str, binding: Any) -> defer.Deferred:
        """The payee registered: send what waited for it.  Each notice stays queued until
        the device answers 2xx; fires when every one has been answered or timed out."""
        addr = address_of(binding)

        def send(notices: list) -> defer.Deferred:
            sends = []
            for notice in notices:
                def settled(confirmed: bool, journal_id: int = notice.journal_id) -> Any:
                    return self.notices.discard(number, journal_id) if confirmed else None

                sent = self._send_notice(number, addr, (notice.from_uri, notice.body))
                sends.append(sent.addCallback(settled))
            return defer.gatherResults(sends, consumeErrors=True)

        work = self.notices.waiting(number).addCallback(send)
        work.addErrback(lambda failure: self.log.failure(
            "ps: queued notices for {number} not delivered (still queued)", failure,
            number=number))
        return work

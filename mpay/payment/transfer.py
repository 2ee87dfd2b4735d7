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

from typing import Any, Callable, NamedTuple

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mpay import e164
from mpay.auth.crypto import encode_b64
from mpay.ledger.api import MAX_AMOUNT_MINOR, Outcome, TransferResult
from mpay.payment import receipt as receipts
from mpay.payment.body import json_body, json_scalar
from mpay.payment.notices import NoticeQueue
from mpay.payment.receipt_groups import ReceiptSigner
from mpay.payment.signatures import SignatureChecks
from mpay.payment.transfer_flow import TransferFlow, TransferState
from mpay.sip.stream import address_of
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
# The bodies as json.dumps writes them (tests/test_bodies.py holds them to it).
_NOTICE_JSON = ('{"journal_id": %s, "from": %s, "amount": %s, "currency": %s, "created": %s,'
                ' "receipt": %s}')
_RESULT_JSON = '{"journal_id": %s, "amount": %s, "balance": %s}'

REFUSALS = {
    Outcome.INSUFFICIENT: (402, "Insufficient Credit"),
    Outcome.UNKNOWN_PAYEE: (404, "Unknown Payee"),
    Outcome.UNKNOWN_PAYER: (403, "Payer Has No Account"),
    Outcome.BLOCKED: (403, "Account Blocked"),
}


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
                 notices: NoticeQueue, currency: str, domain: str,
                 default_region: str, timers: Any, timer_a_s: float = TRANSFER_TIMER_A_S,
                 receipt_signer: ReceiptSigner, signatures: SignatureChecks | None = None):
        self.authenticate = authenticate
        self.ledger = ledger
        self.device_keys = device_keys
        self.locations = locations
        self.notices = notices
        self.receipt_signer = receipt_signer    # holds the PS key
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
        self.authenticate(txn, request, lambda verified: _Transfer(self, txn, request, verified),
                          idempotent=True)

    def count(self, reason: str) -> None:
        self.outcomes[reason] = self.outcomes.get(reason, 0) + 1

    # -- the payee's notice ----------------------------------------------------
    @staticmethod
    def notice(receipt: receipts.Receipt, conceal: bool, signed: str) -> bytes:
        """What the payee is told: the payer only when not concealed (RFC 3323).

        *signed* is the payee's receipt: the payer's own, unless the payer is
        concealed (then a copy that says "anonymous").  It is a receipt header
        value (base64url, digits and the formats' own ``;=/ ``), in which JSON
        escapes nothing: it is quoted as it is, where escaping scanned up to a
        kilobyte a transfer for nothing.
        """
        assert signed.isascii() and '"' not in signed and "\\" not in signed, signed
        shown = receipt._replace(payer=ANONYMOUS) if conceal else receipt
        return (_NOTICE_JSON % (
            json_scalar(shown.journal_id), json_scalar(shown.payer), json_scalar(shown.amount),
            json_scalar(shown.currency), json_scalar(shown.created), f'"{signed}"')).encode()

    def send_notice(self, payee: str, addr: Any, notice: tuple[str, bytes],
                    settled: Callable[[bool], None]) -> None:
        """``settled(True)`` when the payee's device confirmed with a 2xx, else ``settled(False)``
        (a refusal, or no answer by Timer F).  ``addr`` is what ``address_of`` gives: typed
        ``tuple[str, int]``, compiled code would unbox a Flow or Relayed to a UDP address."""
        host, port = self.endpoint.sent_by
        from_uri, body = notice
        request = build_request("MESSAGE", f"sip:{payee}@{addr[0]}:{addr[1]}", sent_by=(host, port),
                                from_uri=from_uri, to_uri=e164.sip_uri(payee, self.domain),
                                call_id=new_call_id(host), cseq=1, body=body,
                                content_type=NOTICE_CONTENT_TYPE,
                                branch=self.endpoint.new_branch(), from_tag=self.endpoint.new_tag())
        self.endpoint.start_request(request, addr, lambda response: settled(response.status < 300),
                                    lambda reason: settled(False))

    def _notice_sent(self, payee: str, addr: Any,
                     notice: tuple[str, bytes]) -> defer.Deferred:
        sent: defer.Deferred = defer.Deferred()

        def settled(confirmed: bool) -> None:
            if not sent.called:
                sent.callback(confirmed)

        self.send_notice(payee, addr, notice, settled)
        return sent

    def deliver_queued(self, number: str, binding: Any) -> defer.Deferred:
        """The payee registered: send what waited for it.  Each notice stays queued until
        the device answers 2xx; fires when every one has been answered or timed out."""
        addr = address_of(binding)

        def send(notices: list) -> defer.Deferred:
            sends = []
            for notice in notices:
                def settled(confirmed: bool, journal_id: int = notice.journal_id) -> Any:
                    return self.notices.discard(number, journal_id) if confirmed else None

                sent = self._notice_sent(number, addr, (notice.from_uri, notice.body))
                sends.append(sent.addCallback(settled))
            return defer.gatherResults(sends, consumeErrors=True)

        work = self.notices.waiting(number).addCallback(send)
        work.addErrback(lambda failure: self.log.failure(
            "ps: queued notices for {number} not delivered (still queued)", failure,
            number=number))
        return work


class _Transfer:
    """One transfer through Fig 4-3, as plain callbacks: each step starts the next
    when its Deferred fires; any failure answers 503 (the ledger's idempotency key
    makes the payer's re-send safe) and ends it."""

    __slots__ = ("owner", "txn", "request", "flow", "digest", "signature", "asked",
                 "reread", "result", "receipt", "signed", "notice", "timer_a", "queued")

    def __init__(self, owner: CreditTransfer, txn: ServerTransaction, request: Request,
                 verified: Any):
        self.owner = owner
        self.txn = txn
        self.request = request
        assert request.call_id is not None, "the parser refuses a request without a Call-ID"
        self.flow = flow = TransferFlow(verified.number, request.call_id)
        self.digest = verified.digest
        self.timer_a: Any = None
        self.queued: defer.Deferred | None = None
        owner.active[(flow.payer, flow.call_id)] = flow
        self._safely(self._start)

    def _start(self) -> None:
        owner, request, flow = self.owner, self.request, self.flow
        try:
            self.asked = read_transfer(request, owner.currency, owner.default_region)
            self.signature = receipts.request_signature(
                request.headers.get(receipts.SIGNATURE_HEADER))
        except BadTransfer as exc:
            self._refuse(415 if str(exc) == "Not A Transfer" else 400, str(exc))
            return
        except receipts.ReceiptError as exc:
            self._refuse(403, str(exc))
            return
        if self.asked.payee == flow.payer:
            self._refuse(400, "Payer Is Payee")
            return
        record = owner.device_keys.cached_record(flow.payer)
        self.reread = record is not None     # a cached key may be stale: read it again once
        if record is None:
            self._then(owner.device_keys.load(flow.payer), self._key_loaded)
        else:
            self._key_loaded(record)

    def _then(self, work: defer.Deferred, step: Callable[[Any], None]) -> None:
        """*step* with *work*'s result; its failure, or *step*'s, goes to ``_failed``
        (one callback pair: half the Deferred's runs of ``addCallback().addErrback()``)."""
        work.addCallbacks(self._step, self._failed, callbackArgs=(step,))

    def _step(self, result: Any, step: Callable[[Any], None]) -> None:
        try:
            step(result)
        except Exception:
            self._failed(Failure())

    def _safely(self, step: Callable[..., None], *args: Any) -> None:
        """*step* called from outside a Deferred (the first step, Timer A, the payee's
        answer): a failure is handled as ``_then`` handles one."""
        try:
            step(*args)
        except Exception:
            self._failed(Failure())

    def _key_loaded(self, record: Any) -> None:
        if record is None:
            self._refuse(403, "Payer Not Enrolled")
            return
        self.owner.signatures.check_then(record.device_key, self.digest, self.signature,
                                         self._verdict)

    def _verdict(self, verifies: bool) -> None:
        self._safely(self._signature_checked, verifies)

    def _signature_checked(self, verifies: bool) -> None:
        if not verifies and self.reread:      # the device may have enrolled anew
            self.reread = False
            self._then(self.owner.device_keys.reload(self.flow.payer), self._key_loaded)
            return
        if not verifies:
            self._refuse(403, "Payer Signature Invalid")
            return
        request, asked, payer = self.request, self.asked, self.flow.payer
        key = f"{payer}|{request.call_id}|{request.cseq[0]}"
        self.owner.ledger.transfer_then(
            self._ledger_answered, self._failed, payer, asked.payee, asked.amount, key,
            "transfer", reference=request.call_id, payer_signature=self.signature)

    def _ledger_answered(self, result: TransferResult) -> None:
        self._safely(self._committed, result)

    def _committed(self, result: TransferResult) -> None:
        if result.outcome in REFUSALS:
            self._refuse(*REFUSALS[result.outcome])
            return
        if not result.ok:
            self._refuse(400, result.detail or "Invalid Transfer")
            return
        owner, flow = self.owner, self.flow
        flow.advance(TransferState.COMMITTED)
        self.result = result
        assert result.journal_id is not None, "a committed transfer has its journal row"
        receipt = self.receipt = receipts.Receipt(
            result.journal_id, flow.payer, result.payee, result.amount, owner.currency,
            result.created or 0.0, encode_b64(self.digest))
        # A DUPLICATE is the re-sent request of a lost response (or a crash): the money
        # moved once, and the same receipt is due.  Whether the payee ever heard of it is
        # not known here, so it is told again (it drops a journal id it has seen): 200
        # still means "the payee confirmed", never only "committed".
        bodies = [receipt.encode()]           # payer and payee share it, unless concealed
        if self.asked.conceal:
            bodies.append(receipt._replace(payer=ANONYMOUS).encode())
        owner.receipt_signer.sign(bodies, self._receipted, self._failed)

    def _receipted(self, signed: list[str]) -> None:
        owner, receipt, conceal = self.owner, self.receipt, self.asked.conceal
        self.signed = signed[0]
        self.notice = (ANONYMOUS_URI if conceal else e164.sip_uri(receipt.payer, owner.domain),
                       owner.notice(receipt, conceal, signed[-1]))
        locations = owner.locations
        if locations.in_process:      # the embedded store: no Deferred a transfer
            self._located(locations.lookup_now(receipt.payee))
            return
        self._then(locations.lookup(receipt.payee).addErrback(self._unlocated), self._located)

    def _unlocated(self, failure: Any) -> None:
        # The money has moved; where the payee is cannot be told: like an offline
        # payee, its notice waits in the ledger for its next REGISTER.
        self.owner.log.failure("ps: location store failed; the notice for {payee} is queued",
                               failure, payee=self.receipt.payee)
        return None

    def _located(self, binding: Any) -> None:
        if binding is None:
            self._queue_notice()
            return
        owner = self.owner
        self.flow.advance(TransferState.WAIT_PAYEE)
        self.timer_a = owner.timers.start(owner.timer_a_s, self._safely, self._timer_a)
        owner.send_notice(self.receipt.payee, address_of(binding), self.notice,
                          lambda confirmed: self._safely(self._settled, confirmed))

    def _timer_a(self) -> None:
        self.timer_a = None
        self._queue_notice()

    def _settled(self, confirmed: bool) -> None:
        """The payee's device answered (or Timer F gave up), perhaps after Timer A."""
        if self.timer_a is not None:
            self.timer_a.cancel()
            self.timer_a = None
            if confirmed:
                self.flow.advance(TransferState.CONFIRMED)
                self._answer(200, "OK")
            else:
                self._queue_notice()
        elif confirmed and self.queued is not None:
            # After Timer A, but it did arrive: the queued copy may go.
            owner, payee, journal_id = self.owner, self.receipt.payee, self.receipt.journal_id
            self.queued.addCallback(lambda _: owner.notices.discard(payee, journal_id))
            self.queued.addErrback(lambda failure: owner.log.failure(
                "ps: a confirmed notice stays queued", failure))

    def _queue_notice(self) -> None:
        """202 once the notice is on disk; if that fails, the payer's 503 invites a safe re-send."""
        self.queued = self.owner.notices.push(self.receipt.payee, self.receipt.journal_id,
                                              self.notice)
        self._then(self.queued, self._answer_queued)

    def _answer_queued(self, _: Any) -> None:
        self.flow.advance(TransferState.QUEUED)
        self._answer(202, "Payee Offline, Notice Queued")

    def _answer(self, status: int, reason: str) -> None:
        result = self.result
        self.owner.count(reason)
        body = (_RESULT_JSON % (json_scalar(result.journal_id), json_scalar(result.amount),
                                json_scalar(result.payer_balance_after))).encode()
        self.txn.respond_with(status, reason, headers=[
            (receipts.RECEIPT_HEADER, self.signed),
            ("Content-Type", RESULT_CONTENT_TYPE)], body=body)
        self._forget()

    def _refuse(self, status: int, reason: str) -> None:
        self.flow.advance(TransferState.REFUSED)
        self.owner.count(reason)
        self.txn.respond_with(status, reason)
        self._forget()

    def _failed(self, failure: Any) -> None:
        self.owner.log.failure("ps: transfer failed", failure)
        if not self.txn.final:
            self.txn.respond_with(503, "Ledger Unavailable", headers=[("Retry-After", "5")])
        self._forget()

    def _forget(self) -> None:
        active, key = self.owner.active, (self.flow.payer, self.flow.call_id)
        if active.get(key) is self.flow:
            del active[key]

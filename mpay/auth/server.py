"""The authentication server's SIP core: enrolment, ticket requests, renewals.

A REGISTER to the AS is one of three things, told apart by its header fields:

- ``Mpay-Key-Share`` present: a first-time **enrolment** claim; the
  :mod:`mpay.auth.enrolment` machine runs it (401, REFER, caller ID, NOTIFY).
- ``Mpay-Ticket`` present: a **renewal**; the old ticket and its
  authenticator are checked like any PS request, a new ticket is issued.
- ``Mpay-Authenticator`` alone: a **ticket request**, proving knowledge of K.

This module carries out the machine's effects (responses, the REFER client
transaction, timers on the wheel, storing K sealed at rest) and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger

from mpay import e164
from mpay.auth import enrolment as fsm
from mpay.auth import wire
from mpay.auth.wire import digest_of
from mpay.auth.crypto import CryptoError, KeyRing, open_device_key, seal_device_key
from mpay.auth.devicekeys import DeviceKeyStore, DeviceRecord
from mpay.auth.keyagreement import KeyAgreementFailed, as_complete
from mpay.auth.ratelimit import SourceRateLimiter
from mpay.auth.tickets import (
    AUTHENTICATOR_HEADER, SESSION_HEADER, TICKET_HEADER, TICKET_LIFETIME_S, issue_ticket,
    seal_session_part, unpack_ip,
)
from mpay.auth.verifier import TicketRefused, TicketVerifier
from mpay.sip.endpoint import SIPTimeout
from mpay.sip.message import Request
from mpay.sip.transaction import ServerTransaction
from mpay.sip.useragent import build_request, new_call_id, new_tag

MAX_PENDING_ENROLMENTS = 10_000
OVERLOAD_RETRY_AFTER_S = 10


@dataclass(frozen=True)
class ReceiverLine:
    """A caller-ID receiver line: its id (events carry it) and its telephone number."""

    line_id: str
    number: str


@dataclass
class _Pending:
    enrolment: fsm.Enrolment
    addr: tuple[str, int]              # where the DMD's REGISTER came from: the REFER goes there
    timers: dict
    refer_call_id: str | None = None


class AuthenticationServer:
    role = "as"
    log = Logger()

    def __init__(self, *, domain: str, identity: str, signing_key: Any, k_ps: KeyRing,
                 ps_id: str, master: KeyRing, device_keys: DeviceKeyStore,
                 lines: list[ReceiverLine], wheel: Any, clock: Callable[[], float],
                 verifier: TicketVerifier, ticket_lifetime_s: float = TICKET_LIFETIME_S,
                 timers: fsm.EnrolmentTimers = fsm.EnrolmentTimers(),
                 limiter: SourceRateLimiter | None = None):
        self.domain = domain
        self.identity = identity
        self.signing_key = signing_key
        self.k_ps = k_ps
        self.ps_id = ps_id
        self.master = master
        self.device_keys = device_keys
        self.lines = list(lines)
        self.wheel = wheel
        self.clock = clock
        self.verifier = verifier
        self.ticket_lifetime_s = ticket_lifetime_s
        self.timers = timers
        self.limiter = limiter             # per-source REGISTER rate; None: unlimited
        self.endpoint: Any = None          # the SIPEndpoint, set by whoever builds both
        self.pending: dict[str, _Pending] = {}
        self.outcomes: dict[str, int] = {}
        self.handlers = {"REGISTER": self.register, "NOTIFY": self.notify}

    def ack_received(self, request: Request, addr: Any) -> None:
        """The AS opens no INVITE dialogs, so an ACK is stray: ignored."""

    # -- REGISTER ----------------------------------------------------------
    def register(self, txn: ServerTransaction, request: Request) -> None:
        limiter = self.limiter
        if limiter is not None and not limiter.allow(txn.addr[0]):
            self.outcomes["rate limited"] = self.outcomes.get("rate limited", 0) + 1
            txn.respond_with(503, "Too Many Requests From This Address",
                             headers=[("Retry-After", str(limiter.retry_after_s(txn.addr[0])))])
            return
        try:
            number = e164.number_from_uri(request.to_addr.uri)
            if e164.number_from_uri(request.from_addr.uri) != number:
                txn.respond_with(403, "Third-Party Registration Refused")
                return
        except e164.InvalidNumber as exc:
            txn.respond_with(400, f"Invalid Number ({exc.reason})")
            return
        headers = request.headers
        if wire.KEY_SHARE_HEADER in headers:
            self._claim(txn, request, number)
        elif TICKET_HEADER in headers:
            self._answer_later(txn, self._renew(txn, request, number))
        elif AUTHENTICATOR_HEADER in headers:
            self._answer_later(txn, self._issue(txn, request, number))
        else:
            txn.respond_with(401, "Enrolment Or Ticket Request Required",
                             headers=[("WWW-Authenticate", wire.challenge("tel:" + self.lines[0].number))]
                             if self.lines else [])

    def _answer_later(self, txn: ServerTransaction, work: defer.Deferred) -> None:
        def failed(failure):
            self.log.failure("as: ticket request failed", failure)
            if not txn.final:
                txn.respond_with(500, "Server Internal Error")

        work.addErrback(failed)

    def _claim(self, txn: ServerTransaction, request: Request, number: str) -> None:
        headers = request.headers
        try:
            claim = fsm.Claim(number, wire.read_key_share(headers.get(wire.KEY_SHARE_HEADER)),
                              wire.read_nonce(headers.get(wire.NONCE_HEADER)),
                              wire.read_signing_key(headers.get(wire.SIGNING_KEY_HEADER)))
        except wire.BadField as exc:
            txn.respond_with(400, str(exc))
            return
        pending = self.pending.get(number)
        if pending is not None:
            if pending.enrolment.claim != claim:
                txn.respond_with(409, "Enrolment In Progress")
                return
            self._run(pending, pending.enrolment.register(txn))
            return
        if not self.lines:
            txn.respond_with(503, "No Caller-ID Line Configured")
            return
        if len(self.pending) >= MAX_PENDING_ENROLMENTS:
            txn.respond_with(503, headers=[("Retry-After", str(OVERLOAD_RETRY_AFTER_S))])
            return
        line = self._least_busy_line()
        enrolment = fsm.Enrolment(claim, line.line_id, "tel:" + line.number, self._agree,
                                   self.timers)
        pending = _Pending(enrolment, txn.addr, {})
        self.pending[number] = pending
        self.log.info("as: enrolment of {number} started on line {line}", number=number, line=line.line_id)
        self._run(pending, enrolment.start(txn))

    def _least_busy_line(self) -> ReceiverLine:
        """Concurrent callers are told apart by the line they call: spread them."""
        busy = {line.line_id: 0 for line in self.lines}
        for pending in self.pending.values():
            busy[pending.enrolment.line_id] = busy.get(pending.enrolment.line_id, 0) + 1
        return min(self.lines, key=lambda line: busy[line.line_id])

    def _agree(self, claim: fsm.Claim) -> fsm.KeyAgreement:
        try:
            acceptance, k = as_complete(self.signing_key, self.identity, claim.number,
                                        claim.dmd_public, claim.dmd_nonce, claim.device_key)
        except (KeyAgreementFailed, CryptoError) as exc:
            raise fsm.KeyAgreementRefused(str(exc)) from None
        return fsm.KeyAgreement(acceptance.as_public, acceptance.as_nonce, acceptance.signature, k)

    # -- NOTIFY and caller ID ---------------------------------------------
    def notify(self, txn: ServerTransaction, request: Request) -> None:
        try:
            number = e164.number_from_uri(request.from_addr.uri)
        except e164.InvalidNumber as exc:
            txn.respond_with(400, f"Invalid Number ({exc.reason})")
            return
        pending = self.pending.get(number)
        if pending is None or pending.refer_call_id != request.call_id:
            txn.respond_with(481)
            return
        event = (request.headers.get("Event") or "").split(";")[0].strip().lower()
        if event != "refer":
            txn.respond_with(489, "Bad Event", headers=[("Allow-Events", "refer")])
            return
        self._run(pending, pending.enrolment.notify(txn))

    def caller_id(self, event: Any) -> None:
        """A call seen by a receiver line (a CallerIDEvent): every enrolment sent to that line hears it."""
        for pending in list(self.pending.values()):
            if pending.enrolment.line_id == event.line_id:
                self._run(pending, pending.enrolment.caller_id(event.number_e164, event.withheld))

    # -- effects -------------------------------------------------------------
    def _run(self, pending: _Pending, effects: list) -> None:
        for index, effect in enumerate(effects):
            kind = type(effect)
            if kind is fsm.Respond:
                self._respond(effect)
            elif kind is fsm.StartTimer:
                self._cancel(pending, effect.name)
                pending.timers[effect.name] = self.wheel.start(effect.delay_s, self._fire, pending, effect.name)
            elif kind is fsm.CancelTimer:
                self._cancel(pending, effect.name)
            elif kind is fsm.SendRefer:
                self._send_refer(pending, effect.refer_to)
            elif kind is fsm.Enrolled:
                rest = effects[index + 1:]
                stored = self._store(effect)
                stored.addCallbacks(lambda _: self._run(pending, rest),
                                    lambda failure: self._not_stored(pending, rest, failure))
                return
            elif kind is fsm.Finished:
                self._finish(pending, effect)

    def _respond(self, effect: fsm.Respond) -> None:
        headers: list[tuple[str, str]] = []
        if effect.challenge is not None:
            headers.append(("WWW-Authenticate", wire.challenge(effect.challenge)))
        if effect.keys is not None:
            headers += [(wire.KEY_SHARE_HEADER, wire.key_share(effect.keys.as_public)),
                        (wire.NONCE_HEADER, wire.nonce(effect.keys.as_nonce)),
                        (wire.AS_SIGNATURE_HEADER, wire.signature(effect.keys.signature))]
        if not effect.txn.final:
            effect.txn.respond_with(effect.status, effect.reason, headers=headers)

    def _fire(self, pending: _Pending, name: str) -> None:
        pending.timers.pop(name, None)
        self._run(pending, pending.enrolment.timer(name))

    @staticmethod
    def _cancel(pending: _Pending, name: str) -> None:
        handle = pending.timers.pop(name, None)
        if handle is not None:
            handle.cancel()

    def _send_refer(self, pending: _Pending, refer_to: str) -> None:
        number = pending.enrolment.claim.number
        host, port = self.endpoint.sent_by
        call_id = new_call_id(host)
        pending.refer_call_id = call_id
        request = build_request(
            "REFER", f"sip:{number}@{pending.addr[0]}:{pending.addr[1]}", sent_by=(host, port),
            from_uri=f"sip:as@{self.domain}", to_uri=e164.sip_uri(number, self.domain),
            call_id=call_id, cseq=1, from_tag=new_tag(), contact=f"sip:as@{host}:{port}",
            headers=[("Refer-To", f"<{refer_to}>")])
        answer = self.endpoint.send_request(request, pending.addr)

        def answered(response):
            self._run(pending, pending.enrolment.refer_answered(response.status))

        def timed_out(failure):
            failure.trap(SIPTimeout)
            self._run(pending, pending.enrolment.refer_timed_out())

        answer.addCallbacks(answered, timed_out)

    def _store(self, effect: fsm.Enrolled) -> defer.Deferred:
        record = DeviceRecord(effect.number, seal_device_key(self.master, effect.number, effect.k),
                              effect.device_key)
        return defer.maybeDeferred(self.device_keys.store, record)

    def _not_stored(self, pending: _Pending, rest: list, failure) -> None:
        """K could not be stored: the device must not believe it is enrolled."""
        self.log.failure("as: storing the key of {number} failed", failure,
                         number=pending.enrolment.claim.number)
        for effect in rest:
            if type(effect) is fsm.Respond and not effect.txn.final:
                effect.txn.respond_with(500, "Enrolment Not Stored")
        for name in list(pending.timers):
            self._cancel(pending, name)
        self._finish(pending, fsm.Finished("Enrolment Not Stored", pending.enrolment.state))

    def _finish(self, pending: _Pending, effect: fsm.Finished) -> None:
        number = pending.enrolment.claim.number
        for name in list(pending.timers):
            self._cancel(pending, name)
        if self.pending.get(number) is pending:
            del self.pending[number]
        self.outcomes[effect.outcome] = self.outcomes.get(effect.outcome, 0) + 1
        self.log.info("as: enrolment of {number} ended: {outcome} (in {state})", number=number,
                      outcome=effect.outcome, state=effect.state.value)

    # -- tickets -------------------------------------------------------------
    @defer.inlineCallbacks
    def _device_k(self, txn: ServerTransaction, number: str):
        record = yield self.device_keys.load(number)
        if record is None:
            txn.respond_with(404, "Number Not Enrolled")
            return None
        return open_device_key(self.master, number, record.sealed_k)

    @defer.inlineCallbacks
    def _issue(self, txn: ServerTransaction, request: Request, number: str):
        """Ticket request: the proof is an authenticator sealed with K."""
        k = yield self._device_k(txn, number)
        if k is None:
            return
        now = self.clock()
        try:
            proof = self.verifier.verify_ticket_request(
                k, number, request.headers.get(AUTHENTICATOR_HEADER), txn.addr[0],
                digest_of(request), now)
        except TicketRefused as refusal:
            txn.respond_with(refusal.status, refusal.reason)
            return
        self._grant(txn, k, number, unpack_ip(proof.ip), proof.nonce, now)

    @defer.inlineCallbacks
    def _renew(self, txn: ServerTransaction, request: Request, number: str):
        """Renewal: a still-valid ticket and its authenticator stand in for the K proof."""
        headers = request.headers
        now = self.clock()
        try:
            verified = self.verifier.verify(headers.get(TICKET_HEADER), headers.get(AUTHENTICATOR_HEADER),
                                            txn.addr[0], digest_of(request), now)
        except TicketRefused as refusal:
            txn.respond_with(refusal.status, refusal.reason)
            return
        if verified.number != number:
            txn.respond_with(403, "Identity Mismatch")
            return
        k = yield self._device_k(txn, number)
        if k is not None:
            self._grant(txn, k, number, txn.addr[0], verified.nonce, now)

    def _grant(self, txn: ServerTransaction, k: bytes, number: str, ip: str, nonce: bytes,
               now: float) -> None:
        issued = issue_ticket(self.k_ps, number, ip, self.ps_id, now, self.ticket_lifetime_s)
        session = seal_session_part(k, number, issued.k_c_ps, nonce, issued.expires, self.ps_id)
        txn.respond_with(200, headers=[(TICKET_HEADER, issued.ticket), (SESSION_HEADER, session),
                                       ("Expires", str(int(issued.expires - now)))])

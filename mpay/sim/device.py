"""The DMD's protocol logic (the Sim-DMD and the wallet share it).

The device speaks through an ordinary :class:`SIPEndpoint` (so its requests
are retransmitted and the AS's REFER is answered by a real server
transaction) and keeps what it must remember in a :class:`DeviceState`
file of mode 0600: its number, its Ed25519 key, K, and its current ticket.
Its charging side (charge requests, charges, timed sessions) is
``mpay/sim/charging.py``.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import defer
from twisted.logger import Logger

from mpay import e164
from mpay.auth import wire
from mpay.auth.crypto import public_key_raw
from mpay.auth.keyagreement import AsAcceptance, DmdKeyAgreement
from mpay.auth.keyfiles import read_secret_file, write_secret_file
from mpay.auth.tickets import (
    AUTHENTICATOR_HEADER, NONCE_BYTES, SESSION_HEADER, TICKET_HEADER, TICKET_REQUEST_PURPOSE,
    make_authenticator, open_session_part,
)
from mpay.payment import receipt as receipts
from mpay.payment.body import media_type
from mpay.payment.otcn_request import OTCN_REQUEST_CONTENT_TYPE
from mpay.payment.transfer import NOTICE_CONTENT_TYPE, TRANSFER_CONTENT_TYPE
from mpay.sim.charging import ChargingSide
from mpay.sip.dialog import Dialog
from mpay.sip.message import Request, Response
from mpay.sip.useragent import build_request, new_branch, new_call_id

REREGISTER_FIRST_S = 1.0    # a lost stream to the PS: first REGISTER again after this
REREGISTER_MAX_S = 32.0     # ... then doubling up to this between tries
REFER_WAIT_S = 40.0          # the AS sends its REFER Timer A after the 401; allow retransmissions
SIPFRAG_CALL_PLACED = b"SIP/2.0 200 OK\r\n"


class DeviceError(Exception):
    """A step failed; the message says which and what the server answered."""


@dataclass
class DeviceState:
    number: str
    signing_key: str                 # Ed25519 private key, raw 32 bytes, base64
    k: str | None = None             # enrolment secret K, base64
    ticket: str | None = None
    k_c_ps: str | None = None        # session key for the PS, base64
    ticket_expires: float | None = None

    @classmethod
    def new(cls, number: str) -> "DeviceState":
        raw = Ed25519PrivateKey.generate().private_bytes_raw()
        return cls(number, base64.b64encode(raw).decode())

    def private_key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(base64.b64decode(self.signing_key))

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write_secret_file(path, json.dumps(asdict(self), indent=1).encode())

    @classmethod
    def load(cls, path: str) -> "DeviceState":
        return cls(**json.loads(read_secret_file(path)))


def _b(text: str | None) -> bytes:
    if text is None:
        raise DeviceError("not enrolled (no K) or no ticket yet")
    return base64.b64decode(text)


class Device(ChargingSide):
    """One DMD.  ``ring(number, line_uri) -> Deferred`` places the enrolment call."""

    log = Logger()

    def __init__(self, state: DeviceState, *, domain: str, as_addr: tuple[str, int],
                 ps_addr: tuple[str, int], as_identity: str, pinned_as_key: Any,
                 ring: Callable[[str, str], defer.Deferred], clock: Callable[[], float],
                 reactor: Any = None, state_path: str | None = None, pinned_ps_key: Any = None):
        self.state = state
        self.domain = domain
        self.as_addr = as_addr
        self.ps_addr = ps_addr
        self.as_identity = as_identity
        self.pinned_as_key = pinned_as_key
        self.ring = ring
        self.clock = clock
        self.reactor = reactor
        self.state_path = state_path
        self.pinned_ps_key = pinned_ps_key
        self.endpoint: Any = None
        self.handlers = {"REFER": self._on_refer, "MESSAGE": self._on_notice,
                         "RECEIVE": self._on_charge, "BYE": self._on_bye}
        # Asked for each charge request: 200 to pay, 603 to decline, None to stay silent,
        # or a Deferred of one of these (a person deciding).  No policy declines: a device
        # never pays without a decision.
        self.charge_policy: Callable[[dict], Any] | None = None
        self.charge_requests: list[dict] = []
        self.sessions: dict[str, Dialog] = {}   # timed sessions in progress, by Call-ID
        self.session_ends: list[dict] = []      # how each ended: who, the charge, the receipt
        self.on_session_end: Callable[[dict], None] | None = None
        self.notices: list[dict] = []          # credit notices received, newest last
        self._journal_ids: set[int] = set()    # of those notices: a load run brings thousands
        self.on_notice: Callable[[dict], None] | None = None
        self._refer: defer.Deferred | None = None
        self._cseq = 0
        self.stopping = False   # set when the device shuts down: no more re-registering

    def ack_received(self, request: Request, addr: Any) -> None:
        """No INVITE dialogs on the device yet."""

    # -- helpers -------------------------------------------------------------
    @property
    def uri(self) -> str:
        return e164.sip_uri(self.state.number, self.domain)

    @property
    def ip(self) -> str:
        return self.endpoint.sent_by[0]

    def _request(self, method: str, request_uri: str, **kwargs) -> Request:
        self._cseq += 1
        host, port = self.endpoint.sent_by
        kwargs.setdefault("call_id", new_call_id(host))
        return build_request(method, request_uri, sent_by=(host, port), from_uri=self.uri,
                             to_uri=kwargs.pop("to_uri", self.uri), cseq=self._cseq, **kwargs)

    def _save(self) -> None:
        if self.state_path is not None:
            self.state.save(self.state_path)

    @staticmethod
    def _expect(response: Response, status: int, step: str) -> None:
        if response.status != status:
            raise DeviceError(f"{step}: {response.status} {response.reason}")

    # -- enrolment -------------------------------------------------------------
    def _on_refer(self, txn: Any, request: Request) -> None:
        if self._refer is None or self._refer.called:
            txn.respond_with(403, "No Enrolment In Progress")
            return
        self._refer.callback((txn, request))

    @defer.inlineCallbacks
    def enroll(self):
        """REGISTER -> 401 -> REFER (202) -> the call -> NOTIFY -> 200 with the AS's share."""
        refer = self._refer = defer.Deferred()
        if self.reactor is not None:
            refer.addTimeout(REFER_WAIT_S, self.reactor)
        try:
            k = yield self._enroll(refer)
        finally:
            if not refer.called:
                refer.addErrback(lambda failure: None)
                refer.cancel()
        return k

    @defer.inlineCallbacks
    def _enroll(self, refer_received: defer.Deferred):
        signing = self.state.private_key()
        agreement = DmdKeyAgreement(self.state.number, self.as_identity, signing.public_key())
        register = self._request("REGISTER", f"sip:{self.domain}", headers=[
            (wire.KEY_SHARE_HEADER, wire.key_share(agreement.public)),
            (wire.NONCE_HEADER, wire.nonce(agreement.nonce)),
            (wire.SIGNING_KEY_HEADER, wire.signing_key(public_key_raw(signing.public_key()))),
        ], contact=f"sip:{self.state.number}@{self.ip}:{self.endpoint.sent_by[1]}")
        response = yield self.endpoint.send_request(register, self.as_addr)
        self._expect(response, 401, "enrolment REGISTER")
        line = wire.read_challenge(response.headers.get("WWW-Authenticate"))
        txn, refer = yield refer_received
        refer_to = refer.headers.get("Refer-To", "").strip("<> ")
        if refer_to != line:
            txn.respond_with(403, "Refer-To Is Not The Challenged Line")
            raise DeviceError(f"REFER to {refer_to!r}, but the 401 named {line!r}")
        txn.respond_with(202)
        self.log.info("dmd: calling {line} to prove {number}", line=line, number=self.state.number)
        yield self.ring(self.state.number, line)
        notify = self._notify_for(txn, refer)
        response = yield self.endpoint.send_request(notify, self.as_addr)
        self._expect(response, 200, "enrolment NOTIFY")
        headers = response.headers
        acceptance = AsAcceptance(wire.read_key_share(headers.get(wire.KEY_SHARE_HEADER)),
                                  wire.read_nonce(headers.get(wire.NONCE_HEADER)),
                                  wire.read_signature(headers.get(wire.AS_SIGNATURE_HEADER)))
        # Raises EnrolmentAborted when the AS's signature is not the pinned key's: a MITM.
        k = agreement.finish(acceptance, self.pinned_as_key)
        self.state.k = base64.b64encode(k).decode()
        self._save()
        return k

    def _notify_for(self, txn: Any, refer: Request) -> Request:
        """NOTIFY in the REFER's dialog (RFC 3515): the call was placed."""
        their = refer.from_addr
        self._cseq += 1
        host, port = self.endpoint.sent_by
        return build_request(
            "NOTIFY", refer.headers.get("Contact", "").strip("<> ") or f"sip:{self.domain}",
            sent_by=(host, port), from_uri=self.uri, to_uri=their.uri, call_id=refer.call_id,
            cseq=self._cseq, from_tag=txn.to_tag, to_tag=their.tag,
            headers=[("Event", "refer"), ("Subscription-State", "terminated;reason=noresource")],
            body=SIPFRAG_CALL_PLACED, content_type="message/sipfrag;version=2.0")

    # -- tickets ---------------------------------------------------------------
    @defer.inlineCallbacks
    def get_ticket(self):
        """A new ticket, proving K; renews with the current ticket when it is still valid."""
        k = _b(self.state.k)
        nonce = os.urandom(NONCE_BYTES)
        request = self._request("REGISTER", f"sip:{self.domain}")
        now = self.clock()
        digest = wire.digest_of(request)
        if self.state.ticket and self.state.ticket_expires and self.state.ticket_expires > now:
            request.headers.add(TICKET_HEADER, self.state.ticket)
            request.headers.add(AUTHENTICATOR_HEADER, make_authenticator(
                _b(self.state.k_c_ps), self.state.number, self.ip, digest, now, nonce))
        else:
            request.headers.add(AUTHENTICATOR_HEADER, make_authenticator(
                k, self.state.number, self.ip, digest, now, nonce, purpose=TICKET_REQUEST_PURPOSE))
        response = yield self.endpoint.send_request(request, self.as_addr)
        self._expect(response, 200, "ticket request")
        part = open_session_part(k, self.state.number, response.headers.get(SESSION_HEADER), nonce)
        self.state.ticket = response.headers.get(TICKET_HEADER)
        self.state.k_c_ps = base64.b64encode(part.k_c_ps).decode()
        self.state.ticket_expires = part.expires_ms / 1000.0
        self._save()
        return self.state.ticket

    def authenticate(self, request: Request) -> Request:
        """Attach the ticket and a fresh authenticator bound to *request*."""
        request.headers.add(TICKET_HEADER, self.state.ticket or "")
        request.headers.add(AUTHENTICATOR_HEADER, make_authenticator(
            _b(self.state.k_c_ps), self.state.number, self.ip, wire.digest_of(request), self.clock()))
        return request

    def resend(self, request: Request) -> Request:
        """*request* again in a new transaction: new branch, fresh authenticator, the same
        Call-ID, CSeq, body and signature.  What a wallet sends after a 503 or a lost
        response: the PS answers it with the first one's result, never a second payment."""
        via = request.top_via
        via.params["branch"] = new_branch()
        request.set_top_via(via)
        for name in (TICKET_HEADER, AUTHENTICATOR_HEADER):
            request.headers.remove(name)
        return self.authenticate(request)

    @defer.inlineCallbacks
    def register(self, expires_s: int = 3600):
        """Tell the PS where this device is; expires 0 removes the binding."""
        host, port = self.endpoint.sent_by
        request = self._request("REGISTER", f"sip:{self.domain}",
                                contact=f"sip:{self.state.number}@{host}:{port}",
                                headers=[("Expires", str(expires_s))])
        response = yield self.endpoint.send_request(self.authenticate(request), self.ps_addr)
        self._expect(response, 200, "REGISTER to the PS")
        return response

    def stay_registered(self, expires_s: int = 3600) -> None:
        """Over a stream: whenever the connection to the PS is lost, connect again and
        REGISTER over the new one (a binding is only as good as its connection), retrying
        after REREGISTER_FIRST_S, doubling up to REREGISTER_MAX_S."""
        endpoint = self.endpoint
        delay = [REREGISTER_FIRST_S]

        def again() -> None:
            attempt = self.register(expires_s)

            def done(_):
                delay[0] = REREGISTER_FIRST_S

            def failed(failure):
                self.log.info("dmd: REGISTER again failed ({why}); next try in {delay} s",
                              why=failure.getErrorMessage(), delay=delay[0])
                self.reactor.callLater(delay[0], again)
                delay[0] = min(2 * delay[0], REREGISTER_MAX_S)

            attempt.addCallbacks(done, failed)

        def lost(flow) -> None:
            if tuple(flow) == tuple(self.ps_addr) and flow.transport == getattr(
                    self.ps_addr, "transport", "UDP") and not self.stopping:
                self.reactor.callLater(delay[0], again)

        endpoint.flow_lost.append(lost)

    # -- payments ------------------------------------------------------------------
    def transfer_request(self, payee: str, amount: int, conceal: bool = False,
                         signing_key: Ed25519PrivateKey | None = None, *,
                         call_id: str | None = None, body_end: bytes = b"") -> Request:
        """The MESSAGE paying *payee*: signed, ticket and fresh authenticator attached.

        A load generator builds these ahead of sending (the authenticator's
        timestamp must stay within the PS's skew), passing the key loaded once;
        SIPp sends them with its own Call-ID (*call_id*) and a CRLF after the
        JSON (*body_end*), both in the digest that is signed.
        """
        fields: dict[str, Any] = {"amount": amount}
        if conceal:
            fields["conceal"] = True
        extra = {"call_id": call_id} if call_id is not None else {}
        request = self._request("MESSAGE", e164.sip_uri(payee, self.domain),
                                to_uri=e164.sip_uri(payee, self.domain),
                                body=json.dumps(fields).encode() + body_end,
                                content_type=TRANSFER_CONTENT_TYPE, **extra)
        key = signing_key or self.state.private_key()
        request.headers.add(receipts.SIGNATURE_HEADER,
                            receipts.sign_request(key, wire.digest_of(request)))
        return self.authenticate(request)

    @defer.inlineCallbacks
    def transfer(self, payee: str, amount: int, conceal: bool = False):
        """Pay *payee*: (response, verified receipt).  202 means the money moved, payee offline."""
        request = self.transfer_request(payee, amount, conceal)
        response = yield self.endpoint.send_request(request, self.ps_addr)
        if response.status not in (200, 202):
            raise DeviceError(f"transfer: {response.status} {response.reason}")
        return response, self.verified_receipt(response, payee, amount)

    def verified_receipt(self, response: Response, payee: str, amount: int):
        """The PS-signed receipt of a transfer's 2xx, checked against the pinned PS key and
        what was asked (None without a pinned key)."""
        if self.pinned_ps_key is None:
            return None
        receipt = receipts.verify_receipt(self.pinned_ps_key,
                                          response.headers.get(receipts.RECEIPT_HEADER))
        if (receipt.payee, receipt.amount) != (payee, amount):
            raise DeviceError(f"receipt is for {receipt.amount} to {receipt.payee}")
        return receipt

    @defer.inlineCallbacks
    def request_otcn(self, cap: int | None = None):
        """A one-time credit number from the PS: the body of its 200 (otcn, display, cap, expires_at)."""
        body = json.dumps({"cap": cap} if cap is not None else {}).encode()
        request = self._request("MESSAGE", f"sip:otcn@{self.domain}", to_uri=f"sip:otcn@{self.domain}",
                                body=body, content_type=OTCN_REQUEST_CONTENT_TYPE)
        response = yield self.endpoint.send_request(self.authenticate(request), self.ps_addr)
        self._expect(response, 200, "OTCN request")
        return json.loads(response.body)

    def _on_notice(self, txn: Any, request: Request) -> None:
        """A credit notice from the PS: checked, kept, confirmed with 200."""
        if media_type(request) != NOTICE_CONTENT_TYPE:
            txn.respond_with(415, headers=[("Accept", NOTICE_CONTENT_TYPE)])
            return
        try:
            notice = json.loads(request.body)
            if self.pinned_ps_key is not None:
                receipts.verify_receipt(self.pinned_ps_key, notice["receipt"])
        except (ValueError, KeyError, TypeError, receipts.ReceiptError):
            txn.respond_with(400, "Bad Notice")
            return
        notice["from_header"] = request.from_addr.uri
        if notice["journal_id"] in self._journal_ids:
            txn.respond_with(200)      # told again after a re-sent transfer: already known
            return
        self._journal_ids.add(notice["journal_id"])
        self.notices.append(notice)
        if self.on_notice is not None:
            self.on_notice(notice)
        self.log.info("dmd {number}: received {amount} from {payer}", number=self.state.number,
                      amount=notice["amount"], payer=notice["from"])
        txn.respond_with(200)

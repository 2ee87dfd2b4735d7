"""The payment server's SIP core.

Every request but OPTIONS is authenticated by ticket + authenticator; the
registrar binds devices to their location; MESSAGE carries credit transfers
and OTCN requests, told apart by Content-Type; RECEIVE charges a consumer
(event charging, or a session charged by time that BYE ends).
"""

from __future__ import annotations

from typing import Any

from mpay.payment.body import media_type
from mpay.payment.otcn_request import OTCN_REQUEST_CONTENT_TYPE, OTCNIssuer
from mpay.payment.receive import ChargeService
from mpay.payment.registrar import Registrar
from mpay.payment.transfer import TRANSFER_CONTENT_TYPE, CreditTransfer
from mpay.sip.message import Request
from mpay.sip.stream import transport_of
from mpay.sip.transaction import ServerTransaction


class PaymentServer:
    role = "ps"

    def __init__(self, registrar: Registrar, transfer: CreditTransfer, otcn: OTCNIssuer,
                 charges: ChargeService, require_tls: bool = False) -> None:
        self.registrar = registrar
        self.require_tls = require_tls
        self.charges = charges
        self.transfer = transfer
        self.otcn = otcn
        registrar.on_registered.append(transfer.deliver_queued)
        # MESSAGE carries several services; its Content-Type says which.
        self.messages = {TRANSFER_CONTENT_TYPE: transfer, OTCN_REQUEST_CONTENT_TYPE: otcn}
        self.handlers = {"REGISTER": registrar.register, "MESSAGE": self.message,
                         "RECEIVE": self.receive, "BYE": charges.bye}

    def _in_clear(self, txn: ServerTransaction) -> bool:
        """With ``ps.require_tls``, a payment request over UDP or TCP is refused (403)."""
        if self.require_tls and transport_of(txn.addr) != "TLS":
            txn.respond_with(403, "TLS Required")
            return True
        return False

    def receive(self, txn: ServerTransaction, request: Request) -> None:
        if not self._in_clear(txn):
            self.charges(txn, request)

    def message(self, txn: ServerTransaction, request: Request) -> None:
        if self._in_clear(txn):
            return
        handler = self.messages.get(media_type(request))
        if handler is None:
            txn.respond_with(415, headers=[("Accept", ", ".join(sorted(self.messages)))])
            return
        handler(txn, request)

    def ack_received(self, request: Request, addr: Any) -> None:
        """A merchant's ACK of a charge's 200: relayed to the consumer."""
        self.charges.ack_received(request)

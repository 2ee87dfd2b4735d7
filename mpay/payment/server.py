"""The payment server's SIP core.

Every request but OPTIONS is authenticated by ticket + authenticator; the
registrar binds devices to their location; MESSAGE carries credit transfers.
Charging (RECEIVE) joins here with its issue.
"""

from __future__ import annotations

from typing import Any

from mpay.payment.registrar import Registrar
from mpay.payment.transfer import CreditTransfer
from mpay.sip.message import Request


class PaymentServer:
    role = "ps"

    def __init__(self, registrar: Registrar, transfer: CreditTransfer) -> None:
        self.registrar = registrar
        self.transfer = transfer
        registrar.on_registered.append(transfer.deliver_queued)
        self.handlers = {"REGISTER": registrar.register, "MESSAGE": transfer}

    def ack_received(self, request: Request, addr: Any) -> None:
        """ACKs of charged-by-time dialogs will arrive here; none exist yet."""

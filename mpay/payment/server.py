"""The payment server's SIP core.

Every request but OPTIONS is authenticated by ticket + authenticator; the
registrar binds devices to their location.  Credit transfer and charging
handlers join here as their issues land.
"""

from __future__ import annotations

from typing import Any

from mpay.payment.registrar import Registrar
from mpay.sip.message import Request


class PaymentServer:
    role = "ps"

    def __init__(self, registrar: Registrar) -> None:
        self.registrar = registrar
        self.handlers = {"REGISTER": registrar.register}

    def ack_received(self, request: Request, addr: Any) -> None:
        """ACKs of charged-by-time dialogs will arrive here; none exist yet."""

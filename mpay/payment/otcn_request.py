"""The OTCN request: a consumer's DMD asks the PS for a one-time credit number.

An authenticated MESSAGE with ``application/vnd.mpay.otcn-request+json``
(``{"cap": 5000}`` or ``{}``) to the PS; the 200 carries the OTCN in an
``application/vnd.mpay.otcn+json`` body.  The number stands in for the
consumer's telephone number at one merchant, once, for a short time.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.logger import Logger

from mpay.ledger.api import MAX_AMOUNT_MINOR
from mpay.payment.body import json_body
from mpay.payment.otcn import OTCN_LIFETIME_S, format_otcn
from mpay.sip.message import Request
from mpay.sip.transaction import ServerTransaction
from mpay.stores.otcn import OTCNExhausted

OTCN_REQUEST_CONTENT_TYPE = "application/vnd.mpay.otcn-request+json"
OTCN_CONTENT_TYPE = "application/vnd.mpay.otcn+json"
MAX_OTCN_REQUEST_BYTES = 256


def read_cap(request: Request) -> int | None:
    """The spending cap asked for, or ValueError with the reason phrase."""
    fields = json_body(request, OTCN_REQUEST_CONTENT_TYPE, MAX_OTCN_REQUEST_BYTES, "OTCN Request")
    cap = fields.get("cap")
    if cap is not None and (type(cap) is not int or not 0 < cap <= MAX_AMOUNT_MINOR):
        raise ValueError("Invalid Cap")
    return cap


class OTCNIssuer:
    log = Logger()

    def __init__(self, authenticate: Callable, store: Any, lifetime_s: int = OTCN_LIFETIME_S):
        self.authenticate = authenticate
        self.store = store
        self.lifetime_s = lifetime_s

    def __call__(self, txn: ServerTransaction, request: Request) -> None:
        self.authenticate(txn, request, lambda verified: self._authenticated(txn, request, verified))

    def _authenticated(self, txn: ServerTransaction, request: Request, verified: Any) -> None:
        try:
            cap = read_cap(request)
        except ValueError as exc:
            txn.respond_with(400, str(exc))
            return

        def issued(grant):
            body = json.dumps({"otcn": grant.otcn, "display": format_otcn(grant.otcn),
                               "cap": grant.cap, "expires_at": grant.expires_at}).encode()
            txn.respond_with(200, headers=[("Content-Type", OTCN_CONTENT_TYPE)], body=body)

        def failed(failure):
            if not failure.check(OTCNExhausted):
                self.log.failure("ps: OTCN issue failed", failure)
            if not txn.final:
                txn.respond_with(503, "OTCN Store Unavailable", headers=[("Retry-After", "5")])

        self.store.issue(verified.number, cap, self.lifetime_s).addCallbacks(issued, failed)

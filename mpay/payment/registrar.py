"""The PS registrar (thesis 3.4): a ticket holder tells where its device is now.

REGISTER carries the ticket and a fresh authenticator bound to this very
request; only then is number -> contact stored in the location store, for
Expires seconds.  The address the REGISTER came from is what is stored for
routing (behind NAT the Contact may name an address nobody can reach).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger

from mpay import e164
from mpay.auth.wire import digest_of
from mpay.auth.tickets import AUTHENTICATOR_HEADER, TICKET_HEADER
from mpay.auth.verifier import REFUSALS, TicketRefused, TicketVerifier, Verified
from mpay.sip.stream import transport_of
from mpay.sip.headers import parse_name_addr
from mpay.sip.message import ParseError, Request
from mpay.sip.transaction import ServerTransaction
from mpay.stores.location import (
    LOCATION_DEFAULT_EXPIRES_S, LOCATION_MAX_EXPIRES_S, LOCATION_MIN_EXPIRES_S, Binding,
    LocationStore,
)


def requested_expiry(request: Request) -> int | None:
    """Seconds asked for: the Contact's expires parameter, else Expires, else the default."""
    contact = request.headers.get("Contact")
    if contact is not None and contact.strip() != "*":
        try:
            value = parse_name_addr(contact).params.get("expires")
        except (ParseError, ValueError):
            value = None
        if value is not None:
            return int(value) if value.isdigit() else None
    header = request.headers.get("Expires")
    if header is None:
        return LOCATION_DEFAULT_EXPIRES_S
    header = header.strip()
    return int(header) if header.isdigit() else None


class Registrar:
    log = Logger()

    def __init__(self, verifier: TicketVerifier, locations: LocationStore, clock: Callable[[], float]):
        self.verifier = verifier
        self.locations = locations
        self.clock = clock
        # Called with (number, binding) after each successful binding: queued notices wait on it.
        self.on_registered: list[Callable[[str, Binding], None]] = []
        self.endpoint: Any = None
        self.shared_replay: Any = None   # with several PS processes: stores/replay.py

    def authenticate(self, txn: ServerTransaction, request: Request,
                     then: Callable[[Verified], Any], idempotent: bool = False) -> None:
        """Call ``then(verified)`` once a PS request passed every check; else answer it.

        The checks are the verifier's, then (several PS processes) the claim of
        the authenticator in the shared replay cache: a request re-sent to
        another process is refused there as it is here.  An *idempotent*
        request (a transfer: its ledger key gives a copy the first answer)
        skips the claim, so it needs no Redis round trip and works while Redis
        is away.
        """
        headers = request.headers
        try:
            verified = self.verifier.verify(headers.get(TICKET_HEADER), headers.get(AUTHENTICATOR_HEADER),
                                            txn.addr[0], digest_of(request), self.clock())
        except TicketRefused as refusal:
            extra = [("Retry-After", str(int(refusal.retry_after_s)))] if refusal.retry_after_s else []
            txn.respond_with(refusal.status, refusal.reason, headers=extra)
            return
        if self.shared_replay is None or idempotent:
            then(verified)
            return

        def claimed(fresh: bool) -> None:
            if not fresh:
                status, reason = REFUSALS["replayed"]
                txn.respond_with(status, reason)
                return
            try:
                then(verified)
            except Exception:
                self.log.failure("ps: {method} handler failed", method=request.method)
                if not txn.final:
                    txn.respond_with(500, "Server Internal Error")

        def unavailable(failure) -> None:
            self.log.warn("ps: replay cache unavailable: {why}", why=failure.getErrorMessage())
            if not txn.final:
                txn.respond_with(503, "Replay Cache Unavailable", headers=[("Retry-After", "1")])

        self.shared_replay.claim(verified.number, verified.nonce).addCallbacks(claimed, unavailable)

    def register(self, txn: ServerTransaction, request: Request) -> None:
        self.authenticate(txn, request, lambda verified: self._register(txn, request, verified))

    def _register(self, txn: ServerTransaction, request: Request, verified: Verified) -> None:
        try:
            number = e164.number_from_uri(request.to_addr.uri)
        except e164.InvalidNumber as exc:
            txn.respond_with(400, f"Invalid Number ({exc.reason})")
            return
        if number != verified.number:
            txn.respond_with(403, "Ticket Is For Another Number")
            return
        expires = requested_expiry(request)
        if expires is None:
            txn.respond_with(400, "Bad Expires")
            return
        contact = request.headers.get("Contact")
        if expires == 0 or (contact is not None and contact.strip() == "*"):
            done = defer.maybeDeferred(self.locations.remove, number)
            done.addCallback(lambda _: txn.respond_with(200))
            self._on_failure(done, txn)
            return
        if contact is None:
            txn.respond_with(400, "Missing Contact")
            return
        if expires < LOCATION_MIN_EXPIRES_S:
            txn.respond_with(423, headers=[("Min-Expires", str(LOCATION_MIN_EXPIRES_S))])
            return
        # Never past the ticket (the device must renew it first), never 0 (which means "removed").
        expires = max(1, min(expires, LOCATION_MAX_EXPIRES_S, int(verified.expires - self.clock())))
        try:
            contact_uri = parse_name_addr(contact).uri
        except (ParseError, ValueError):
            txn.respond_with(400, "Bad Contact")
            return
        host, port = txn.addr
        via, local = self.endpoint.holder_of(txn.addr) if self.endpoint else ("", "")
        binding = Binding(number, contact_uri, host, port, transport_of(txn.addr),
                          self.clock() + expires, via, local)
        done = defer.maybeDeferred(self.locations.bind, binding, expires)

        def bound(_):
            txn.respond_with(200, headers=[("Contact", f"<{contact_uri}>;expires={expires}"),
                                           ("Expires", str(expires))])
            self.log.debug("ps: {number} at {host}:{port} for {expires} s", number=number,
                           host=host, port=port, expires=expires)
            for hook in self.on_registered:
                hook(number, binding)

        done.addCallback(bound)
        self._on_failure(done, txn)

    def _on_failure(self, work: defer.Deferred, txn: ServerTransaction) -> None:
        def failed(failure):
            self.log.failure("ps: location store failed", failure)
            if not txn.final:
                txn.respond_with(503, "Location Store Unavailable", headers=[("Retry-After", "5")])

        work.addErrback(failed)

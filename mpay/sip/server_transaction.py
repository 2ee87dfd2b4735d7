"""RFC 3261 17.2 server transactions, sans-IO, and how a request finds its own.

A request received is answered from its transaction for as long as copies
may come (Timer J, kept by the layer as bytes once completed, ``linger.py``),
so the transaction user sees each request once.  The layer
(``transaction.py``) holds them and routes to them by :func:`server_key`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from mpay.sip.message import Request, Response, make_response
from mpay.sip.timing import INVITE_STYLE_METHODS, State

if TYPE_CHECKING:
    from mpay.sip.transaction import TransactionLayer


def server_key(request: Request) -> str:
    """RFC 17.2.3 matching: branch + sent-by + method (ACK matches INVITE).

    A string, the parts joined by spaces (none can hold one: tokens, a host, a port,
    a Call-ID the parser refused with blanks): completed transactions keep their keys
    for 32 s, and a tuple is an object the young collection walks at least once where
    a string is not (at 1,200 transfers a second that was a 5-12 ms pause every 2 s).
    """
    via = request.top_via
    assert via is not None, "the parser refuses a message without Via"
    # An ACK names no method of its own: it belongs to the INVITE-style transaction.
    method = "INVITE" if request.method == "ACK" or request.method in INVITE_STYLE_METHODS \
        else request.method
    branch = via.rfc3261_branch
    if branch is not None:
        return f"{branch} {via.host} {via.port} {method}"
    # RFC 2543 peers (or a bare cookie, RFC 4475 "badbranch"): match on dialog-ish identifiers.
    return f"2543 {request.call_id} {request.cseq[0]} {via.host} {via.port} {method}"


def branch_of(key: str) -> str:
    """The key without its method: what a CANCEL matches (RFC 9.2)."""
    return key.rpartition(" ")[0]


class ServerTransaction:
    """One request received and the responses given to it."""

    __slots__ = (
        "layer", "key", "request", "addr", "invite", "reliable", "state",
        "to_tag", "last_response", "_last_bytes", "_timer", "_interval", "_lifetime",
        "on_cancel", "_born",
    )

    def __init__(self, layer: "TransactionLayer", key: str, request: Request, addr: Any,
                 invite: bool, reliable: bool, to_tag: str):
        self.layer = layer
        self.key = key
        self.request: Request | None = request    # released once answered (Timer J)
        self.addr = addr
        self.invite = invite
        self.reliable = reliable
        self.to_tag = to_tag
        self.state = State.PROCEEDING if invite else State.TRYING
        self.last_response: Response | None = None
        self._last_bytes: bytes | None = None
        self._timer: Any = None
        self._interval = 0.0
        self._lifetime: Any = None
        self._born = 0          # the layer's sweep count when it began (non-INVITE)
        # Called when a CANCEL matches before the final response; default: 487.
        self.on_cancel: Callable[[ServerTransaction], None] | None = None

    @property
    def final(self) -> bool:
        return self.state not in (State.TRYING, State.PROCEEDING)

    def respond_with(self, status: int, reason: str | None = None,
                     headers: list[tuple[str, str]] | tuple = (), body: bytes = b"") -> Response | None:
        """Build the response to this request (RFC 8.2.6) and send it."""
        if self.final:      # a TU's second answer (and a non-INVITE's request is released)
            self.layer.stats["late_responses"] += 1
            return None
        request = self.request
        assert request is not None, "held until the final response"
        response = make_response(request, status, reason, to_tag=self.to_tag,
                                 headers=headers, body=body)
        self.respond(response)
        return response

    def respond(self, response: Response) -> None:
        if self.final:
            # A TU answering twice is a bug upstream; the peer already has its answer.
            self.layer.stats["late_responses"] += 1
            return
        request = self.request
        assert request is not None, "held until the final response"
        self.last_response = response
        self._last_bytes = data = response.to_bytes()
        self.layer.send(data, self.addr)
        self.layer.count_response(request.method, response.status)
        status = response.status
        if status < 200:
            self.state = State.PROCEEDING
            return
        self._cancel_timers()
        settings = self.layer.settings
        if not self.invite:
            self.state = State.COMPLETED
            # Timer J keeps only the response's bytes, in the layer's linger store: this
            # object (and the request it holds) is the TU's to drop now (linger.py).
            # RFC 3261 makes Timer J 0 on a stream, where nothing is retransmitted; we
            # keep the 64 x T1 of UDP there too, so that a duplicate (a peer's bug, or a
            # re-send on a new connection) is absorbed, never run twice.
            self.request = self.last_response = self.on_cancel = self._last_bytes = None
            self.layer._completed_server(self, data)
        elif status < 300:
            self.state = State.ACCEPTED
            self.layer._accepted[(request.call_id, request.cseq[0])] = self
            self._lifetime = self.layer.timers.start(64 * settings.t1_s, self._terminate)  # Timer L
            if not self.reliable:
                # The UAS core's 2xx retransmission (RFC 13.3.1.4), kept here for locality.
                self._interval = settings.t1_s
                self._timer = self.layer.timers.start(self._interval, self._retransmit_final)
        else:
            self.state = State.COMPLETED
            self._lifetime = self.layer.timers.start(64 * settings.t1_s, self._ack_timeout)  # Timer H
            if not self.reliable:
                self._interval = settings.t1_s
                self._timer = self.layer.timers.start(self._interval, self._retransmit_final)  # Timer G

    def _retransmit(self) -> None:
        """A retransmitted request: answer from the transaction, never from the TU."""
        self.layer.stats["retransmissions_absorbed"] += 1
        if self._last_bytes is not None and self.state in (State.PROCEEDING, State.COMPLETED, State.ACCEPTED):
            self.layer.send(self._last_bytes, self.addr)
            self.layer.stats["responses_resent"] += 1

    def _retransmit_final(self) -> None:
        if self.state not in (State.COMPLETED, State.ACCEPTED) or self._last_bytes is None:
            return
        self.layer.send(self._last_bytes, self.addr)
        self.layer.stats["responses_resent"] += 1
        self._interval = min(2 * self._interval, self.layer.settings.t2_s)
        self._timer = self.layer.timers.start(self._interval, self._retransmit_final)

    def _ack(self) -> None:
        if self.state is State.COMPLETED:
            self._cancel_timers()
            self.state = State.CONFIRMED
            self._after(0 if self.reliable else self.layer.settings.t4_s, self._terminate)  # Timer I
        elif self.state is State.CONFIRMED:
            self.layer.stats["retransmissions_absorbed"] += 1

    def _ack_2xx(self) -> None:
        """The ACK of our 2xx arrived: stop retransmitting, keep absorbing until Timer L."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _ack_timeout(self) -> None:
        self.layer.stats["ack_timeouts"] += 1
        self._terminate()

    def _after(self, delay_s: float, callback: Callable[[], None]) -> None:
        if delay_s <= 0:
            callback()
        else:
            self._timer = self.layer.timers.start(delay_s, callback)

    def _cancel_timers(self) -> None:
        for handle in (self._timer, self._lifetime):
            if handle is not None:
                handle.cancel()
        self._timer = self._lifetime = None

    def _terminate(self) -> None:
        if self.state is State.TERMINATED:
            return
        self._cancel_timers()
        self.state = State.TERMINATED
        self.layer._forget_server(self)

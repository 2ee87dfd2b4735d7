"""RFC 3261 17.1 client transactions, sans-IO.

The AS sends REFER to a DMD and the PS forwards notices and charge requests;
over UDP those requests must be retransmitted until answered and given up at
a definite time, so the caller's own state machine (the design's Timers A/C)
can rely on one answer: a response, or ``on_timeout``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from mpay.sip.message import Headers, Request, Response
from mpay.sip.timing import INVITE_STYLE_METHODS, State

if TYPE_CHECKING:
    from mpay.sip.transaction import TransactionLayer


_DEADLINE_EPSILON_S = 1e-9
"""What a sum of retransmission waits may miss Timer F by in floating point."""


def _released(*_: Any) -> None:
    """The callbacks of a transaction that has had its answer: nothing more is due."""


class ClientTransaction:
    """One request sent by us, retransmitted over UDP until answered."""

    __slots__ = (
        "layer", "key", "request", "addr", "invite", "reliable", "state",
        "on_response", "on_timeout", "_bytes", "_timer", "_interval", "_deadline", "_ack_bytes",
        "_left_s", "_waited_s",
    )

    def __init__(self, layer: "TransactionLayer", request: Request, addr: Any,
                 on_response: Callable[[Response], None], on_timeout: Callable[[], None],
                 reliable: bool):
        via = request.top_via
        branch = via.branch if via is not None else None
        assert branch, "a client transaction needs a branch in its top Via"
        self.layer = layer
        self.request: Request | None = request    # released once answered
        self.key = f"{branch} {request.cseq[1]}"      # a string: see server_key
        self.addr = addr
        self.invite = request.method in INVITE_STYLE_METHODS
        self.reliable = reliable
        self.state = State.CALLING if self.invite else State.TRYING
        self.on_response = on_response
        self.on_timeout = on_timeout
        self._bytes: bytes | None = request.to_bytes()
        self._timer: Any = None
        self._deadline: Any = None
        self._interval = 0.0
        self._ack_bytes: bytes | None = None
        self._left_s = self._waited_s = 0.0

    def start(self) -> None:
        settings = self.layer.settings
        assert self._bytes is not None
        self.layer.send(self._bytes, self.addr)
        if self.reliable:
            # Timer F (non-INVITE) or Timer B (INVITE) alone: a stream retransmits for us.
            self._deadline = self.layer.timers.start(64 * settings.t1_s, self._timeout)
        else:
            # One timer, not two: Timer E / A, its last wait cut short to end at Timer F / B.
            self._left_s = 64 * settings.t1_s
            self._interval = settings.t1_s
            self._arm(self._interval)

    def _arm(self, wait_s: float) -> None:
        self._waited_s = min(wait_s, self._left_s)
        self._timer = self.layer.timers.start(self._waited_s, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._left_s -= self._waited_s
        if self._left_s <= _DEADLINE_EPSILON_S:
            self._timeout()
        else:
            self._retransmit()

    def _retransmit(self) -> None:
        if self.state not in (State.TRYING, State.CALLING, State.PROCEEDING):
            return
        if (self.invite and self.state is State.PROCEEDING) or self._bytes is None:
            return
        self.layer.send(self._bytes, self.addr)
        self.layer.stats["requests_resent"] += 1
        settings = self.layer.settings
        if self.invite:
            self._interval = 2 * self._interval
        elif self.state is State.PROCEEDING:
            self._interval = settings.t2_s
        else:
            self._interval = min(2 * self._interval, settings.t2_s)
        self._arm(self._interval)

    def receive(self, response: Response) -> None:
        status = response.status
        state = self.state
        if state is State.TERMINATED:
            return
        if state is State.COMPLETED:
            # A retransmitted final response: for INVITE re-send our ACK, else absorb.
            if self._ack_bytes is not None:
                self.layer.send(self._ack_bytes, self.addr)
            self.layer.stats["retransmissions_absorbed"] += 1
            return
        if state is State.ACCEPTED:
            if 200 <= status < 300:
                self.on_response(response)  # the TU ACKs every 2xx retransmission
            return
        if status < 200:
            self.state = State.PROCEEDING
            if self.invite and self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.on_response(response)
            return
        self._stop_timers()
        settings = self.layer.settings
        if self.invite and status < 300:
            self.state = State.ACCEPTED
            self._timer = self.layer.timers.start(64 * settings.t1_s, self._terminate)  # Timer M
        else:
            self.state = State.COMPLETED
            if self.invite:
                self._ack_bytes = self._make_ack(response).to_bytes()
                self.layer.send(self._ack_bytes, self.addr)
                if not self.reliable:   # Timer D
                    self._timer = self.layer.timers.start(max(32.0, 64 * settings.t1_s),
                                                          self._terminate)
            elif not self.reliable:
                # Timer K keeps the key in the layer (linger.py), not this object.
                self.layer._completed_client(self)
        on_response = self.on_response
        if self.state is State.COMPLETED:
            # Timer K/D keep it only to absorb copies of the answer: let go of the request
            # and the caller's callbacks (and the Deferreds they hold) now, not seconds later.
            self.request = self._bytes = None
            self.on_response = self.on_timeout = _released
        on_response(response)
        if self.state is State.COMPLETED and self._timer is None:
            self._terminate()

    def _make_ack(self, response: Response) -> Request:
        """RFC 17.1.1.3: the ACK for a non-2xx final belongs to this transaction."""
        original = self.request
        assert original is not None, "held until the final response"
        headers = Headers()
        headers.add("Via", original.headers.getall("Via")[0])
        for name in ("Route",):
            for value in original.headers.getall(name):
                headers.add(name, value)
        headers.add("From", original.headers.get("From") or "")
        headers.add("To", response.headers.get("To") or "")
        headers.add("Call-ID", original.call_id or "")
        headers.add("CSeq", f"{original.cseq[0]} ACK")
        headers.add("Max-Forwards", "70")
        return Request("ACK", original.uri, headers)

    def _timeout(self) -> None:
        # Timer B ends an INVITE only while Calling: once the peer said 1xx, a person
        # may take their time (the TU's own timer decides); Timer F ends a non-INVITE.
        if self.state in (State.TRYING, State.CALLING) or (
                self.state is State.PROCEEDING and not self.invite):
            self.layer.stats["client_timeouts"] += 1
            self._terminate()
            self.on_timeout()
        else:
            self._deadline = None

    def _stop_timers(self) -> None:
        for handle in (self._timer, self._deadline):
            if handle is not None:
                handle.cancel()
        self._timer = self._deadline = None

    def _terminate(self) -> None:
        self._stop_timers()
        self.state = State.TERMINATED
        self.layer._forget_client(self)

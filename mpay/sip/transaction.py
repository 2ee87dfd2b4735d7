"""RFC 3261 section 17 transactions, sans-IO.

A transaction is what makes UDP safe for money: a retransmitted request is
matched to the transaction it belongs to and answered from there, so the
transaction user (the AS or PS core) sees every request exactly once.

The layer never touches a socket or a clock.  It is given

- ``timers``: anything with ``start(delay_s, callback, *args) -> handle`` and
  ``handle.cancel()`` (the time wheel in production, the same wheel driven by
  ``task.Clock`` in tests);
- ``send(data: bytes, addr)``: the transport's write;
- ``tu``: the transaction user, see :class:`TransactionUser`.

Timer names below (E, F, G, H, I, J, K, B, D, L, M) are RFC 3261/6026's
transaction timers.  They are unrelated to the design's enrolment and payment
Timers A/C/D/F, which live with the state machines that own them.

State machines (RFC 3261 figures 5-8, with RFC 6026's Accepted state):

    server non-INVITE:  Trying -> Proceeding -> Completed --J--> Terminated
    server INVITE:      Proceeding -> Completed --ACK--> Confirmed --I--> Terminated
                                   \\-> Accepted (2xx, retransmitted until ACK) --L--> Terminated
    client non-INVITE:  Trying -> Proceeding -> Completed --K--> Terminated
    client INVITE:      Calling -> Proceeding -> Completed --D--> Terminated
                                              \\-> Accepted --M--> Terminated
"""

from __future__ import annotations

from math import ceil
from typing import Any, Callable, Protocol

from mpay.sip import useragent
from mpay.sip.client_transaction import ClientTransaction
from mpay.sip.linger import Linger
from mpay.sip.message import Request, Response, make_response
from mpay.sip.server_transaction import ServerTransaction, branch_of, server_key
from mpay.sip.overload import SHED_RETRY_AFTER_S, OverloadGuard
from mpay.sip.timing import INVITE_STYLE_METHODS, TimerSettings

MAX_TRANSACTIONS = 400_000
"""Transactions one endpoint holds, completed ones included; beyond it, 503.

A non-INVITE one is kept 64 x T1 = 32 s after its answer, so the PS holds
~96,000 at issue 7's 3,000 transfers a second: this bounds memory (~1 kB
each when completed) with room for a burst four times that."""

# Retry-After sent with the 503 that protects the transaction table, seconds.
OVERLOAD_RETRY_AFTER_S = 5
UNANSWERED_SWEEP_S = 1.0
"""How often non-INVITE server transactions that the TU never answered are looked
for; one is ended between 64 x T1 and a sweep later (Timer F's span: by then the
client has given up).  A sweep instead of a timer each: a timer started and
cancelled a transfer was 1.9 % of the PS's instructions."""


class TransactionUser(Protocol):
    def request_received(self, txn: "ServerTransaction", request: Request) -> None:
        """A new request; answer with ``txn.respond`` now or later."""

    def ack_received(self, request: Request, addr: Any) -> None:
        """An ACK for a 2xx (its own transaction, RFC 17.1.1.3) or a stray ACK."""


class TransactionLayer:
    """All transactions of one SIP endpoint (the AS or the PS)."""

    def __init__(self, timers: Any, send: Callable[[bytes, Any], None], tu: TransactionUser,
                 settings: TimerSettings = TimerSettings(),
                 max_transactions: int = MAX_TRANSACTIONS,
                 new_tag: Callable[[], str] | None = None,
                 count_response: Callable[[str, int], None] | None = None):
        self.timers = timers
        self.send = send
        self.tu = tu
        self.settings = settings
        self.max_transactions = max_transactions
        self.new_tag = new_tag or useragent.new_tag
        self.count_response = count_response or (lambda method, status: None)
        self.server: dict[str, ServerTransaction] = {}
        self.client: dict[str, ClientTransaction] = {}
        # The live transaction of each branch, or the key of an answered one (Timer J).
        self._by_branch: dict[str, ServerTransaction | str] = {}
        self._accepted: dict[tuple, ServerTransaction] = {}
        # Completed non-INVITE transactions as data (linger.py): Timer J on the server
        # side, key -> the final response's bytes (with the flow, when not UDP); Timer K
        # on the client side, key -> None.
        self.completed = Linger(timers, 64 * settings.t1_s, self._expired_server)
        self.client_completed = Linger(timers, settings.t4_s)
        self.guard: OverloadGuard | None = None   # overload control (overload.py), if any
        self._sweeps = 0                          # of unanswered non-INVITE transactions
        self._sweep: Any = None
        self._unanswered_rounds = ceil(64 * settings.t1_s / UNANSWERED_SWEEP_S - 1e-9)
        self.stats = {
            "retransmissions_absorbed": 0, "responses_resent": 0, "ack_timeouts": 0,
            "late_responses": 0, "overload_refusals": 0, "stray_responses": 0,
            "client_timeouts": 0, "requests_resent": 0,
        }
        # Which methods get INVITE-style server transactions (the PS adds dialog-opening ones).
        self.is_invite_style: Callable[[Request], bool] = \
            lambda request: request.method in INVITE_STYLE_METHODS

    # -- server side -------------------------------------------------------
    def receive_request(self, request: Request, addr: Any, reliable: bool = False) -> None:
        key = server_key(request)
        txn = self.server.get(key)
        method = request.method
        if txn is not None:
            if method == "ACK":
                txn._ack()
            else:
                txn._retransmit()
            return
        done = self.completed.get(key)
        if done is not None:        # a copy of a request already answered: Timer J runs
            self.stats["retransmissions_absorbed"] += 1
            # Over UDP only the bytes are kept: the copy's own response destination is
            # the original's (the same Via, RFC 18.2.2), or where the peer is now.
            if type(done) is bytes:
                self.send(done, addr)
            else:
                self.send(*done)
            self.stats["responses_resent"] += 1
            return
        if method == "ACK":
            accepted = self._accepted.get((request.call_id, request.cseq[0]))
            if accepted is not None:
                accepted._ack_2xx()
            self.tu.ack_received(request, addr)
            return
        full = len(self.server) + len(self.completed) >= self.max_transactions
        if full or (self.guard is not None and self.guard.refuses(method)):
            # Stateless: no transaction is made for what is refused (RFC 3261 21.5.4).
            self.stats["overload_refusals"] += 1
            retry_after_s = OVERLOAD_RETRY_AFTER_S if full else SHED_RETRY_AFTER_S
            response = make_response(request, 503, headers=[("Retry-After", str(retry_after_s))])
            self.send(response.to_bytes(), addr)
            self.count_response(method, 503)
            return
        txn = ServerTransaction(self, key, request, addr, self.is_invite_style(request),
                                reliable, self.new_tag())
        self.server[key] = txn
        if method == "CANCEL":
            self._cancel(txn)
            return
        self._by_branch[branch_of(key)] = txn
        if txn.invite:
            # RFC 17.2.1: tell the client at once that its request is here (stops Timer A).
            txn.respond_with(100)
        else:
            # Bound a non-INVITE transaction whose TU never answers (no RFC timer covers it).
            txn._born = self._sweeps
            if self._sweep is None:
                self._sweep = self.timers.start(UNANSWERED_SWEEP_S, self._end_unanswered)
        self.tu.request_received(txn, request)

    def _end_unanswered(self) -> None:
        """End the non-INVITE server transactions unanswered for 64 x T1 (sweeps are
        counted, not timed: a stalled reactor makes them live longer, never shorter)."""
        self._sweeps = sweeps = self._sweeps + 1
        rounds = self._unanswered_rounds
        doomed, waiting = [], False
        for txn in self.server.values():
            if not txn.invite:
                if sweeps - txn._born > rounds:
                    doomed.append(txn)
                else:
                    waiting = True
        for txn in doomed:
            txn._terminate()
        self._sweep = (self.timers.start(UNANSWERED_SWEEP_S, self._end_unanswered)
                       if waiting else None)

    def _cancel(self, cancel_txn: ServerTransaction) -> None:
        """RFC 9.2: CANCEL matches the transaction with the same branch."""
        target = self._by_branch.get(branch_of(cancel_txn.key))
        if target is None:
            cancel_txn.respond_with(481)
            return
        cancel_txn.respond_with(200)
        if isinstance(target, ServerTransaction) and not target.final:
            if target.on_cancel is not None:
                target.on_cancel(target)
            else:
                target.respond_with(487)

    def _completed_server(self, txn: ServerTransaction, data: bytes) -> None:
        """A non-INVITE answered: from now on its key and its response's bytes are all of it."""
        key = txn.key
        del self.server[key]
        branch = branch_of(key)
        if self._by_branch.get(branch) is txn:
            self._by_branch[branch] = key    # a CANCEL still matches it (RFC 9.2: 200, no effect)
        addr = txn.addr
        # A (host, port) is the copy's own destination again: bytes alone, which the
        # collector never tracks.  A flow (TCP, a peer) is kept with them.
        self.completed.add(key, data if type(addr) is tuple else (data, addr))

    def _expired_server(self, key: str, done: Any) -> None:
        """Timer J ran out."""
        branch = branch_of(key)
        if self._by_branch.get(branch) == key:
            del self._by_branch[branch]

    def _forget_server(self, txn: ServerTransaction) -> None:
        self.server.pop(txn.key, None)
        branch = branch_of(txn.key)
        if self._by_branch.get(branch) is txn:
            del self._by_branch[branch]
        if txn.invite and txn.request is not None:      # an INVITE's is never released
            accepted_key = (txn.request.call_id, txn.request.cseq[0])
            if self._accepted.get(accepted_key) is txn:
                del self._accepted[accepted_key]

    # -- client side -------------------------------------------------------
    def request(self, request: Request, addr: Any,
                on_response: Callable[[Response], None],
                on_timeout: Callable[[], None],
                reliable: bool = False) -> ClientTransaction:
        """Send *request* (its top Via must carry a fresh branch) as a client transaction."""
        txn = ClientTransaction(self, request, addr, on_response, on_timeout, reliable)
        self.client[txn.key] = txn
        txn.start()
        return txn

    def receive_response(self, response: Response, addr: Any) -> None:
        via = response.top_via
        assert via is not None, "the parser refuses a message without Via"
        key = f"{via.branch} {response.cseq[1]}"
        txn = self.client.get(key)
        if txn is None:
            if key in self.client_completed:
                self.stats["retransmissions_absorbed"] += 1     # Timer K runs
            else:
                self.stats["stray_responses"] += 1
            return
        txn.receive(response)

    def _forget_client(self, txn: ClientTransaction) -> None:
        if self.client.get(txn.key) is txn:
            del self.client[txn.key]

    def _completed_client(self, txn: ClientTransaction) -> None:
        """A non-INVITE answered over UDP: Timer K keeps only its key, to absorb copies."""
        if txn.key not in self.client_completed:
            self.client_completed.add(txn.key, None)

    def counts(self) -> dict[str, int]:
        """Live transactions by side and kind, for the metrics page and the manhole."""
        out = {"server_invite": 0, "server_non_invite": 0, "client_invite": 0, "client_non_invite": 0}
        for txn in self.server.values():
            out["server_invite" if txn.invite else "server_non_invite"] += 1
        for ctxn in self.client.values():
            out["client_invite" if ctxn.invite else "client_non_invite"] += 1
        out["server_non_invite"] += len(self.completed)
        out["client_non_invite"] += len(self.client_completed)
        return out

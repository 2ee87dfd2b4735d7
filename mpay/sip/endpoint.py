"""One SIP server's receive path: bytes -> message -> transaction -> core.

Everything common to the AS and the PS lives here, so each of them only
names the methods it serves: malformed input is answered with 400 (or
dropped when no response can be addressed, RFC 3261 18.3/16.3), OPTIONS is
answered for every role, unknown methods get 501 and known-but-unserved ones
405 (RFC 8.2.1), unsupported Require options 420 (8.2.2.3).  A handler that
raises is answered with 500 and logged: no input may stop the server.

Counters are plain ``collections.Counter`` objects read by the metrics page at
scrape time, which keeps the per-message cost to a dictionary increment.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Protocol

from twisted.internet import defer
from twisted.logger import Logger

from mpay.sip import useragent
from mpay.sip.message import ParseError, Request, make_response, parse
from mpay.sip.peers import MARKER, Relayed
from mpay.sip.timing import TimerSettings
from mpay.sip.transaction import MAX_TRANSACTIONS, ServerTransaction, TransactionLayer

# RFC 3261 and the extensions peers commonly send; anything else is unknown (501).
KNOWN_METHODS = frozenset({
    "ACK", "BYE", "CANCEL", "INFO", "INVITE", "MESSAGE", "NOTIFY", "OPTIONS", "PRACK",
    "PUBLISH", "REFER", "REGISTER", "SUBSCRIBE", "UPDATE", "RECEIVE",
})
ALWAYS_ALLOWED = ("ACK", "CANCEL", "OPTIONS")
DEFAULT_SIP_PORT = 5060
MAX_FLOWS = 10_000
"""Stream connections one endpoint keeps (all its TCP and TLS listeners together)."""

Handler = Callable[[ServerTransaction, Request], None]


class SIPTimeout(Exception):
    """A client transaction got no final response (Timer F/B): the peer is unreachable."""


class Core(Protocol):
    """What a server (AS or PS) gives the endpoint: its handlers by method."""

    handlers: dict[str, Handler]

    def ack_received(self, request: Request, addr: Any) -> None: ...


def response_destination(request: Request, source: Any) -> Any:
    """RFC 3261 18.2.2 with RFC 3581 rport: where the responses to *request* go.

    *source* is a UDP (host, port), a Flow or a Relayed: never typed ``tuple[str,
    int]``, which compiled code would unbox to a plain pair.

    Stamps ``received``/``rport`` on the top Via when the sender is not where
    its Via says (NAT), as the RFCs require, and only then: the usual case
    costs no re-serialisation.
    """
    host, port = source
    via = request.top_via
    assert via is not None, "the parser refuses a request without a Via"
    rport = via.rport
    if via.host != host or rport == "":
        via.params["received"] = host
        if rport is not None:
            via.params["rport"] = str(port)
        request.set_top_via(via)
        if rport is not None:
            return source
    if getattr(source, "reliable", False):
        return source   # a stream: back over the connection the request came on (18.2.2)
    if isinstance(source, Relayed):
        return source.moved(host, via.port or DEFAULT_SIP_PORT)
    return (host, via.port or DEFAULT_SIP_PORT)


class SIPEndpoint:
    """The transaction user of one listener; delegates methods to its core."""

    log = Logger()

    def __init__(self, role: str, core: Core, timers: Any,
                 settings: TimerSettings = TimerSettings(),
                 max_transactions: int = MAX_TRANSACTIONS):
        self.role = role
        self.core = core
        # Every message leaves through write(): UDP datagrams through udp_write (set by the
        # UDP listener), stream messages over their flow's connection.
        self.write: Callable[[bytes, Any], None] = self._route
        self.udp_write: Callable[[bytes, Any], None] = self._not_listening
        # What the listeners hand each message to (data, source[, relayed]): receive(), or
        # what stands in front of it (a recorder in tests, the lean payee's answerer).
        self.datagram_received: Callable[..., None] = self.receive
        self.flows: dict[tuple[str, str, int], Any] = {}   # (transport, host, port) -> Flow
        self.max_flows = MAX_FLOWS
        self.stream_ports: dict[str, int] = {}            # transport -> our listening port
        self.stream_errors: Counter = Counter()          # why connections were closed
        # A device's endpoint opens streams itself: connector(flow) -> Deferred firing
        # with the live flow.  A server's has none: it never connects out.
        self.connector: Callable[[Any], defer.Deferred] | None = None
        self.flow_lost: list[Callable[[Any], None]] = []   # called with each closed flow
        # Our address as peers should see it in Via and Contact; set by the transport.
        self.sent_by: tuple[str, int] | None = None
        # The peer relay (peers.py) when several PS instances share the devices; this
        # instance's name then ends every branch and tag it makes.
        self.relay: Any = None
        self.instance = ""
        self._suffix = ""       # "~<instance>" once it has peers
        self.requests: Counter = Counter()     # method -> received (retransmissions included)
        self.responses: Counter = Counter()    # (method, status) -> sent by a transaction
        self.parse_errors: Counter = Counter()  # "answered" | "dropped"
        self.send_errors = 0
        self.layer = TransactionLayer(timers, self.send, self, settings, max_transactions,
                                      new_tag=self.new_tag, count_response=self._count_response)
        allowed = set(core.handlers) | set(ALWAYS_ALLOWED)
        self.allow = ", ".join(sorted(allowed))

    def _not_listening(self, data: bytes, addr: Any) -> None:
        raise RuntimeError("SIPEndpoint used before a transport was attached")

    # -- identifiers and the peer relay (peers.py) -----------------------------
    def new_branch(self) -> str:
        return useragent.new_branch() + self._suffix

    def new_tag(self) -> str:
        return useragent.new_tag() + self._suffix

    def join_peers(self, relay: Any) -> None:
        """Share the devices with other instances: mark our identifiers, relay theirs."""
        self.relay, self.instance = relay, relay.instance
        self._suffix = MARKER + relay.instance

    def local_address(self, transport: str) -> str:
        """The server side of our flows over *transport*, as bindings record it."""
        if transport == "UDP":
            host, port = self.sent_by or ("", 0)
        else:
            host, port = (self.sent_by or ("", 0))[0], self.stream_ports.get(transport, 0)
        return f"{host}:{port}"

    def holder_of(self, addr: Any) -> tuple[str, str]:
        """(instance, server side) of the flow a message came on, as bindings record it;
        ("", "") for a server alone."""
        if self.relay is None:
            return "", ""
        if isinstance(addr, Relayed):
            return addr.via, addr.local
        return self.instance, self.local_address(getattr(addr, "transport", "UDP"))

    def resolve(self, addr: Any) -> Any:
        """A flow another instance holds, as this one must reach it: directly when it
        is ours or we send from the same UDP address, else (a Relayed) through it."""
        if not isinstance(addr, Relayed):
            return addr
        if addr.via == self.instance or (addr.transport == "UDP" and
                                         addr.local == self.local_address("UDP")):
            if addr.transport == "UDP":
                return (addr[0], addr[1])
            from mpay.sip.stream import Flow   # stream.py builds on this module
            return self.flows.get((addr.transport, addr[0], addr[1]),
                                  Flow(addr[0], addr[1], addr.transport))
        if self.relay is None:
            raise ConnectionError(f"{addr!r} is held by another instance and we have no relay")
        return addr

    def write_local(self, data: bytes, host: str, port: int, transport: str) -> None:
        """A peer's OUT frame: write on our flow to (host, port); gone flows drop it."""
        target = (host, port) if transport == "UDP" else self.flows.get((transport, host, port))
        if target is None:
            self.stream_errors["relayed_flow_gone"] += 1
            return
        self.send(data, target)

    # -- flows: the stream connections (stream.py) ---------------------------
    def add_flow(self, flow: Any) -> bool:
        if len(self.flows) >= self.max_flows:
            return False
        self.flows[flow.key] = flow
        return True

    def remove_flow(self, flow: Any) -> None:
        key = flow.key
        if self.flows.get(key) is flow:
            del self.flows[key]
            for hook in list(self.flow_lost):
                hook(flow)

    def close_flows(self, transport: str | None = None) -> defer.Deferred:
        """Close every connection (of *transport*); fires once all are gone."""
        closing = [flow.connection.close() for flow in list(self.flows.values())
                   if transport in (None, flow.transport)]
        return defer.gatherResults(closing, consumeErrors=True)

    def live(self, addr: Any) -> Any:
        """The live flow for a stream address (recalled ones included), or None; UDP: *addr*."""
        transport = getattr(addr, "transport", "UDP")
        if transport == "UDP" or isinstance(addr, Relayed):
            return addr
        connection = getattr(addr, "connection", None)
        if connection is not None and connection.connected:
            return addr
        return self.flows.get((transport, addr[0], addr[1]))

    def _route(self, data: bytes, addr: Any) -> None:
        if isinstance(addr, Relayed):
            addr = self.resolve(addr)
            if isinstance(addr, Relayed):
                self.relay.relay_out(data, addr)
                return
        if getattr(addr, "transport", "UDP") == "UDP":
            self.udp_write(data, addr)
            return
        flow = self.live(addr)
        if flow is None:
            raise ConnectionError(f"no {addr.transport} connection to {addr[0]}:{addr[1]}")
        flow.connection.write(data)

    def send(self, data: bytes, addr: Any) -> None:
        try:
            self.write(data, addr)
        except OSError as exc:
            # An ICMP error or a full socket buffer is the network's answer, not a crash.
            self.send_errors += 1
            self.log.warn("{role}: send to {addr} failed: {error}", role=self.role, addr=addr, error=exc)

    def send_request(self, request: Request, addr: Any,
                     on_provisional: Callable[[Any], None] | None = None) -> defer.Deferred:
        """Send *request* as a client transaction; fires with its final response.

        Fails with :class:`SIPTimeout` when the transaction gives up (64 x T1).
        """
        result: defer.Deferred = defer.Deferred()

        def final(response: Any) -> None:
            if not result.called:
                result.callback(response)

        def failed(reason: str) -> None:
            if not result.called:
                result.errback(SIPTimeout(reason))

        self.start_request(request, addr, final, failed, on_provisional)
        return result

    def start_request(self, request: Request, addr: Any, on_final: Callable[[Any], None],
                      on_failed: Callable[[str], None],
                      on_provisional: Callable[[Any], None] | None = None) -> None:
        """``send_request`` without a Deferred, for the hot path: *on_final* gets the
        final response (again for each 2xx copy of an INVITE), *on_failed* the reason
        the transaction gave up or never started."""
        addr = self.resolve(addr)
        reliable = getattr(addr, "reliable", False)
        if reliable:
            flow = self.live(addr)
            if flow is None and self.connector is not None:   # a device: connect, then send
                def connected(flow: Any) -> None:
                    self.start_request(request, flow, on_final, on_failed, on_provisional)

                def unconnected(failure: Any) -> None:
                    on_failed(failure.getErrorMessage() if failure.check(SIPTimeout) else
                              f"cannot connect to {addr!r}: {failure.getErrorMessage()}")

                self.connector(addr).addCallback(connected).addErrback(unconnected)
                return
            if flow is None:   # never over another transport: the device is unreachable
                on_failed(f"no {addr.transport} connection to {addr[0]}:{addr[1]}")
                return
            via = request.top_via
            assert via is not None, "a request we send has our Via"
            if via.transport != flow.transport:   # the transport fills in its Via (18.1.1)
                via.transport = flow.transport
                if flow.transport in self.stream_ports:
                    via.port = self.stream_ports[flow.transport]
                request.set_top_via(via)
            addr = flow

        def on_response(response: Any) -> None:
            if response.status >= 200:
                on_final(response)
            elif on_provisional is not None:
                on_provisional(response)

        def on_timeout() -> None:
            on_failed(f"no answer to {request.method} from {addr[0]}:{addr[1]}")

        self.layer.request(request, addr, on_response, on_timeout, reliable=reliable)

    def _count_response(self, method: str, status: int) -> None:
        self.responses[(method if method in KNOWN_METHODS else "other", status)] += 1

    def receive(self, data: bytes, addr: Any, relayed: bool = False) -> None:
        try:
            message = parse(data)
        except ParseError as exc:
            self._malformed(exc, addr)
            return
        try:
            if self.relay is not None and not relayed:
                owner = self.relay.owner(message)
                if owner is not None:   # another instance's transaction or dialog
                    self.relay.relay_in(owner, data, addr)
                    return
            if isinstance(message, Request):
                method = message.method
                self.requests[method if method in KNOWN_METHODS else "other"] += 1
                self.layer.receive_request(message, response_destination(message, addr),
                                           reliable=getattr(addr, "reliable", False))
            else:
                self.layer.receive_response(message, addr)
        except Exception:
            # A bug on one message must not take the listener down; it is logged loudly.
            self.log.failure("{role}: unhandled error on a message from {addr}", role=self.role, addr=addr)

    def _malformed(self, exc: ParseError, addr: Any) -> None:
        request = exc.message
        if request is None or request.method == "ACK":
            self.parse_errors["dropped"] += 1
            self.log.debug("{role}: dropped malformed datagram from {addr}: {reason}",
                           role=self.role, addr=addr, reason=exc.reason)
            return
        self.parse_errors["answered"] += 1
        try:
            destination = response_destination(request, addr)
            response = make_response(request, exc.status, exc.reason)
            self.send(response.to_bytes(), destination)
        except Exception:
            self.parse_errors["unanswerable"] += 1
            self.log.failure("{role}: could not answer a malformed request from {addr}",
                             role=self.role, addr=addr)
            return
        self._count_response(request.method, exc.status)

    # -- TransactionUser -----------------------------------------------------
    def request_received(self, txn: ServerTransaction, request: Request) -> None:
        method = request.method
        require = request.headers.getall("Require")
        if require and method != "CANCEL":
            # We support no option tags yet: refuse rather than half-understand (RFC 8.2.2.3).
            txn.respond_with(420, headers=[("Unsupported", ", ".join(require))])
            return
        handler = self.core.handlers.get(method)
        if handler is None:
            if method == "OPTIONS":
                txn.respond_with(200, headers=[("Allow", self.allow), ("Accept", "application/sdp"),
                                               ("Supported", "")])
            elif method in KNOWN_METHODS:
                txn.respond_with(405, headers=[("Allow", self.allow)])
            else:
                txn.respond_with(501, headers=[("Allow", self.allow)])
            return
        try:
            handler(txn, request)
        except Exception:
            self.log.failure("{role}: {method} handler failed", role=self.role, method=method)
            if not txn.final:
                txn.respond_with(500, "Server Internal Error")

    def ack_received(self, request: Request, addr: Any) -> None:
        self.core.ack_received(request, addr)

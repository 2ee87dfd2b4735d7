"""SIP over TCP and TLS (RFC 3261 section 18): framing, flows, listeners and connectors.

On a stream a message ends where its Content-Length says, so the header
block must carry one (18.3); a message that does not is a broken stream,
and the connection is closed: there is no telling where the next message
would start.  Between messages a double CRLF is a keep-alive ping, answered
with one CRLF (RFC 5626 3.5.1); a lone CRLF is the pong, ignored.

A **flow** is the peer at the other end of one connection.  :class:`Flow`
compares and unpacks as the ``(host, port)`` every other layer knows, and
also names its transport and connection: a response to a request goes back
over the connection it came on (18.2.2), and a request to a device that
registered over a stream goes over the connection it registered on (the
registrar keeps the transport; the endpoint keeps the live connections).
A flow whose connection is gone is unreachable: nothing falls back to UDP,
so a device registered over TLS is only ever sent to over TLS.

Every connection's memory is bounded (``MAX_STREAM_HEADER_BYTES`` +
``MAX_STREAM_BODY_BYTES``), and so is the number of connections.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from zope.interface import implementer

from mpay.sip.endpoint import SIPEndpoint
from mpay.sip.peers import Relayed

MAX_STREAM_HEADER_BYTES = 16 * 1024
"""Longest header block on a stream; past it the peer is not speaking SIP to us."""

MAX_STREAM_BODY_BYTES = 64 * 1024
"""Largest Content-Length accepted on a stream (a payment body is a few hundred bytes)."""

MAX_STREAM_CONNECTIONS = 10_000
"""Connections one listener keeps; a connection past this is closed at once."""

STREAM_IDLE_TIMEOUT_S = 600.0
"""A connection with no traffic (keep-alive pings count) this long is closed."""

KEEPALIVE_INTERVAL_S = 95.0
"""A device's keep-alive ping period on a stream (RFC 5626 4.4.1 suggests 95 to 120 s)."""

KEEPALIVE_PING = b"\r\n\r\n"
KEEPALIVE_PONG = b"\r\n"
STREAM_TRANSPORTS = ("TCP", "TLS")

_CONTENT_LENGTH = re.compile(rb"^(?:content-length|l)[ \t]*:[ \t]*([0-9]+)[ \t]*\r?$",
                             re.IGNORECASE | re.MULTILINE)


class FramingError(Exception):
    """The byte stream cannot be cut into SIP messages; the connection must close.

    ``kind`` names the problem for the counters.
    """

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


class StreamFramer:
    """Cuts a byte stream into SIP messages; sans-IO (``feed`` bytes, get messages back).

    ``feed`` returns (messages, pings): the complete messages in order, and how
    many keep-alive pings arrived (each wants one pong).  What is left over is
    at most one partial message, within the limits above.
    """

    def __init__(self, max_header_bytes: int = MAX_STREAM_HEADER_BYTES,
                 max_body_bytes: int = MAX_STREAM_BODY_BYTES):
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> tuple[list[bytes], int]:
        buffer = self._buffer
        buffer += data
        messages: list[bytes] = []
        pings = 0
        start = 0
        size = len(buffer)
        while start < size:
            # Between messages: CRLFs are keep-alives, not a message.
            if buffer.startswith(b"\r\n", start):
                if buffer.startswith(KEEPALIVE_PING, start):
                    pings += 1
                    start += 4
                elif size - start >= 4 or not buffer.startswith(b"\r\n\r", start):
                    start += 2   # a pong, or a stray CRLF
                else:
                    break        # perhaps half a ping: wait for the rest
                continue
            end = buffer.find(b"\r\n\r\n", start, start + self.max_header_bytes + 4)
            if end < 0:
                if size - start > self.max_header_bytes:
                    raise FramingError("header_too_large",
                                       f"no end of headers within {self.max_header_bytes} bytes")
                break
            head_end = end + 4
            lengths = set(_CONTENT_LENGTH.findall(buffer, start, end + 2))
            if len(lengths) != 1:
                raise FramingError(
                    "conflicting_content_length" if lengths else "no_content_length",
                    "conflicting Content-Length values" if lengths
                    else "a message on a stream needs exactly one Content-Length")
            length = int(lengths.pop())
            if length > self.max_body_bytes:
                raise FramingError("body_too_large",
                                   f"Content-Length {length} exceeds {self.max_body_bytes}")
            if size < head_end + length:
                break
            messages.append(bytes(buffer[start:head_end + length]))
            start = head_end + length
        del buffer[:start]
        return messages, pings


class Flow(tuple):
    """A peer on one stream connection: ``(host, port)``, plus ``transport`` and ``connection``.

    Equal to, and unpacked as, the plain address tuple; ``connection`` is
    None for a flow recalled from storage, which the endpoint resolves to a
    live connection when it sends (or finds unreachable).
    """

    reliable = True

    def __new__(cls, host: str, port: int, transport: str, connection: Any = None) -> Flow:
        assert transport in STREAM_TRANSPORTS, transport
        flow = super().__new__(cls, (host, port))
        flow.transport = transport
        flow.connection = connection
        return flow

    def __repr__(self) -> str:
        return f"Flow({self[0]!r}, {self[1]}, {self.transport!r})"

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.transport, self[0], self[1])


def transport_of(addr: Any) -> str:
    """``UDP``, ``TCP`` or ``TLS``: how *addr* is reached."""
    return getattr(addr, "transport", "UDP")


def address_of(binding: Any) -> Any:
    """Where to send to a registered device: its UDP address, or its stream flow
    (resolved to the live connection, if there is one, when sent on); with
    several PS instances, the flow as the instance holding it (``peers.py``)."""
    if binding.via:
        return Relayed(binding.host, binding.port, binding.transport, binding.via, binding.local)
    if binding.transport == "UDP":
        return (binding.host, binding.port)
    return Flow(binding.host, binding.port, binding.transport)


@implementer(IHandshakeListener)
class SIPStreamProtocol(protocol.Protocol):
    """One connection, server or client side: framed messages to the endpoint, writes from it.

    A client side (a device) sends a keep-alive ping every *keepalive_s*, which
    keeps the server's idle timer and any NAT binding on the way open.
    """

    log = Logger()

    def __init__(self, endpoint: SIPEndpoint, transport_name: str,
                 idle_timeout_s: float = STREAM_IDLE_TIMEOUT_S, keepalive_s: float | None = None):
        self.endpoint = endpoint
        self.transport_name = transport_name
        self.idle_timeout_s = idle_timeout_s
        self.keepalive_s = keepalive_s
        self._keepalive: Any = None
        self.framer = StreamFramer()
        self.flow: Flow | None = None
        self.connected_once = defer.Deferred()   # fires with the flow once connected
        self.lost = defer.Deferred()             # fires once the connection is gone
        self._idle: Any = None
        self._active = False

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.flow = Flow(peer.host, peer.port, self.transport_name, self)
        if not self.endpoint.add_flow(self.flow):
            self.log.warn("{role}: {transport} connection from {host} refused: too many",
                          role=self.endpoint.role, transport=self.transport_name, host=peer.host)
            self.transport.abortConnection()
            return
        self._arm_idle()
        if self.keepalive_s is not None:
            self._keepalive = self.endpoint.layer.timers.start(self.keepalive_s, self._ping)
        if self.transport_name != "TLS":
            self.connected_once.callback(self.flow)

    def handshakeCompleted(self) -> None:
        """TLS: the peer's certificate checked out; only now is the flow usable."""
        if not self.connected_once.called:
            self.connected_once.callback(self.flow)

    def _ping(self) -> None:
        self._keepalive = None
        if self.connected:
            self.ping()
            self._keepalive = self.endpoint.layer.timers.start(self.keepalive_s, self._ping)

    def dataReceived(self, data: bytes) -> None:
        self._active = True
        try:
            messages, pings = self.framer.feed(data)
        except FramingError as exc:
            self.endpoint.stream_errors[exc.kind] += 1
            self.log.info("{role}: closing {flow}: {why}", role=self.endpoint.role,
                          flow=self.flow, why=exc)
            self.transport.abortConnection()
            return
        for _ in range(pings):
            self.transport.write(KEEPALIVE_PONG)
        for message in messages:
            self.endpoint.datagram_received(message, self.flow)

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def ping(self) -> None:
        """A keep-alive from our side (RFC 5626 3.5.1); the peer answers with a pong."""
        self.transport.write(KEEPALIVE_PING)

    def close(self) -> defer.Deferred:
        """Abort the connection; fires once it is gone."""
        if self.connected:
            self.transport.abortConnection()
        return self.lost

    def connectionLost(self, reason=None) -> None:
        self.connected = False
        for timer in (self._idle, self._keepalive):
            if timer is not None:
                timer.cancel()
        self._idle = self._keepalive = None
        if self.flow is not None:
            self.endpoint.remove_flow(self.flow)
        if not self.connected_once.called:   # refused, or the TLS handshake failed
            self.connected_once.errback(reason or ConnectionError("connection lost"))
            self.connected_once.addErrback(lambda failure: None)   # a server side has no waiter
        if not self.lost.called:
            self.lost.callback(None)

    def _arm_idle(self) -> None:
        self._idle = self.endpoint.layer.timers.start(self.idle_timeout_s, self._check_idle)

    def _check_idle(self) -> None:
        self._idle = None
        if not self.connected:
            return
        if self._active:
            self._active = False
            self._arm_idle()
            return
        self.log.info("{role}: closing idle {flow}", role=self.endpoint.role, flow=self.flow)
        self.transport.loseConnection()


class SIPStreamFactory(protocol.Factory):
    noisy = False   # a line per connection is for debugging, not for operators

    def __init__(self, endpoint: SIPEndpoint, transport_name: str,
                 keepalive_s: float | None = None):
        self.endpoint = endpoint
        self.transport_name = transport_name
        self.keepalive_s = keepalive_s

    def buildProtocol(self, addr) -> SIPStreamProtocol:
        return SIPStreamProtocol(self.endpoint, self.transport_name, keepalive_s=self.keepalive_s)


class StreamListenerService(service.Service):
    """Listens for one SIP endpoint on a Twisted stream server endpoint (TCP or TLS)."""

    log = Logger()

    def __init__(self, server_endpoint: Any, endpoint: SIPEndpoint, transport_name: str,
                 description: str):
        self.server_endpoint = server_endpoint
        self.endpoint = endpoint
        self.transport_name = transport_name
        self.description = description
        self.listening: Any = None

    @property
    def port(self) -> int:
        assert self.listening is not None, "not started"
        return self.listening.getHost().port

    def startService(self) -> None:
        super().startService()
        listening = self.server_endpoint.listen(SIPStreamFactory(self.endpoint, self.transport_name))

        def listened(port):
            self.listening = port
            self.endpoint.stream_ports[self.transport_name] = port.getHost().port
            self.log.info("{role} listening on {transport} {host}:{port}", role=self.endpoint.role,
                          transport=self.transport_name.lower(), host=port.getHost().host,
                          port=port.getHost().port)
            return port

        self._listened = listening.addCallback(listened)

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        yield self._listened
        if self.listening is not None:
            listening, self.listening = self.listening, None
            yield listening.stopListening()
        yield self.endpoint.close_flows(self.transport_name)


@defer.inlineCallbacks
def open_flow(reactor: Any, endpoint: SIPEndpoint, transport: str, addr: tuple[str, int],
              tls_options: Any = None):
    """Connect *endpoint* (a device's) to a server over TCP or TLS; fires with the :class:`Flow`.

    The flow is the server's address for every request the device sends it,
    and the server's requests to the device come back over it.  *tls_options*
    (``tls.client_options``) says how the server's certificate is checked.
    """
    from twisted.internet import endpoints

    host, port = addr
    if transport == "TCP":
        client = endpoints.TCP4ClientEndpoint(reactor, host, port)
    elif transport == "TLS":
        if tls_options is None:
            raise ValueError("TLS needs the server's certificate or CA to check it against")
        client = endpoints.SSL4ClientEndpoint(reactor, host, port, tls_options)
    else:
        raise ValueError(f"not a stream transport: {transport!r}")
    proto = yield client.connect(SIPStreamFactory(endpoint, transport, KEEPALIVE_INTERVAL_S))
    flow = yield proto.connected_once
    if endpoint.sent_by is None:   # a device without UDP: its side of the connection
        local = proto.transport.getHost()
        endpoint.sent_by = (local.host, local.port)
    return flow

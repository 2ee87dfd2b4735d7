"""The SIP transports: the only code that touches a socket.

UDP is the design's transport.  Twisted has no UDP endpoint, so listeners are
described as strports-style strings (``udp:5060:interface=127.0.0.1``) parsed
here; TCP and TLS will take ``tcp:``/``ssl:`` endpoint descriptions beside it.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.application import service
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from mpay.sip.endpoint import SIPEndpoint
from mpay.sip.peers import MAX_RELAY_FRAME_BYTES, PeerRelay
from mpay.sip.timing import TimerSettings

# A burst of 200 messages was lost with Linux's default buffer on a 2-core machine.
UDP_RCVBUF_BYTES = 1 << 20
# Linux has no SO_RCVBUFFORCE constant in Python's socket module on every build.
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def parse_udp_description(description: str, scheme: str = "udp") -> tuple[int, str]:
    """``udp:PORT[:interface=ADDR]`` (or *scheme*:...) -> (port, interface)."""
    parts = description.split(":")
    if len(parts) < 2 or parts[0] != scheme:
        raise ValueError(f"not a {scheme.upper()} listener description: {description!r}")
    port = int(parts[1])
    interface = ""
    for option in parts[2:]:
        name, _, value = option.partition("=")
        if name != "interface":
            raise ValueError(f"unknown listener option {name!r} in {description!r}")
        interface = value
    return port, interface


class SIPDatagramProtocol(DatagramProtocol):
    """A thin adapter: every datagram goes to the endpoint, every write comes from it."""

    def __init__(self, endpoint: SIPEndpoint):
        self.endpoint = endpoint

    def startProtocol(self) -> None:
        self.endpoint.udp_write = checked_writer(self.transport)
        host = self.transport.getHost()
        if self.endpoint.sent_by is None:
            # A wildcard bind has no address to advertise; loopback until configured otherwise.
            self.endpoint.sent_by = (host.host if host.host not in ("0.0.0.0", "::") else "127.0.0.1",
                                     host.port)

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        self.endpoint.datagram_received(data, addr)


MAX_CHECKED_HOSTS = 4096
"""Destinations whose address family was checked once (then cleared and checked again)."""


def checked_writer(port: Any):
    """``port.write``, checking each destination host once instead of on every datagram.

    Twisted's UDP ``write`` parses the host as IPv4 and IPv6 up to three times
    a datagram, to refuse names and the wrong family; that was a tenth of the
    PS's sending.  A host it accepted once goes to ``sendto`` directly, with
    the same handling of errors as Twisted's.
    """
    checked: set[str] = set()
    write = port.write

    def send(datagram: bytes, addr: tuple[str, int]) -> None:
        if not port.connected:
            # A timer's retransmission during shutdown: the endpoint counts a failed send.
            raise ConnectionError("the UDP listener is closed")
        host = addr[0]
        if host not in checked:
            write(datagram, addr)          # refuses what it must; then the host is known
            if len(checked) >= MAX_CHECKED_HOSTS:
                checked.clear()
            checked.add(host)
            return
        try:
            port.socket.sendto(datagram, addr)
        except OSError as exc:
            if exc.errno in (errno.EINTR, errno.EMSGSIZE):
                write(datagram, addr)      # Twisted's retry, or its MessageLengthError
            elif exc.errno != errno.ECONNREFUSED:   # ICMP from an earlier datagram: as Twisted
                raise

    return send


def raise_receive_buffer(sock: socket.socket, size_bytes: int) -> int:
    """Ask for *size_bytes* of receive buffer; returns what the kernel granted.

    SO_RCVBUFFORCE (root, or CAP_NET_ADMIN) ignores net.core.rmem_max; plain
    SO_RCVBUF is capped by it.  Linux reports twice the size asked (its own
    bookkeeping), so the figure returned is what the kernel really holds.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size_bytes)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size_bytes)
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def listen_udp_shared(reactor, port: int, interface: str, protocol: DatagramProtocol,
                      max_packet_bytes: int = 8192):
    """listenUDP with SO_REUSEPORT: several processes bind one port and the
    kernel spreads datagrams among them by a hash of their addresses (so one
    device's datagrams keep reaching one process while the set is unchanged)."""
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
        sock.setblocking(False)
        # The reactor takes its own duplicate of the descriptor.
        return reactor.adoptDatagramPort(sock.fileno(), family, protocol, max_packet_bytes)
    finally:
        sock.close()


class _UDPService(service.Service):
    """A service owning one listening UDP port (``self.listening``), closed when it stops."""

    listening = None

    def stopService(self):
        super().stopService()
        if self.listening is not None:
            listening, self.listening = self.listening, None
            return listening.stopListening()


class UDPListenerService(_UDPService):
    """Listens for one SIP endpoint; ``port`` is known once started (port 0 works)."""

    log = Logger()

    def __init__(self, description: str, endpoint: SIPEndpoint, reactor=None,
                 rcvbuf_bytes: int = UDP_RCVBUF_BYTES, reuse_port: bool = False):
        self.description = description
        self.port_number, self.interface = parse_udp_description(description)
        if reuse_port and self.port_number == 0:
            raise ValueError("reuse_port needs a fixed port: processes share it")
        self.endpoint = endpoint
        self.rcvbuf_bytes = rcvbuf_bytes
        self.reuse_port = reuse_port
        self._reactor = reactor
        self.listening = None

    @property
    def port(self) -> int:
        assert self.listening is not None, "not started"
        return self.listening.getHost().port

    def startService(self) -> None:
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        protocol = SIPDatagramProtocol(self.endpoint)
        if self.reuse_port:
            self.listening = listen_udp_shared(reactor, self.port_number, self.interface, protocol)
        else:
            self.listening = reactor.listenUDP(self.port_number, protocol, interface=self.interface)
        granted = None
        sock = getattr(self.listening, "socket", None)
        if sock is not None:
            granted = raise_receive_buffer(sock, self.rcvbuf_bytes)
        self.log.info("{role} listening on udp {host}:{port} (receive buffer {granted} bytes)",
                      role=self.endpoint.role, host=self.interface or "0.0.0.0",
                      port=self.port, granted=granted)
        super().startService()


class PeerRelayProtocol(DatagramProtocol):
    """The peer relay's socket (``mpay/sip/peers.py``): frames in, frames out."""

    def __init__(self, relay: PeerRelay):
        self.relay = relay

    def startProtocol(self) -> None:
        self.relay.write = self.transport.write

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.relay.frame_received(data, addr)
        except Exception:
            self.relay.log.failure("ps: relay frame from {addr} failed", addr=addr)


class RelayListenerService(_UDPService):
    """The relay's own UDP socket (``[ps] relay_listen``): frames to and from the peers."""

    log = Logger()

    def __init__(self, description: str, relay: PeerRelay, reactor: Any):
        self.port_number, self.interface = parse_udp_description(description)
        self.relay = relay
        self._reactor = reactor

    def startService(self) -> None:
        self.listening = self._reactor.listenUDP(self.port_number, PeerRelayProtocol(self.relay),
                                                 interface=self.interface,
                                                 maxPacketSize=MAX_RELAY_FRAME_BYTES)
        self.log.info("ps {instance}: relay on udp {host}:{port}, peers {peers}",
                      instance=self.relay.instance, host=self.interface or "0.0.0.0",
                      port=self.listening.getHost().port, peers=sorted(self.relay.peers))
        super().startService()


def sip_listener(role: str, description: str, core, timers, settings: TimerSettings,
                 max_transactions: int, rcvbuf_bytes: int, reactor=None,
                 reuse_port: bool = False) -> tuple[SIPEndpoint, UDPListenerService]:
    """A server's endpoint and its UDP listener service (named ``<role>-sip``)."""
    endpoint = SIPEndpoint(role, core, timers, settings, max_transactions)
    listener = UDPListenerService(description, endpoint, reactor=reactor, rcvbuf_bytes=rcvbuf_bytes,
                                  reuse_port=reuse_port)
    listener.setName(f"{role}-sip")
    return endpoint, listener


def stream_listeners(role: str, endpoint: SIPEndpoint, server_cfg: dict, tls_cfg: dict,
                     reactor) -> list[service.Service]:
    """The TCP and TLS listeners a server's section asks for (``listen_tcp``, ``listen_tls``)."""
    from twisted.internet import endpoints

    from mpay.sip.stream import StreamListenerService
    from mpay.sip.tls import server_options

    listeners: list[service.Service] = []
    for transport in ("tcp", "tls"):
        description = server_cfg[f"listen_{transport}"]
        if not description:
            continue
        port, interface = parse_udp_description(description, transport)
        if transport == "tcp":
            server = endpoints.TCP4ServerEndpoint(reactor, port, interface=interface)
        else:
            server = endpoints.SSL4ServerEndpoint(reactor, port, server_options(tls_cfg),
                                                  interface=interface)
        listener = StreamListenerService(server, endpoint, transport.upper(), description)
        listener.setName(f"{role}-sip-{transport}")
        listeners.append(listener)
    return listeners

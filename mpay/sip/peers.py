"""The peer relay: several PS processes serve one population of devices.

Every message from a device reaches whichever PS process the network picks:
with SO_REUSEPORT the kernel hashes the datagram's addresses, behind a SIP
load balancer the balancer chooses, and a stream connection belongs to the
process that accepted it.  The shared stores make any process able to serve
any *new* request.  What cannot be shared is a transaction or a dialog in
progress: the process that started it holds its state.  So each PS instance
puts its name into the identifiers it makes, after a ``~``:

- the branch of every request it sends (a response names it in its top Via),
- every tag it makes (an in-dialog request names it in its To tag).

A process that receives a message naming another instance relays it there
as an **IN** frame: the message and the device's flow.  That instance
handles it as if it had come in itself.

The other way, a process may need to reach a device whose flow it does not
hold: a stream connection accepted elsewhere, or a UDP flow on another
process's own port.  The binding names the instance holding the flow
(``Binding.via``) and the server address of the flow (``Binding.local``).
The sender then passes the bytes to that instance as an **OUT** frame, and
that instance writes them on the flow.  Processes that share one UDP port
(SO_REUSEPORT) all send from the same address, so among them UDP is never
relayed out: only the responses and in-dialog requests come back through
IN frames.

Frames travel over UDP between the instances' relay addresses (``[ps]
relay_listen`` and ``peers``), which belong on loopback or a private
network.  A frame from an address that is not a configured peer is dropped:
a relay frame is trusted to say where a message came from.

    MPAY-RELAY/1 IN|OUT <instance> <transport> <host> <port> <local>\\r\\n<SIP message>
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Callable

from twisted.logger import Logger

from mpay.sip.message import Response

RELAY_MAGIC = b"MPAY-RELAY/1"
MARKER = "~"
"""Separates an identifier from the name of the PS instance that made it."""

INSTANCE_RE = re.compile(r"^[A-Za-z0-9]{1,16}$")
"""An instance name: it rides in branches and tags, so it must be a short token."""

MAX_RELAY_FRAME_BYTES = 65_507
"""The largest UDP payload: a frame is one datagram."""

_KINDS = (b"IN", b"OUT")
_TRANSPORTS = ("UDP", "TCP", "TLS")


class FrameError(ValueError):
    """A relay datagram that is not a frame we understand: dropped."""


class Relayed(tuple):
    """A device's flow held by instance *via*: unpacks as ``(host, port)`` like any address.

    *local* is the server side of the flow (``host:port``): a process that
    sends from that same address (one UDP port shared with SO_REUSEPORT)
    writes directly; any other passes the bytes to *via*.
    """

    transport: str
    via: str
    local: str
    reliable: bool

    def __new__(cls, host: str, port: int, transport: str, via: str, local: str) -> Relayed:
        assert transport in _TRANSPORTS, transport
        flow = super().__new__(cls, (host, port))
        flow.transport = transport
        flow.via = via
        flow.local = local
        flow.reliable = transport != "UDP"
        return flow

    def __repr__(self) -> str:
        return f"Relayed({self[0]!r}, {self[1]}, {self.transport!r}, via={self.via!r})"

    def moved(self, host: str, port: int) -> Relayed:
        """The same flow's holder, another device address (a response's Via names it)."""
        return Relayed(host, port, self.transport, self.via, self.local)


def owner_marker(identifier: str | None) -> str | None:
    """The instance named at the end of a branch or tag, or None."""
    if not identifier:
        return None
    head, sep, marker = identifier.rpartition(MARKER)
    return marker if sep and head else None


def encode_frame(kind: bytes, instance: str, transport: str, host: str, port: int, local: str,
                 message: bytes) -> bytes:
    head = b" ".join((RELAY_MAGIC, kind, instance.encode(), transport.encode(), host.encode(),
                      str(port).encode(), (local or "-").encode()))
    frame = head + b"\r\n" + message
    if len(frame) > MAX_RELAY_FRAME_BYTES:
        raise FrameError(f"frame of {len(frame)} bytes is over one datagram")
    return frame


def decode_frame(frame: bytes) -> tuple[bytes, str, str, str, int, str, bytes]:
    """(kind, instance, transport, host, port, local, message), or FrameError."""
    head, sep, message = frame.partition(b"\r\n")
    parts = head.split(b" ")
    if not sep or len(parts) != 7 or parts[0] != RELAY_MAGIC or parts[1] not in _KINDS:
        raise FrameError("not a relay frame")
    try:
        instance, transport, host, port_text, local = (part.decode("ascii") for part in parts[2:])
        port = int(port_text)
    except (UnicodeDecodeError, ValueError):
        raise FrameError("unreadable relay frame head") from None
    if transport not in _TRANSPORTS or not 0 < port < 65536 or not INSTANCE_RE.match(instance):
        raise FrameError("bad relay frame head")
    return parts[1], instance, transport, host, port, "" if local == "-" else local, message


def parse_peers(value: str) -> dict[str, tuple[str, int]]:
    """``ps1=127.0.0.1:5161, ps2=127.0.0.1:5162`` -> {name: (host, port)}."""
    peers: dict[str, tuple[str, int]] = {}
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        name, sep, address = item.partition("=")
        host, colon, port = address.strip().rpartition(":")
        name = name.strip()
        if not sep or not colon or not INSTANCE_RE.match(name) or not port.isdigit():
            raise ValueError(f"a peer is NAME=HOST:PORT, not {item!r}")
        if not 0 < int(port) < 65536:
            raise ValueError(f"peer port out of range in {item!r}")
        peers[name] = (host.strip("[]"), int(port))
    return peers


class PeerRelay:
    """One instance's end of the relay: which messages are another's, and moving them.

    Sans-IO: ``write(frame, (host, port))`` sends a datagram to a peer; the
    endpoint gives every message it parsed to :meth:`owner` first and hands
    over the ones another instance owns.
    """

    log = Logger()

    def __init__(self, instance: str, peers: dict[str, tuple[str, int]], endpoint: Any):
        assert INSTANCE_RE.match(instance), instance
        self.instance = instance
        self.peers = {name: addr for name, addr in peers.items() if name != instance}
        self._names = {addr: name for name, addr in self.peers.items()}
        self.endpoint = endpoint
        self.write: Callable[[bytes, tuple[str, int]], None] = self._not_listening
        self.counts: Counter = Counter()   # "in_sent", "in_received", "out_sent", ... "dropped"

    def _not_listening(self, frame: bytes, addr: tuple[str, int]) -> None:
        raise RuntimeError("PeerRelay used before its listener started")

    def owner(self, message: Any) -> str | None:
        """The other instance that holds *message*'s transaction or dialog, or None (ours)."""
        if isinstance(message, Response):
            via = message.top_via
            marker = owner_marker(via.branch if via is not None else None)
        else:
            marker = owner_marker(message.to_addr.tag)
        return marker if marker in self.peers else None

    def relay_in(self, owner: str, data: bytes, source: Any) -> None:
        """A message that came in here belongs to *owner*: pass it on with its flow."""
        transport = getattr(source, "transport", "UDP")
        local = self.endpoint.local_address(transport)
        self._send(b"IN", owner, transport, source, local, data, "in_sent")

    def relay_out(self, data: bytes, target: Relayed) -> None:
        """Send *data* on a flow that instance ``target.via`` holds."""
        if target.via not in self.peers:
            raise ConnectionError(f"flow held by {target.via!r}, which is not a peer")
        self._send(b"OUT", target.via, target.transport, target, target.local, data, "out_sent")

    def _send(self, kind: bytes, to: str, transport: str, addr: Any, local: str, data: bytes,
              count: str) -> None:
        frame = encode_frame(kind, self.instance, transport, addr[0], addr[1], local, data)
        self.write(frame, self.peers[to])
        self.counts[count] += 1

    def frame_received(self, frame: bytes, source: tuple[str, int]) -> None:
        sender = self._names.get((source[0], source[1]))
        if sender is None:
            self.counts["dropped_stranger"] += 1
            return
        try:
            kind, instance, transport, host, port, local, message = decode_frame(frame)
        except FrameError as exc:
            self.counts["dropped_malformed"] += 1
            self.log.warn("ps: relay frame from {peer} dropped: {why}", peer=sender, why=exc)
            return
        if instance != sender:
            self.counts["dropped_stranger"] += 1
            return
        if kind == b"IN":
            self.counts["in_received"] += 1
            self.endpoint.datagram_received(message, Relayed(host, port, transport, sender, local),
                                            relayed=True)
        else:
            self.counts["out_received"] += 1
            self.endpoint.write_local(message, host, port, transport)

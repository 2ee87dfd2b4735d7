"""The lean load generator: a payer's and a payee's wire work done on bytes.

The stack generator drives every message through the SIP stack (parser,
message model, transaction layer, time wheel) on both sides: that costs
the generator about as much CPU per transfer as the server spends, on the
same two cores.  What a load generator must do is narrow, so it is done
here on the bytes:

- the payer (:class:`LeanClient`) sends requests serialised ahead of time,
  each from its payer's own socket (a phone has an address of its own: the
  kernel spreads SO_REUSEPORT server processes by source address, so one
  shared socket would load one process), matches each response by Call-ID
  and CSeq whichever socket it came in on, reads only the status (and a
  200's journal id), and retransmits as an RFC 3261 17.1.2 non-INVITE
  client transaction over UDP does: Timer E from T1 doubling to T2 (T2
  after a 1xx), given up at Timer F.  The timers are deques, each in due
  order because everything in it was queued with the same delay, in time
  order: one per retransmission interval, and one of Timer F in send
  order; one periodic call scans their heads, no callLater per request.
- the payee (:class:`NoticeAnswerer`) answers a notice MESSAGE with a 200
  built from the request's bytes (:func:`ok_for`), on the socket the
  device registered from; anything else goes to the device's own stack.

What it does not do: it checks no receipt signature (neither generator
does in a load run), keeps no notices, and answers nothing its stack would
have answered otherwise (a malformed notice goes to the stack, which says
400).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import deque
from typing import Any, Callable, NamedTuple

from twisted.logger import Logger

from mpay.load.stats import Outcome
from mpay.sip.stream import transport_of
from mpay.sip.timing import T1_S, T2_S

TIMER_F_S = 64 * T1_S
"""A request not answered by then is given up, as the stack's Timer F does."""

RETRANSMIT_TICK_S = 0.02
"""How often the retransmission deques are scanned: the resolution of Timer E."""

MAX_HEAD_BYTES = 8192
"""A request head longer than this is not answered here (the stack decides)."""

TO_TAG_BYTES = 8
"""Our To tag: 64 bits keyed per payee, a function of the Call-ID, so that a
retransmitted notice gets the identical 200."""

NOTICE_FIELDS = frozenset({"journal_id", "amount", "from"})
"""The fields of a notice the Sim-DMD reads (``Device._on_notice``)."""

DEFAULT_SIP_PORT = 5060
SIP_VERSION = b"SIP/2.0"

_TOKEN = re.compile(rb"[A-Za-z0-9\-.!%*_+`'~]+")
_FOLD = re.compile(rb"\r\n[ \t]+")
_ECHOED = {b"via": b"Via", b"v": b"Via", b"from": b"From", b"f": b"From",
           b"call-id": b"Call-ID", b"i": b"Call-ID", b"cseq": b"CSeq"}
_SINGLE = {b"From", b"To", b"Call-ID", b"CSeq"}
_TO = (b"to", b"t")
_CONTENT_TYPE = (b"content-type", b"c")

log = Logger()


class Prepared(NamedTuple):
    """A request serialised ahead of time, with what its responses are matched by."""

    data: bytes
    call_id: bytes
    cseq: bytes                  # "<number> <method>", single-spaced


def prepare(request: Any) -> Prepared:
    """*request* (an ``mpay.sip.message.Request``) as the lean sender sends it."""
    number, method = request.cseq
    return Prepared(request.to_bytes(), request.call_id.encode(), f"{number} {method}".encode())


# -- the payee: a 200 made of the request's bytes -----------------------------
def ok_for(request: bytes, source: tuple[str, int], tag_key: bytes,
           media_type: bytes | None = None) -> tuple[bytes, tuple[str, int]] | None:
    """(the 200 to *request*, where it goes) per RFC 3261 8.2.6 and 18.2.2, or None.

    The Vias (in order), From, Call-ID and CSeq are echoed, To gets our tag
    unless it has one, the body is empty.  It goes to the source's host, at
    the top Via's port (the source's port when the Via asks ``rport``), as
    the stack sends it.  None: not a well-formed request (or an ACK, or not
    of *media_type*), for the caller to give to a full stack.
    """
    end = request.find(b"\r\n\r\n")
    if end < 0 or end > MAX_HEAD_BYTES:
        return None
    head = request[:end]
    # bytes.find, not "in": bytes.__contains__ tries its argument as an int first, and
    # raises and clears a TypeError each time (a tenth of this function, per line).
    if head.find(b"\r\n ") >= 0 or head.find(b"\r\n\t") >= 0:
        head = _FOLD.sub(b" ", head)             # folded lines (RFC 3261 7.3.1): unfolded
    lines = head.split(b"\r\n")
    breaks = len(lines) - 1          # a CR, LF or NUL of its own in any line: refused
    if head.count(b"\r") != breaks or head.count(b"\n") != breaks or head.find(b"\x00") >= 0:
        return None
    start = lines[0].split(b" ")
    if len(start) != 3 or start[2] != SIP_VERSION or not start[1]:
        return None
    method = start[0]
    if not _TOKEN.fullmatch(method) or method == b"ACK":
        return None
    echoed, vias, single, to_value, content_type = [], [], {}, None, None
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        key = name.strip().lower()
        canonical = _ECHOED.get(key)
        if not colon or (canonical is None and not _TOKEN.fullmatch(key)):
            return None
        value = value.strip()
        if canonical is not None:
            if canonical in single or (canonical == b"Via" and not value):
                return None
            if canonical == b"Via":
                vias.append(value)
            else:
                single[canonical] = value
            echoed.append(canonical + b": " + value)
        elif key in _TO:
            if to_value is not None:
                return None
            to_value = value
            single[b"To"] = value
            echoed.append(b"To")               # its place; filled in below
        elif key in _CONTENT_TYPE:
            content_type = value
    if not vias or len(single) != len(_SINGLE) or not single[b"Call-ID"]:
        return None
    cseq = single[b"CSeq"].split()
    if len(cseq) != 2 or not cseq[0].isdigit() or len(cseq[0]) > 10 or cseq[1] != method:
        return None
    if media_type is not None and (content_type is None or
                                   content_type.split(b";")[0].strip().lower() != media_type):
        return None
    destination = _reply_address(vias[0], source)
    if destination is None:
        return None
    if not _has_tag(to_value):
        tag = hashlib.blake2s(single[b"Call-ID"], key=tag_key, digest_size=TO_TAG_BYTES)
        to_value += b";tag=" + tag.hexdigest().encode()
    echoed[echoed.index(b"To")] = b"To: " + to_value
    response = b"SIP/2.0 200 OK\r\n" + b"\r\n".join(echoed) + b"\r\nContent-Length: 0\r\n\r\n"
    return response, destination


def _has_tag(to_value: bytes) -> bool:
    """Whether a To value carries a tag (a ``;tag=`` inside <...> is the URI's)."""
    params = to_value.rpartition(b">")[2] if to_value.find(b"<") >= 0 else to_value
    return params.lower().replace(b" ", b"").find(b";tag=") >= 0


def _reply_address(top_via: bytes, source: tuple[str, int]) -> tuple[str, int] | None:
    """Where the stack's ``response_destination`` sends the reply to a UDP request."""
    via = top_via.split(b",", 1)[0]
    protocol, _, rest = via.strip().partition(b" ")
    if not protocol.upper().endswith(b"/UDP"):
        return None
    sent_by, _, params = rest.strip().partition(b";")
    if any(param.split(b"=", 1)[0].strip().lower() == b"rport" for param in params.split(b";")):
        return source
    host_port = sent_by.strip()
    port = host_port.rpartition(b"]")[2] if host_port.startswith(b"[") else host_port
    _, colon, number = port.rpartition(b":")
    if not colon:
        return (source[0], DEFAULT_SIP_PORT)
    if not number.isdigit() or not 0 < int(number) < 65536:
        return None
    return (source[0], int(number))


class NoticeAnswerer:
    """Answers a device's notices with :func:`ok_for`, in front of its endpoint.

    Installed as the endpoint's ``datagram_received`` (the UDP listener calls
    that name), so the 200 leaves from the socket the device registered
    from and every other datagram still reaches the device's stack.  It
    confirms what the Sim-DMD would (a JSON body naming the journal id,
    amount and payer); a notice it would refuse goes to the stack, which
    says why (400, 415).
    """

    def __init__(self, endpoint: Any, media_type: str, tag_key: bytes):
        self.endpoint = endpoint
        self.media_type = media_type.lower().encode()
        self.tag_key = tag_key
        self.answered = 0
        self.passed = 0
        self._stack = endpoint.datagram_received

    def install(self) -> None:
        self.endpoint.datagram_received = self.datagram_received

    def uninstall(self) -> None:
        if self.endpoint.datagram_received == self.datagram_received:
            self.endpoint.datagram_received = self._stack

    def datagram_received(self, data: bytes, addr: Any, relayed: bool = False) -> None:
        if data.startswith(b"MESSAGE ") and transport_of(addr) == "UDP":
            answer = ok_for(data, addr, self.tag_key, self.media_type)
            if answer is not None and _is_notice_body(data[data.find(b"\r\n\r\n") + 4:]):
                self.answered += 1
                self.endpoint.send(*answer)
                return
        self.passed += 1
        self._stack(data, addr, relayed)


def _is_notice_body(body: bytes) -> bool:
    """What the Sim-DMD reads of a notice (its receipt it checks only with a pinned key,
    which load runs do not give it)."""
    try:
        notice = json.loads(body)
    except ValueError:
        return False
    return isinstance(notice, dict) and NOTICE_FIELDS <= notice.keys()


# -- the payer: matching and retransmission on bytes ---------------------------
def peek_response(data: bytes) -> tuple[int, bytes, bytes, bytes] | None:
    """(status, Call-ID, CSeq single-spaced, body) of a response, or None."""
    if not data.startswith(b"SIP/2.0 ") or not data[8:11].isdigit() \
            or data[11:12] not in (b" ", b"\r"):
        return None
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    call_id = _value(data, end, b"Call-ID", b"i")
    cseq = _value(data, end, b"CSeq", None)
    if not call_id or cseq is None:
        return None
    return int(data[8:11]), call_id, b" ".join(cseq.split()), data[end + 4:]


def _value(data: bytes, end: int, name: bytes, compact: bytes | None) -> bytes | None:
    """One header's value: found as the server writes it, else by a scan of the head."""
    marker = b"\r\n" + name + b":"
    at = data.find(marker, 0, end)
    if at >= 0:
        stop = data.find(b"\r\n", at + len(marker), end + 2)
        return data[at + len(marker):stop].strip()
    names = (name.lower(), compact)
    for line in data[:end].split(b"\r\n")[1:]:
        key, colon, value = line.partition(b":")
        if colon and key.strip().lower() in names:
            return value.strip()
    return None


def journal_id_of(body: bytes) -> int | None:
    """The journal id of a transfer's 200 body (JSON), as the stack generator reads it."""
    try:
        return json.loads(body)["journal_id"]
    except (ValueError, KeyError, TypeError):
        return None


class _Pending:
    __slots__ = ("index", "prepared", "write", "sent_at", "lag", "proceeding", "done")

    def __init__(self, index: int, prepared: Prepared, write: Callable[[bytes], None],
                 sent_at: float, lag: float):
        self.index = index
        self.prepared = prepared
        self.write = write               # the payer's socket: retransmissions leave from it too
        self.sent_at = sent_at
        self.lag = lag
        self.proceeding = False          # a 1xx came: retransmit every T2 (RFC 17.1.2.2)
        self.done = False


class LeanClient:
    """Non-INVITE client transactions to one server over UDP, on prepared bytes.

    Each request is sent (and retransmitted) by the *write(data)* it is given,
    a payer's connected socket; the timers and the matching are shared by all
    the payers, so a request costs the same however many sockets there are.
    *seconds()* is the clock; *on_final(outcome)* gets each request's
    :class:`Outcome` once.  Call :meth:`tick` every RETRANSMIT_TICK_S.
    """

    def __init__(self, seconds: Callable[[], float], on_final: Callable[[Outcome], None],
                 t1_s: float = T1_S, t2_s: float = T2_S, timer_f_s: float = TIMER_F_S):
        assert 0 < t1_s <= t2_s < timer_f_s
        self.seconds = seconds
        self.on_final = on_final
        self.t2_s = t2_s
        self.timer_f_s = timer_f_s
        self.pending: dict[bytes, _Pending] = {}
        intervals = [t1_s]
        while intervals[-1] < t2_s:
            intervals.append(min(2 * intervals[-1], t2_s))
        # interval -> (due at, request) queued with that delay: due order within each.
        self._due: dict[float, deque[tuple[float, _Pending]]] = {
            interval: deque() for interval in intervals}
        self._first = t1_s
        self._give_up: deque[tuple[float, _Pending]] = deque()     # Timer F, in send order
        self.resent = 0
        self.stray = 0                   # responses matching nothing pending (late, or foreign)
        self.provisional = 0

    def send(self, index: int, prepared: Prepared, lag: float,
             write: Callable[[bytes], None]) -> None:
        """Send *prepared* by *write* now, as request *index* of the run, *lag* late."""
        assert prepared.call_id not in self.pending, "a Call-ID is one request"
        write(prepared.data)
        now = self.seconds()
        entry = _Pending(index, prepared, write, now, lag)
        self.pending[prepared.call_id] = entry
        self._due[self._first].append((now + self._first, entry))
        self._give_up.append((now + self.timer_f_s, entry))

    def response_received(self, data: bytes) -> None:
        peeked = peek_response(data)
        entry = self.pending.get(peeked[1]) if peeked is not None else None
        if entry is None or entry.prepared.cseq != peeked[2]:
            self.stray += 1
            return
        status, _, _, body = peeked
        if status < 200:
            self.provisional += 1
            entry.proceeding = True
            return
        del self.pending[entry.prepared.call_id]
        entry.done = True
        journal_id = journal_id_of(body) if status == 200 else None
        self.on_final(Outcome(entry.index, status, self.seconds() - entry.sent_at, entry.lag,
                              journal_id))

    def tick(self) -> None:
        """Retransmit what is due (Timer E); give up what reached Timer F."""
        now = self.seconds()
        give_up = self._give_up
        while give_up and give_up[0][0] <= now:
            _, entry = give_up.popleft()
            if not entry.done:
                entry.done = True
                del self.pending[entry.prepared.call_id]
                self.on_final(Outcome(entry.index, None, None, entry.lag))
        for interval, queue in self._due.items():
            while queue and queue[0][0] <= now:
                _, entry = queue.popleft()
                if entry.done:
                    continue
                entry.write(entry.prepared.data)
                self.resent += 1
                delay = self.t2_s if entry.proceeding else min(2 * interval, self.t2_s)
                self._due[delay].append((now + delay, entry))

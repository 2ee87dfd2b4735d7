"""The SIP parser (RFC 3261 7, 20; RFC 4475 as its conformance corpus), sans-IO.

`parse(datagram)` returns a `Request` or `Response`, or raises `ParseError` and
nothing else.  It validates what every layer relies on (start line, Via,
From, To, Call-ID, CSeq, Content-Length, sizes) and caches the parsed values
on the message; a request too broken to use but still addressable comes back
inside the ParseError so the endpoint can answer 400.
"""

from __future__ import annotations

import re

from mpay.sip.headers import (
    KNOWN_NAMES, URI_RE, ParseError, is_token, parse_cseq, parse_name_addr, parse_via,
    split_list, token_header_name,
)
from mpay.sip.message import (
    MAX_CONTENT_LENGTH_DIGITS, MAX_FORWARDS, MAX_HEADER_FIELDS, MAX_HEADER_LINE_BYTES,
    MAX_MESSAGE_BYTES, SIP_VERSION, Request, Response,
)

_MANDATORY = {"from": "From", "to": "To", "call-id": "Call-ID", "cseq": "CSeq"}
_SINGLE = {"from": (400, "Duplicate From"), "to": (400, "Duplicate To"),
           "call-id": (400, "Duplicate Call-ID"), "cseq": (400, "Duplicate CSeq"),
           "content-length": (400, "Multiple Content-Length"),
           "max-forwards": (400, "Bad Max-Forwards")}
_FOLD_RE = re.compile(r"\n[ \t]+")
MAX_EXTENSION_NAMES = 512
"""Header names outside KNOWN_NAMES remembered as parsed: the first come, then no more
(names are chosen by senders, so this must stay bounded)."""
_NAMES = dict(KNOWN_NAMES)
_MAX_NAMES = len(_NAMES) + MAX_EXTENSION_NAMES


def parse(data: bytes) -> Request | Response:
    """Parse one datagram (or one message framed by Content-Length off a stream)."""
    try:
        return _parse(data)
    except ParseError:
        raise
    except Exception as e:  # pragma: no cover - the fuzz tests call _parse to find these
        # Last line of defence: a parser bug must cost one 400, never the receive loop.
        raise ParseError(400, "Malformed message") from e


def _parse(data: bytes) -> Request | Response:
    if len(data) > MAX_MESSAGE_BYTES:
        raise ParseError(513, "Message Too Large")
    start = 0
    if data[:1] in (b"\r", b"\n"):      # RFC 3261 7.5: ignore CRLFs before the start-line
        start = len(data) - len(data.lstrip(b"\r\n"))
    end = data.find(b"\n\r\n", start)
    bare = data.find(b"\n\n", start, len(data) if end < 0 else end + 1)
    if bare >= 0:
        head_end, body_start = bare, bare + 2
    elif end >= 0:
        head_end, body_start = end, end + 3
    else:                               # no blank line: tolerated, there is no body
        head_end = body_start = len(data)
    head = data[start:head_end].decode("utf-8", "surrogateescape")
    if "\r" in head:
        head = head.replace("\r\n", "\n").rstrip("\r")
        if "\r" in head:
            raise ParseError(400, "Bare CR in header")
    if "\n " in head or "\n\t" in head:  # unfold: CRLF + LWS is one SP (RFC 3261 7.3.1)
        head = _FOLD_RE.sub(" ", head)
    lines = head.rstrip("\n").split("\n")
    if not lines[0]:
        raise ParseError(400, "Empty message")
    if len(lines) > MAX_HEADER_FIELDS + 1:
        raise ParseError(513, "Too Many Header Fields")
    message, error = _start_line(lines[0])
    vias: list[str] = []
    first: dict[str, str] = {}
    header_error = _read_headers(lines, message.headers._items, vias, first)
    check_error = _check(message, data[body_start:], vias, first)
    error = error or header_error or check_error
    if error is not None:
        if isinstance(message, Response):   # responses are dropped, never answered
            raise ParseError(400, error[1])
        raise ParseError(error[0], error[1], message if _addressable(message) else None)
    return message


def _start_line(line: str) -> tuple[Request | Response, tuple[int, str] | None]:
    """The message the start-line begins, and its problem if the request can still be
    answered; a broken status line or request method is not worth answering."""
    if line[:4].upper() == "SIP/":
        version, _, rest = line.partition(" ")
        code, _, reason = rest.partition(" ")
        if not (code.isascii() and code.isdigit() and len(code) == 3 and code[0] in "123456"):
            raise ParseError(400, "Bad Status-Line")
        if version.upper() != SIP_VERSION:      # never answered, so no 505
            raise ParseError(400, "Unsupported SIP Version")
        return Response(int(code), reason), None
    parts = line.split(" ")
    if len(parts) == 3 and parts[2] == SIP_VERSION and is_token(parts[0]) and URI_RE.fullmatch(
            parts[1]):
        return Request(parts[0], parts[1]), None
    words = [part for part in parts if part]
    if not is_token(parts[0]) or len(words) < 3 or words[-1][:4].upper() != "SIP/":
        raise ParseError(400, "Bad Request-Line")
    request = Request(parts[0], parts[1] if len(parts) > 1 else "")
    if len(parts) != 3:
        return request, (400, "Bad Request-Line")
    if URI_RE.fullmatch(parts[1]) is None:
        return request, (400, "Bad Request-URI")
    version = parts[2]
    if version == SIP_VERSION or version.upper() == SIP_VERSION:
        return request, None
    major, dot, minor = version[4:].partition(".")
    if version[:4].upper() == "SIP/" and dot and major.isdigit() and minor.isdigit():
        return request, (505, "Version Not Supported")
    return request, (400, "Bad Request-Line")


def _read_headers(lines: list[str], items: list[tuple[str, str, str]],
                  vias: list[str], first: dict[str, str]) -> tuple[int, str] | None:
    """Collect the (unfolded) header lines into `items`, the Via values into `vias` and
    the first of each single-valued header into `first`.  The first problem is returned
    and its line skipped, so a request with one broken header can still be answered."""
    error = None
    append = items.append
    known = _NAMES.get
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        entry = known(name) if colon else None
        if entry is None:
            entry = _name_entry(name) if colon else None
            if entry is None:
                error = error or (400, "Bad header field")
                continue
        if len(line) > MAX_HEADER_LINE_BYTES // 4 and _too_long(line):
            error = error or (513, "Header Field Too Large")
            continue
        key, name, is_list = entry
        value = value.strip(" \t")
        if is_list and ("," in value or not value):
            for element in split_list(value):
                append((key, name, element))
                if key == "via":
                    vias.append(element)
            continue
        append((key, name, value))
        if key == "via":
            vias.append(value)
        elif key in _SINGLE:
            if key in first:
                error = error or _SINGLE[key]
            else:
                first[key] = value
    return error


def _name_entry(name: str) -> tuple[str, str, bool] | None:
    """``token_header_name``, remembered for a name outside KNOWN_NAMES (the PS's
    Mpay-Ticket...) up to MAX_EXTENSION_NAMES."""
    entry = token_header_name(name)
    if entry is not None and len(_NAMES) < _MAX_NAMES:
        _NAMES[name] = entry
    return entry


def _too_long(line: str) -> bool:
    return len(line) > MAX_HEADER_LINE_BYTES or (
        not line.isascii()
        and len(line.encode("utf-8", "surrogateescape")) > MAX_HEADER_LINE_BYTES)


def _check(message: Request | Response, body: bytes, vias: list[str],
           first: dict[str, str]) -> tuple[int, str] | None:
    """Validate the mandatory headers, fill the caches, cut the body to Content-Length."""
    error = None
    length = first.get("content-length")
    if length is not None:
        if not (length.isascii() and length.isdigit()) or len(length) > MAX_CONTENT_LENGTH_DIGITS:
            error = (400, "Bad Content-Length")
        elif int(length) > len(body):
            error = (400, "Content-Length Exceeds Body")
        else:
            body = body[:int(length)]
    message.body = body
    message._cache()
    if not vias:
        return error or (400, "Missing Via")
    for key, title in _MANDATORY.items():
        if key not in first:
            return error or (400, f"Missing {title}")
    try:
        message._from = parse_name_addr(first["from"])
    except ParseError:
        error = error or (400, "Bad From")
    try:
        message._to = parse_name_addr(first["to"])
    except ParseError:
        error = error or (400, "Bad To")
    try:
        message._cseq = parse_cseq(first["cseq"])
    except ParseError:
        error = error or (400, "Bad CSeq")
    try:
        message._vias = [parse_via(value) for value in vias]
    except ParseError:
        error = error or (400, "Bad Via")
    call_id = first["call-id"]
    if not call_id or " " in call_id or "\t" in call_id:
        error = error or (400, "Bad Call-ID")
    if isinstance(message, Request) and message._cseq and message._cseq[1] != message.method:
        error = error or (400, "CSeq Method Mismatch")
    hops = first.get("max-forwards")
    if hops is not None:
        hops = hops.lstrip("0") or "0"
        if not (hops.isascii() and hops.isdigit() and len(hops) <= 3) or int(hops) > MAX_FORWARDS:
            error = error or (400, "Bad Max-Forwards")
    return error


def _addressable(request: Request) -> bool:
    """Can a response reach the sender?  Needs the top Via, From, To, Call-ID and CSeq;
    and never for an ACK, which gets no response (RFC 3261 17.2.3)."""
    if request._from is None or request._to is None or request._cseq is None:
        return False
    if request.method == "ACK":
        return False
    if request._vias:
        return True
    try:                          # a lower Via was bad: the top one may still be usable
        parse_via(request.headers.get("Via") or "")
    except ParseError:
        return False
    return True

"""SIP messages (RFC 3261 7, 20): the sans-IO model and serialiser (the parser is parser.py).

`parse(datagram)` returns a `Request` or `Response`, or raises `ParseError` and nothing
else.  Headers are kept as raw (name, value) pairs under their canonical long names;
list headers (Via, Contact, Allow...) are split into one pair per element, so `get` and
`getall` agree however the sender wrote them.  On a parsed message
the values every layer needs (Vias, CSeq, From, To) were already validated and are
cached; on a message built by code they are parsed on first use and cached until a
header changes.  `to_bytes()` always writes a correct Content-Length.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from mpay.sip.headers import (
    KNOWN_NAMES, MAGIC_COOKIE, NameAddr, ParseError, Via, header_name, is_token, parse_cseq,
    parse_name_addr, parse_via, split_list, token_header_name,
)
from mpay.sip.uri import SipURI, parse_uri

__all__ = [  # the value helpers live in headers.py; callers may import all from here
    "MAGIC_COOKIE", "MAX_HEADER_FIELDS", "MAX_HEADER_LINE_BYTES", "MAX_MESSAGE_BYTES",
    "REASONS", "SIP_VERSION", "Headers", "NameAddr", "ParseError", "Request", "Response",
    "SipURI", "Via", "make_response", "parse", "parse_cseq", "parse_name_addr", "parse_uri",
    "parse_via"]

MAX_MESSAGE_BYTES = 65507        # largest UDP payload over IPv4
MAX_HEADER_LINE_BYTES = 8192     # one header field, after unfolding
MAX_HEADER_FIELDS = 256          # header lines in one message
MAX_CONTENT_LENGTH_DIGITS = 10
MAX_FORWARDS = 255              # RFC 3261 20.22
SIP_VERSION = "SIP/2.0"

# Headers that may appear once, and the error when one is repeated (RFC 4475 multi01, mcl01).
# Token lists are written as one line, "Allow: INVITE, ACK" (what peers expect to read);
# addresses (Via, Route, Contact...) one per line, as RFC 3261 shows them.  Elements with
# a quote or '<' stay on their own line: joined, an unbalanced one would swallow the rest.
_JOINED = frozenset((
    "accept accept-encoding accept-language allow allow-events content-encoding "
    "content-language in-reply-to proxy-require require supported unsupported").split())
MAX_JOINED_LINE_CHARS = 1000     # then start another line of the same header

REASONS: dict[int, str] = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 200: "OK", 202: "Accepted", 300: "Multiple Choices",
    301: "Moved Permanently", 302: "Moved Temporarily", 305: "Use Proxy",
    380: "Alternative Service", 400: "Bad Request", 401: "Unauthorized",
    402: "Payment Required", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    406: "Not Acceptable", 407: "Proxy Authentication Required", 408: "Request Timeout",
    410: "Gone", 412: "Conditional Request Failed", 413: "Request Entity Too Large",
    414: "Request-URI Too Long", 415: "Unsupported Media Type",
    416: "Unsupported URI Scheme", 420: "Bad Extension", 421: "Extension Required",
    423: "Interval Too Brief", 429: "Provide Referrer Identity",
    480: "Temporarily Unavailable", 481: "Call/Transaction Does Not Exist",
    482: "Loop Detected", 483: "Too Many Hops", 484: "Address Incomplete", 485: "Ambiguous",
    486: "Busy Here", 487: "Request Terminated", 488: "Not Acceptable Here",
    489: "Bad Event", 491: "Request Pending", 493: "Undecipherable",
    500: "Server Internal Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Server Time-out", 505: "Version Not Supported",
    513: "Message Too Large", 600: "Busy Everywhere", 603: "Decline",
    604: "Does Not Exist Anywhere", 606: "Not Acceptable",
}
_CLASS_REASONS = {1: "Provisional", 2: "Success", 3: "Redirection", 4: "Client Error",
                  5: "Server Error", 6: "Global Failure"}


def refuse_line_break(value: str) -> None:
    """A value written by code must not smuggle in a header line of its own."""
    if "\r" in value or "\n" in value:
        raise ValueError(f"header value with a line break: {value!r}")


class Headers:
    """Ordered, case-insensitive multi-map of header fields; compact names map to long."""

    __slots__ = ("_items", "_rev")

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()):
        # (lower-case key, name as written on the wire, value); _rev counts mutations so
        # messages know when their parsed-header caches are stale.
        self._items: list[tuple[str, str, str]] = []
        self._rev = 0
        if pairs:
            for name, value in pairs:
                self.add(name, value)

    @staticmethod
    def _entries(name: str, value: str) -> list[tuple[str, str, str]]:
        refuse_line_break(value)
        entry = KNOWN_NAMES.get(name) or token_header_name(name)   # known: a token already
        if entry is None:
            raise ValueError(f"bad header name {name!r}")
        key, canonical, is_list = entry
        values = split_list(value) if is_list else [value.strip(" \t")]
        return [(key, canonical, v) for v in values]

    def get(self, name: str, default: str | None = None) -> str | None:
        key = header_name(name)[0]
        for k, _, value in self._items:
            if k == key:
                return value
        return default

    def getall(self, name: str) -> list[str]:
        key = header_name(name)[0]
        return [value for k, _, value in self._items if k == key]

    def set(self, name: str, value: str) -> None:
        """Replace every value of `name`, keeping the position of the first one."""
        entries = self._entries(name, value)
        key = entries[0][0] if entries else header_name(name)[0]
        items = self._items
        where = next((i for i, item in enumerate(items) if item[0] == key), len(items))
        items[:] = [item for item in items if item[0] != key]
        items[where:where] = entries
        self._rev += 1

    def add(self, name: str, value: str, first: bool = False) -> None:
        """Append a value; `first` puts it above the others of its name (a proxy's Via)."""
        entries = self._entries(name, value)
        items = self._items
        if first and entries:
            key = entries[0][0]
            where = next((i for i, item in enumerate(items) if item[0] == key), 0)
            items[where:where] = entries
        else:
            items.extend(entries)
        self._rev += 1

    def remove(self, name: str) -> None:
        key = header_name(name)[0]
        self._items[:] = [item for item in self._items if item[0] != key]
        self._rev += 1

    def __contains__(self, name: str) -> bool:
        key = header_name(name)[0]
        return any(k == key for k, _, _ in self._items)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return ((name, value) for _, name, value in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def copy(self) -> Headers:
        other = Headers()
        other._items = list(self._items)
        return other

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Headers):
            return NotImplemented
        return [(k, v) for k, _, v in self._items] == [(k, v) for k, _, v in other._items]

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Headers({list(self)!r})"


class _Message:
    """What requests and responses share: headers, body, and the parsed-value caches."""

    __slots__ = ("headers", "body", "version", "_for", "_rev", "_vias", "_cseq", "_from", "_to")

    # The parsed-value caches: None until parsed (or since the headers changed).
    _rev: int
    _vias: list[Via] | None
    _cseq: tuple[int, str] | None
    _from: NameAddr | None
    _to: NameAddr | None

    def __init__(self, headers: Headers | None, body: bytes, version: str):
        self.headers = Headers() if headers is None else headers
        self.body = body
        self.version = version
        self._for: Headers | None = None

    def _cache(self) -> None:
        """Drop the parsed-header caches if the headers changed since they were filled."""
        headers = self.headers
        if self._for is not headers or self._rev != headers._rev:
            self._for, self._rev = headers, headers._rev
            self._vias = self._cseq = self._from = self._to = None

    def _parsed(self, slot: str, name: str, parser):
        self._cache()
        value = getattr(self, slot)
        if value is None:
            value = parser(self.headers.get(name) or "")
            setattr(self, slot, value)
        return value

    @property
    def vias(self) -> list[Via]:
        """Every Via, top first; the list is a cache: change the wire form via headers."""
        self._cache()
        if self._vias is None:
            self._vias = [parse_via(v) for v in self.headers.getall("Via")]
        return self._vias

    @property
    def top_via(self) -> Via | None:
        vias = self.vias
        return vias[0] if vias else None

    def set_top_via(self, via: Via) -> None:
        """Rewrite the top Via (e.g. add received/rport, RFC 3581) in the headers.

        The other parsed values stay cached: every request received has its Via
        stamped, and parsing From, To and CSeq again would double the parse."""
        headers = self.headers
        items = headers._items
        for i, (key, name, _) in enumerate(items):
            if key == "via":
                fresh = self._for is headers and self._rev == headers._rev
                items[i] = (key, name, via.to_str())
                headers._rev += 1
                if fresh:
                    self._rev = headers._rev
                    if self._vias:
                        self._vias[0] = via
                return
        headers.add("Via", via.to_str())

    @property
    def cseq(self) -> tuple[int, str]:
        """(sequence number, method); ParseError if absent or bad on a message built here."""
        return self._parsed("_cseq", "CSeq", parse_cseq)

    @property
    def call_id(self) -> str | None:
        return self.headers.get("Call-ID")

    @property
    def from_addr(self) -> NameAddr:
        return self._parsed("_from", "From", parse_name_addr)

    @property
    def to_addr(self) -> NameAddr:
        return self._parsed("_to", "To", parse_name_addr)

    def _key(self) -> tuple:  # pragma: no cover - overridden
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        """Structural equality: same start line, header fields in order, and body."""
        if type(other) is not type(self):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]

    def _to_bytes(self, start_line: str) -> bytes:
        body = self.body
        lines = [start_line]
        length = f"Content-Length: {len(body)}"
        joining = ""      # the token-list header the last line holds, if it may grow
        for key, name, value in self.headers._items:
            if key in _JOINED and '"' not in value and "<" not in value:
                if key == joining and len(lines[-1]) < MAX_JOINED_LINE_CHARS:
                    lines[-1] += ", " + value
                else:
                    lines.append(f"{name}: {value}")
                    joining = key
                continue
            joining = ""
            if key != "content-length":
                lines.append(f"{name}: {value}")
            elif length:
                lines.append(length)
                length = ""
        if length:
            lines.append(length)
        lines.append("\r\n")
        return "\r\n".join(lines).encode("utf-8", "surrogateescape") + body


class Request(_Message):
    """A request; `uri` is the Request-URI as received (see parse_uri to take it apart)."""

    __slots__ = ("method", "uri")

    def __init__(self, method: str, uri: str, headers: Headers | None = None,
                 body: bytes = b"", version: str = SIP_VERSION):
        super().__init__(headers, body, version)
        self.method = method
        self.uri = uri

    def to_bytes(self) -> bytes:
        return self._to_bytes(f"{self.method} {self.uri} {self.version}")

    def _key(self) -> tuple:
        return (self.method, self.uri, self.version, self.headers, self.body)

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri} call-id={self.call_id!r}>"


class Response(_Message):
    """A response; `reason` defaults to the phrase of REASONS (or of the status class)."""

    __slots__ = ("status", "reason")

    def __init__(self, status: int, reason: str | None = None, headers: Headers | None = None,
                 body: bytes = b"", version: str = SIP_VERSION):
        super().__init__(headers, body, version)
        self.status = status
        self.reason = default_reason(status) if reason is None else reason

    def to_bytes(self) -> bytes:
        return self._to_bytes(f"{self.version} {self.status} {self.reason}")

    def _key(self) -> tuple:
        return (self.status, self.reason, self.version, self.headers, self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason} call-id={self.call_id!r}>"


def default_reason(status: int) -> str:
    return REASONS.get(status) or _CLASS_REASONS.get(status // 100, "Unknown")


_ECHOED = ("from", "to", "call-id", "cseq")     # in this order, after the Vias


def make_response(request: Request, status: int, reason: str | None = None, *,
                  to_tag: str | None = None, headers: Iterable[tuple[str, str]] = (),
                  body: bytes = b"") -> Response:
    """A response to `request` per RFC 3261 8.2.6: Vias in order, From, To (tagged if
    `to_tag` and it had none), Call-ID, CSeq; then `headers`.  Works on the partial
    request of a `ParseError` too, which is how malformed requests get their 400."""
    out = []
    echoed: dict[str, tuple[str, str, str]] = {}
    for item in request.headers._items:         # one pass: this runs for every answer
        key = item[0]
        if key == "via":
            out.append(item)
        elif key in _ECHOED and key not in echoed:
            echoed[key] = item
    for key in _ECHOED:
        found = echoed.get(key)
        if found is None:
            continue
        item = found
        if key == "to" and to_tag is not None and request.to_addr.tag is None:
            if not is_token(to_tag):
                raise ValueError(f"bad To tag {to_tag!r}")
            item = (key, item[1], f"{item[2]};tag={to_tag}")
        out.append(item)
    response_headers = Headers()
    response_headers._items = out
    for name, value in headers:
        response_headers.add(name, value)
    return Response(status, reason, response_headers, body)


# The one entry point, re-exported: callers import parse with the message model.
from mpay.sip.parser import parse  # noqa: E402

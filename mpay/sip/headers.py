"""Header-field values of RFC 3261: Via, CSeq, name-addr (From/To/Contact), SIP URIs.

Sans-IO and string-only.  Every function here either returns a value object or raises
`ParseError`, never another exception, whatever the input: these run on bytes from the
network.  The parsers use str methods and a few anchored, linear regexes (no nested
quantifiers), so a hostile value costs time proportional to its length.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from mpay.sip.message import Request

MAGIC_COOKIE = "z9hG4bK"
MAX_CSEQ = 2**31 - 1          # RFC 3261 8.1.1.5: the sequence number is < 2**31
MAX_PORT = 65535

# Tokens seen in nearly every message: skip the regex for them.
_COMMON_TOKENS = frozenset(
    "ACK BYE CANCEL INFO INVITE MESSAGE NOTIFY OPTIONS PRACK RECEIVE REFER REGISTER SUBSCRIBE "
    "UPDATE 2.0 UDP TCP TLS SCTP WS WSS branch rport received maddr ttl tag expires q "
    "transport lr user method".split())
_TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
_HOST_RE = re.compile(r"[A-Za-z0-9\-.]+")
_IPV6_RE = re.compile(r"[0-9A-Fa-f:.]+")
_NEEDS_ESCAPE_RE = re.compile(r'["\\\x00-\x08\x0b\x0c\x0e-\x1f\x7f]')
_PARAM_VALUE_RE = re.compile(r'[^\x00-\x20\x7f";,<>\\]+')
# scheme ":" then printable ASCII: no spaces, no controls (RFC 3261 25.1, absoluteURI).
URI_RE = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*:[\x21-\x7e]+")


class ParseError(ValueError):
    """Malformed SIP; `status`/`reason` say how to answer, `message` whether we can.

    `message` is the partly parsed request when its Via, From, To, Call-ID and CSeq were
    usable, so a response can be addressed; otherwise None and the caller drops the input.
    """

    def __init__(self, status: int, reason: str, message: Request | None = None):
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.message = message


# Header names we know, spelled as we write them (RFC 3261 20 and common extensions).
_LONG_NAMES = (
    "Accept Accept-Contact Accept-Encoding Accept-Language Alert-Info Allow Allow-Events "
    "Authentication-Info Authorization Call-ID Call-Info Contact Content-Disposition "
    "Content-Encoding Content-Language Content-Length Content-Type CSeq Date Error-Info Event "
    "Expires From Identity Identity-Info In-Reply-To Max-Forwards MIME-Version Min-Expires "
    "Min-SE Organization P-Asserted-Identity Path Priority Proxy-Authenticate "
    "Proxy-Authorization Proxy-Require RAck Reason Record-Route Refer-To Referred-By "
    "Reject-Contact Reply-To Request-Disposition Require Retry-After Route RSeq Server "
    "Service-Route Session-Expires SIP-ETag SIP-If-Match Subject Subscription-State "
    "Supported Timestamp To Unsupported User-Agent Via Warning WWW-Authenticate").split()
# Headers whose value is a comma-separated list: split into one field per element.
# Not the challenges/credentials (commas inside one value) nor Date.
_LIST_NAMES = frozenset((
    "Accept Accept-Contact Accept-Encoding Accept-Language Alert-Info Allow Allow-Events "
    "Call-Info Contact Content-Encoding Content-Language Error-Info In-Reply-To "
    "P-Asserted-Identity Path Proxy-Require Reason Record-Route Reject-Contact Require Route "
    "Service-Route Supported Unsupported Via Warning").split())
_COMPACT_NAMES = {
    "a": "Accept-Contact", "b": "Referred-By", "c": "Content-Type", "d": "Request-Disposition",
    "e": "Content-Encoding", "f": "From", "i": "Call-ID", "j": "Reject-Contact",
    "k": "Supported", "l": "Content-Length", "m": "Contact", "n": "Identity-Info", "o": "Event",
    "r": "Refer-To", "s": "Subject", "t": "To", "u": "Allow-Events", "v": "Via",
    "x": "Session-Expires", "y": "Identity"}
KNOWN_NAMES: dict[str, tuple[str, str, bool]] = {}
for _name in _LONG_NAMES:
    _entry = (_name.lower(), _name, _name in _LIST_NAMES)
    KNOWN_NAMES[_name] = KNOWN_NAMES[_name.lower()] = KNOWN_NAMES[_name.upper()] = _entry
for _short, _name in _COMPACT_NAMES.items():
    KNOWN_NAMES[_short] = KNOWN_NAMES[_short.upper()] = KNOWN_NAMES[_name]


def header_name(name: str) -> tuple[str, str, bool]:
    """(lookup key, name to write, is a list header) for a header name as received.

    Known names and compact forms become the canonical long name; others keep their
    spelling.  The key is lower-case, since header names are case-insensitive."""
    entry = KNOWN_NAMES.get(name)
    if entry is None:
        name = name.strip(" \t")
        entry = KNOWN_NAMES.get(name) or KNOWN_NAMES.get(name.lower())
        if entry is None:
            entry = (name.lower(), name, False)
    return entry


def token_header_name(name: str) -> tuple[str, str, bool] | None:
    """``header_name``'s entry, or None when the name to write is no token."""
    entry = header_name(name)
    return entry if is_token(entry[1]) else None


def is_token(text: str) -> bool:
    """RFC 3261 token: methods, parameter names, header names."""
    return text in _COMMON_TOKENS or _TOKEN_RE.fullmatch(text) is not None


def _read_quoted(text: str, start: int) -> tuple[str, int]:
    """Unescape the quoted-string at text[start] == '"'; return it and the index after it."""
    parts = []
    i = start + 1
    while True:
        quote = text.find('"', i)
        if quote < 0:
            raise ParseError(400, "Unterminated quoted string")
        slash = text.find("\\", i, quote)
        if slash < 0:
            parts.append(text[i:quote])
            return "".join(parts), quote + 1
        if slash + 1 >= len(text):
            raise ParseError(400, "Unterminated quoted string")
        parts.append(text[i:slash])
        parts.append(text[slash + 1])
        i = slash + 2


def quote(text: str) -> str:
    """Quote a display name; controls become quoted-pairs, CR/LF (never legal) a space."""
    text = text.replace("\r", " ").replace("\n", " ")
    return '"' + _NEEDS_ESCAPE_RE.sub(r"\\\g<0>", text) + '"'


def split_quoted(text: str, sep: str, angle: bool = False) -> list[str]:
    """Split on `sep` outside quoted strings (and outside <...> when `angle`)."""
    if '"' not in text and not (angle and "<" in text):
        return text.split(sep)
    out = []
    start = i = 0
    n = len(text)
    in_quote = in_angle = False
    while i < n:
        ch = text[i]
        if in_quote:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_quote = False
        elif ch == '"':
            in_quote = True
        elif angle and ch == "<":
            in_angle = True
        elif angle and ch == ">":
            in_angle = False
        elif ch == sep and not in_angle:
            out.append(text[start:i])
            start = i + 1
        i += 1
    out.append(text[start:])
    return out


def split_list(value: str) -> list[str]:
    """Split a list header (Via, Contact, Allow...) into its elements; empties dropped."""
    if "," not in value:
        value = value.strip(" \t")
        return [value] if value else []
    return [p for p in (x.strip(" \t") for x in split_quoted(value, ",", angle=True)) if p]


def parse_params(text: str, what: str) -> dict[str, str | None]:
    """`;name[=value]` pairs after the first ';'.  Names are lower-cased (they are
    case-insensitive); quoted values keep their quotes so they serialise unchanged."""
    params: dict[str, str | None] = {}
    for piece in split_quoted(text, ";"):
        name, eq, value = piece.partition("=")
        name = name.strip(" \t")
        if not is_token(name):
            raise ParseError(400, f"Bad {what} parameter")
        if eq:
            value = value.strip(" \t")
            if value.startswith('"'):
                if _read_quoted(value, 0)[1] != len(value):
                    raise ParseError(400, f"Bad {what} parameter")
            elif _PARAM_VALUE_RE.fullmatch(value) is None:
                raise ParseError(400, f"Bad {what} parameter")
            params[name.lower()] = value
        else:
            params[name.lower()] = None
    return params


def format_params(params: dict[str, str | None]) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


def _parse_port(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 5) or int(text) > MAX_PORT:
        raise ParseError(400, f"Bad {what} port")
    return int(text)


def _parse_hostport(text: str, what: str) -> tuple[str, int | None]:
    """host[:port]; an IPv6 reference loses its brackets (sockets want it bare)."""
    if text.startswith("["):
        end = text.find("]")
        host, rest = text[1:end], text[end + 1:].strip(" \t")
        if end < 0 or _IPV6_RE.fullmatch(host) is None or ":" not in host:
            raise ParseError(400, f"Bad {what} host")
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ParseError(400, f"Bad {what} host")
        return host, _parse_port(rest[1:].strip(" \t"), what)
    host, colon, port = text.partition(":")
    host = host.rstrip(" \t")
    if _HOST_RE.fullmatch(host) is None:
        raise ParseError(400, f"Bad {what} host")
    return host, (_parse_port(port.strip(" \t"), what) if colon else None)


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class _Value:
    """Header values compare equal when they serialise equally."""

    __slots__ = ()

    def to_str(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.to_str() == other.to_str()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.to_str()}>"


class Via(_Value):
    """One Via value (RFC 3261 20.42): where to send the response, and the branch."""

    __slots__ = ("transport", "host", "port", "params", "protocol")

    def __init__(self, transport: str, host: str, port: int | None = None,
                 params: dict[str, str | None] | None = None, protocol: str = "SIP/2.0"):
        self.transport = transport
        self.host = host
        self.port = port
        self.params = {} if params is None else params
        self.protocol = protocol

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def rfc3261_branch(self) -> str | None:
        """The branch if it is an RFC 3261 one (cookie plus something), else None:
        a bare cookie (RFC 4475 "badbranch") identifies no transaction."""
        branch = self.params.get("branch")
        if branch and branch.startswith(MAGIC_COOKIE) and len(branch) > len(MAGIC_COOKIE):
            return branch
        return None

    @property
    def received(self) -> str | None:
        return self.params.get("received")

    @property
    def rport(self) -> str | None:
        """None if absent, "" if present without a value (RFC 3581 request), else the port."""
        if "rport" not in self.params:
            return None
        return self.params["rport"] or ""

    def to_str(self) -> str:
        port = "" if self.port is None else f":{self.port}"
        return (f"{self.protocol}/{self.transport} {_format_host(self.host)}{port}"
                f"{format_params(self.params)}")


# The forms nearly every message carries, read by one regex: a match gives exactly
# what the general parser gives (tests/test_sip_fuzz.py holds the two together).
_PLAIN_VIA_RE = re.compile(r"SIP/2\.0/(UDP|TCP|TLS) ([A-Za-z0-9\-.]+):([0-9]{1,5});branch="
                           r"([A-Za-z0-9\-.!%*_+`'~]+)(;rport)?")
_PLAIN_NAME_ADDR_RE = re.compile(r"<([A-Za-z][A-Za-z0-9+\-.]*:[\x21-\x3d\x3f-\x7e]+)>"
                                 r"(?:;tag=([A-Za-z0-9\-.!%*_+`'~]+))?")


def parse_via(value: str) -> Via:
    """Parse one Via value; LWS around '/', ':', ';' and '=' is allowed (RFC 4475 wsinv)."""
    plain = _PLAIN_VIA_RE.fullmatch(value)
    if plain is not None:
        transport, host, port, branch, rport = plain.groups()
        if int(port) <= MAX_PORT:
            params = {"branch": branch, "rport": None} if rport else {"branch": branch}
            return Via(transport, host, int(port), params, "SIP/2.0")
    return _parse_via(value)


def _parse_via(value: str) -> Via:
    head, semi, rest = value.partition(";")
    name, _, rest_head = head.partition("/")
    version, slash, rest_head = rest_head.partition("/")
    transport, _, sent_by = rest_head.replace("\t", " ").strip(" ").partition(" ")
    name, version = name.strip(" \t").upper(), version.strip(" \t")
    if not (slash and name == "SIP" and is_token(version) and is_token(transport)):
        raise ParseError(400, "Bad Via")
    host, port = _parse_hostport(sent_by.strip(" "), "Via")
    params = parse_params(rest, "Via") if semi else {}
    return Via(transport.upper(), host, port, params, f"SIP/{version}")


def parse_cseq(value: str) -> tuple[int, str]:
    """CSeq: sequence number (0 .. 2**31-1, leading zeros allowed) and method."""
    parts = value.split()
    if len(parts) != 2:
        raise ParseError(400, "Bad CSeq")
    number, method = parts
    if not (number.isascii() and number.isdigit() and is_token(method)):
        raise ParseError(400, "Bad CSeq")
    number = number.lstrip("0") or "0"
    if len(number) > 10 or int(number) > MAX_CSEQ:
        raise ParseError(400, "Bad CSeq")
    return int(number), method


class NameAddr(_Value):
    """From/To/Contact/Refer-To/Route value: optional display name, URI, header params."""

    __slots__ = ("display", "uri", "params")

    def __init__(self, display: str | None, uri: str, params: dict[str, str | None] | None = None):
        self.display = display
        self.uri = uri
        self.params = {} if params is None else params

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    def to_str(self) -> str:
        if self.uri == "*":
            return "*" + format_params(self.params)
        display = "" if self.display is None else quote(self.display) + " "
        return f"{display}<{self.uri}>{format_params(self.params)}"


def parse_name_addr(value: str) -> NameAddr:
    """name-addr or addr-spec with header params; Contact's "*" gives uri "*".

    A bare URI (no <>) may not contain ',' or '?' (RFC 3261 20.10), and none may have
    spaces inside the brackets (RFC 4475 "badaspec")."""
    plain = _PLAIN_NAME_ADDR_RE.fullmatch(value)
    if plain is not None:
        uri, tag = plain.groups()
        return NameAddr(None, uri, {} if tag is None else {"tag": tag})
    return _parse_name_addr(value)


def _parse_name_addr(value: str) -> NameAddr:
    text = value.strip(" \t")
    display: str | None
    if text.startswith('"'):
        display, end = _read_quoted(text, 0)
        rest = text[end:].lstrip(" \t")
        if not rest.startswith("<"):
            raise ParseError(400, "Bad address")
    else:
        lt, semi = text.find("<"), text.find(";")
        if lt < 0 or (0 <= semi < lt):
            uri, _, params = text.partition(";")
            uri = uri.rstrip(" \t")
            if uri == "*":
                return NameAddr(None, "*", parse_params(params, "address") if params else {})
            if URI_RE.fullmatch(uri) is None or "?" in uri or "," in uri:
                raise ParseError(400, "Bad address")
            return NameAddr(None, uri, parse_params(params, "address") if semi >= 0 else {})
        bare = text[:lt].rstrip(" \t")
        if bare and any(not is_token(word) for word in bare.split()):
            raise ParseError(400, "Bad display name")
        display = bare or None
        rest = text[lt:]
    gt = rest.find(">")
    uri = rest[1:gt]
    if gt < 0 or URI_RE.fullmatch(uri) is None:
        raise ParseError(400, "Bad address")
    tail = rest[gt + 1:].lstrip(" \t")
    if not tail:
        return NameAddr(display, uri, {})
    if not tail.startswith(";"):
        raise ParseError(400, "Bad address")
    return NameAddr(display, uri, parse_params(tail[1:], "address"))

"""SIP URIs (RFC 3261 19.1): sip:/sips: split into their parts, escapes left as written.

Kept apart from the header-value parsers: a URI is what routing, the
registrar and account lookup take apart, long after a message was parsed.
"""

from __future__ import annotations

from mpay.sip.headers import (
    URI_RE, ParseError, _format_host, _parse_hostport, _Value, format_params, parse_params,
)


class SipURI(_Value):
    """sip:/sips: URI split into parts (RFC 3261 19.1); escapes are left as written."""

    __slots__ = ("scheme", "user", "password", "host", "port", "params", "headers")

    def __init__(self, scheme: str, user: str | None, host: str, port: int | None = None,
                 params: dict[str, str | None] | None = None, headers: str | None = None,
                 password: str | None = None):
        self.scheme = scheme
        self.user = user
        self.password = password
        self.host = host
        self.port = port
        self.params = {} if params is None else params
        self.headers = headers

    def to_str(self) -> str:
        user = ""
        if self.user is not None:
            password = "" if self.password is None else ":" + self.password
            user = f"{self.user}{password}@"
        port = "" if self.port is None else f":{self.port}"
        headers = "" if self.headers is None else "?" + self.headers
        return (f"{self.scheme}:{user}{_format_host(self.host)}{port}"
                f"{format_params(self.params)}{headers}")


def parse_uri(value: str) -> SipURI:
    """Split a sip:/sips: URI; any other scheme is 416 Unsupported URI Scheme."""
    if URI_RE.fullmatch(value) is None:
        raise ParseError(400, "Bad URI")
    scheme, _, rest = value.partition(":")
    scheme = scheme.lower()
    if scheme not in ("sip", "sips"):
        raise ParseError(416, "Unsupported URI Scheme")
    user = password = None
    at = rest.find("@")
    if at >= 0:
        user, colon, pw = rest[:at].partition(":")
        password = pw if colon else None
        rest = rest[at + 1:]
        if not user:
            raise ParseError(400, "Bad URI")
    rest, qmark, headers = rest.partition("?")
    hostport, semi, params = rest.partition(";")
    host, port = _parse_hostport(hostport, "URI")
    return SipURI(scheme, user, host, port, parse_params(params, "URI") if semi else {},
                  headers if qmark else None, password)

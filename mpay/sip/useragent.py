"""Building the requests a server or device originates (RFC 3261 8.1.1).

The AS sends REFER, the PS forwards notices and charge requests, the DMD sends
everything: all of them need a fresh branch, tag and Call-ID and the same
mandatory headers, built here once.
"""

from __future__ import annotations

import os
from typing import Iterable

from mpay.sip.headers import MAX_CSEQ, is_token
from mpay.sip.message import MAGIC_COOKIE, Headers, Request, Via, refuse_line_break

MAX_FORWARDS = 70
_MAX_FORWARDS_TEXT = str(MAX_FORWARDS)
BRANCH_RANDOM_BYTES = 8    # 64 bits: unique per transaction, per RFC 3261 8.1.1.7
TAG_RANDOM_BYTES = 6


RANDOM_POOL_BYTES = 4096
"""Randomness drawn from the OS at a time for branches, tags and Call-IDs: one
getrandom call per few hundred identifiers instead of one each (same source)."""

CALL_ID_RANDOM_BYTES = 10


class _RandomPool:
    """Hex identifiers cut from a buffer of os.urandom; used on the reactor thread."""

    def __init__(self, size: int = RANDOM_POOL_BYTES):
        self.size = size
        self._hex = ""
        self._at = 0

    def hex(self, nbytes: int) -> str:
        end = self._at + 2 * nbytes
        if end > len(self._hex):
            self._hex, self._at, end = os.urandom(self.size).hex(), 0, 2 * nbytes
        value = self._hex[self._at:end]
        self._at = end
        return value


_pool = _RandomPool()


def new_branch() -> str:
    return MAGIC_COOKIE + _pool.hex(BRANCH_RANDOM_BYTES)


def new_tag() -> str:
    return _pool.hex(TAG_RANDOM_BYTES)


def new_call_id(host: str) -> str:
    return f"{_pool.hex(CALL_ID_RANDOM_BYTES)}@{host}"


def build_request(method: str, uri: str, *, sent_by: tuple[str, int], from_uri: str,
                  to_uri: str, call_id: str, cseq: int, from_tag: str | None = None,
                  to_tag: str | None = None, contact: str | None = None,
                  branch: str | None = None, headers: Iterable[tuple[str, str]] = (),
                  body: bytes = b"", content_type: str | None = None) -> Request:
    """A request outside or inside a dialog; ``rport`` asks to be answered where we sent from.

    The mandatory fields are written as the parser would store them, and the
    Via and CSeq they carry are cached on the request: the PS builds one of
    these for every notice, and its client transaction reads both at once.
    """
    host, port = sent_by
    branch = branch or new_branch()
    at = f"[{host}]" if ":" in host else host        # an IPv6 reference is bracketed
    fields = Headers()
    fields._items = [
        ("via", "Via", f"SIP/2.0/UDP {at}:{port};branch={branch};rport"),
        ("max-forwards", "Max-Forwards", _MAX_FORWARDS_TEXT),
        ("from", "From", f"<{from_uri}>;tag={from_tag or new_tag()}"),
        ("to", "To", f"<{to_uri}>" + (f";tag={to_tag}" if to_tag else "")),
        ("call-id", "Call-ID", call_id),
        ("cseq", "CSeq", f"{cseq} {method}"),
    ]
    for _, _, value in fields._items:
        refuse_line_break(value)
    if contact is not None:
        fields.add("Contact", f"<{contact}>")
    for name, value in headers:
        fields.add(name, value)
    if content_type is not None:
        fields.add("Content-Type", content_type)
    request = Request(method, uri, fields, body)
    if is_token(method) and 0 <= cseq <= MAX_CSEQ:
        request._cache()
        request._vias = [Via("UDP", host, port, {"branch": branch, "rport": None})]
        request._cseq = (cseq, method)
    return request

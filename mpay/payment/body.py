"""The JSON bodies of mpay's own SIP requests: one reader, one set of refusals."""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii
from math import isfinite

from mpay.sip.message import Request


def json_scalar(value: object) -> str:
    """One JSON scalar exactly as ``json.dumps`` writes it (ASCII only).

    The PS's fixed-shape bodies (receipt, notice, result) are formatted from
    these: a template and seven of these take a third of ``json.dumps``'s
    time, which builds an encoder and walks the dict on every call.
    """
    if type(value) is str:
        return encode_basestring_ascii(value)
    if type(value) is int:
        return int.__repr__(value)
    if type(value) is float and isfinite(value):
        return float.__repr__(value)
    return json.dumps(value)


def media_type(request: Request) -> str:
    """The Content-Type without parameters, lower-cased (RFC 3261 20.15)."""
    return (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()


def json_body(request: Request, content_type: str, max_bytes: int, noun: str) -> dict:
    """The body as a JSON object, or ValueError whose message is the reason phrase."""
    if media_type(request) != content_type:
        raise ValueError(f"Not A {noun}")
    if len(request.body) > max_bytes:
        raise ValueError(f"{noun} Body Too Large")
    try:
        body = json.loads(request.body or b"{}")
    except ValueError:
        raise ValueError(f"Malformed {noun} Body") from None
    if not isinstance(body, dict):
        raise ValueError(f"Malformed {noun} Body")
    return body

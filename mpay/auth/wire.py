"""The auth layer's SIP header fields, written and read in one place for AS, PS and DMD.

Names follow RFC 6648 (no ``X-``); values are a scheme word and base64url
without padding, e.g. ``Mpay-Key-Share: x25519 3p8s...``.  docs/protocol.rst
shows them in complete messages.
"""

from __future__ import annotations

from mpay.auth.crypto import DecodeError, decode_b64, encode_b64
from mpay.auth.keyagreement import ENROLMENT_NONCE_BYTES
from mpay.auth.tickets import request_digest

KEY_SHARE_HEADER = "Mpay-Key-Share"        # REGISTER (DMD's X25519) and the final 200 (AS's)
NONCE_HEADER = "Mpay-Nonce"                # the sender's enrolment nonce
SIGNING_KEY_HEADER = "Mpay-Signing-Key"    # REGISTER: the DMD's Ed25519 public key
AS_SIGNATURE_HEADER = "Mpay-AS-Signature"  # final 200: Ed25519 over the transcript
CHALLENGE_SCHEME = "MpayCallerID"          # WWW-Authenticate scheme of the enrolment 401

X25519_BYTES = 32
ED25519_PUBLIC_BYTES = 32
ED25519_SIGNATURE_BYTES = 64
_MAX_B64_CHARS = 128


class BadField(ValueError):
    """A header field that cannot be used; the message is the reason phrase."""


def _decoded(encoded: str, size: int, header: str) -> bytes:
    try:
        raw = decode_b64(encoded.strip(), _MAX_B64_CHARS)
    except DecodeError:
        raise BadField(f"Bad {header}") from None
    if len(raw) != size:
        raise BadField(f"Bad {header}")
    return raw


def _scheme_value(value: str | None, scheme: str, size: int, header: str) -> bytes:
    if value is None:
        raise BadField(f"Missing {header}")
    word, _, encoded = value.strip().partition(" ")
    if word.lower() != scheme:
        raise BadField(f"Bad {header}")
    return _decoded(encoded, size, header)


def key_share(raw: bytes) -> str:
    return f"x25519 {encode_b64(raw)}"


def read_key_share(value: str | None) -> bytes:
    return _scheme_value(value, "x25519", X25519_BYTES, KEY_SHARE_HEADER)


def signing_key(raw: bytes) -> str:
    return f"ed25519 {encode_b64(raw)}"


def read_signing_key(value: str | None) -> bytes:
    return _scheme_value(value, "ed25519", ED25519_PUBLIC_BYTES, SIGNING_KEY_HEADER)


def signature(raw: bytes) -> str:
    return f"ed25519 {encode_b64(raw)}"


def read_signature(value: str | None) -> bytes:
    return _scheme_value(value, "ed25519", ED25519_SIGNATURE_BYTES, AS_SIGNATURE_HEADER)


def nonce(raw: bytes) -> str:
    return encode_b64(raw)


def read_nonce(value: str | None) -> bytes:
    if value is None:
        raise BadField(f"Missing {NONCE_HEADER}")
    return _decoded(value, ENROLMENT_NONCE_BYTES, NONCE_HEADER)


def challenge(line_uri: str) -> str:
    return f'{CHALLENGE_SCHEME} line="{line_uri}"'


def read_challenge(value: str | None) -> str:
    """The tel: URI of the line to call, from the 401's WWW-Authenticate."""
    if value is None or not value.startswith(CHALLENGE_SCHEME + " "):
        raise BadField("Missing caller-ID challenge")
    _, _, rest = value.partition('line="')
    line, quote, _ = rest.partition('"')
    if not quote or not line.startswith("tel:"):
        raise BadField("Bad caller-ID challenge")
    return line


def digest_of(request) -> bytes:
    """The digest an authenticator must carry for *request* (DESIGN section 4)."""
    cseq_num, cseq_method = request.cseq
    return request_digest(request.method, request.uri, request.call_id, cseq_num, cseq_method,
                          request.body)

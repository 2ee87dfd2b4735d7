"""Tickets, session parts and authenticators (DESIGN section 4): the sealed formats.

The AS issues a *ticket* sealed with K_PS, which only the PS opens, and a
*session part* sealed with the device's K, which only the DMD opens; both
carry the session key K_C,PS.  For every request the DMD seals a fresh
*authenticator* with K_C,PS that names the request by its digest.

The formats live here; the checks (``TicketVerifier``, the replay cache) in
``mpay.auth.verifier``.  Byte layouts are in ``docs/tickets.rst``.  All times inside the layouts are integer
milliseconds since the Unix epoch; the API speaks float seconds.
"""

from __future__ import annotations

import hashlib
import os
import socket
import hmac
import struct
from typing import NamedTuple

from mpay.auth.crypto import (
    KEY_BYTES, AeadKey, ByteReader, DecodeError, KeyRing, OpenFailed,
    decode_b64, encode_b64, generate_key, pack_u64, pack_var8,
)
from mpay.e164 import is_e164

TICKET_LIFETIME_S = 8 * 3600
CLOCK_SKEW_S = 300
NONCE_BYTES = 16
DIGEST_BYTES = 32
MAX_WIRE_CHARS = 1024
MS_PER_S = 1000
MAX_OPENING_KEYS = 4096
"""K_C,PS keys kept ready to open authenticators: one per active device, oldest dropped."""

TICKET_PURPOSE = b"mpay-ticket-v1"
SESSION_PURPOSE = b"mpay-session-v1"
AUTHENTICATOR_PURPOSE = b"mpay-authenticator-v1"
TICKET_REQUEST_PURPOSE = b"mpay-ticket-request-v1"   # same layout, sealed with K, to the AS
REQUEST_DIGEST_LABEL = b"mpay-request-digest-v1"

TICKET_HEADER = "Mpay-Ticket"          # RFC 6648: no X- prefix
AUTHENTICATOR_HEADER = "Mpay-Authenticator"
SESSION_HEADER = "Mpay-Session"

_IP_BYTES = (4, 16)
_CSEQ_NUMBER_LENGTH = b"\0\0\0\4"      # the u32 length of a u32
_V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
_U32 = struct.Struct("!I")


# -- fields ---------------------------------------------------------------------------


def to_ms(seconds: float) -> int:
    return int(seconds * MS_PER_S)


def pack_ip(address: str) -> bytes:
    """4 or 16 bytes; an IPv4-mapped IPv6 address becomes its IPv4 form, so a
    dual-stack socket and a v4 DMD agree.  ValueError if it is no address."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            packed = socket.inet_pton(family, address)
        except (OSError, ValueError):
            continue
        return packed[12:] if packed.startswith(_V4_MAPPED_PREFIX) else packed
    raise ValueError(f"not an IP address: {address!r}")


def unpack_ip(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)


def _number_field(number: str) -> bytes:
    if not is_e164(number):
        raise ValueError(f"not an E.164 number: {number!r}")
    return pack_var8(number.encode("ascii"))


def _read_number(reader: ByteReader) -> str:
    raw = reader.var8()
    try:
        number = raw.decode("ascii")
    except UnicodeDecodeError:
        raise DecodeError("number is not ASCII") from None
    if not is_e164(number):
        raise DecodeError("number is not E.164")
    return number


def _read_ip(reader: ByteReader) -> bytes:
    packed = reader.var8()
    if len(packed) not in _IP_BYTES:
        raise DecodeError("address is neither 4 nor 16 bytes")
    return packed


def _read_text(reader: ByteReader) -> str:
    try:
        text = reader.var8().decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("text is not UTF-8") from None
    if not text:
        raise DecodeError("empty text field")
    return text


def _text_field(text: str) -> bytes:
    raw = text.encode("utf-8")
    if not 0 < len(raw) <= 255:
        raise ValueError("a text field is 1..255 bytes of UTF-8")
    return pack_var8(raw)


# -- the three sealed layouts -----------------------------------------------------------


class Ticket(NamedTuple):
    """Plaintext of a ticket: who, from where, for which PS, when, and K_C,PS."""

    number: str
    ip: bytes
    ps_id: str
    issued_ms: int
    expires_ms: int
    k_c_ps: bytes

    def encode(self) -> bytes:
        assert len(self.k_c_ps) == KEY_BYTES and self.issued_ms <= self.expires_ms
        return b"".join((_number_field(self.number), pack_var8(self.ip), _text_field(self.ps_id),
                         pack_u64(self.issued_ms), pack_u64(self.expires_ms), self.k_c_ps))

    @classmethod
    def decode(cls, data: bytes) -> Ticket:
        r = ByteReader(data)
        ticket = cls(_read_number(r), _read_ip(r), _read_text(r), r.u64(), r.u64(),
                     r.take(KEY_BYTES))
        r.end()
        if ticket.issued_ms > ticket.expires_ms:
            raise DecodeError("ticket expires before it is issued")
        return ticket


class SessionPart(NamedTuple):
    """Plaintext the DMD opens with K: the session key and what it is good for."""

    k_c_ps: bytes
    nonce: bytes
    expires_ms: int
    ps_id: str

    def encode(self) -> bytes:
        assert len(self.k_c_ps) == KEY_BYTES and len(self.nonce) == NONCE_BYTES
        return self.k_c_ps + self.nonce + pack_u64(self.expires_ms) + _text_field(self.ps_id)

    @classmethod
    def decode(cls, data: bytes) -> SessionPart:
        r = ByteReader(data)
        part = cls(r.take(KEY_BYTES), r.take(NONCE_BYTES), r.u64(), _read_text(r))
        r.end()
        return part


class Authenticator(NamedTuple):
    """Plaintext of an authenticator: fresh per request, bound to it by the digest."""

    number: str
    ip: bytes
    timestamp_ms: int
    nonce: bytes
    digest: bytes

    def encode(self) -> bytes:
        assert len(self.nonce) == NONCE_BYTES and len(self.digest) == DIGEST_BYTES
        return b"".join((_number_field(self.number), pack_var8(self.ip),
                         pack_u64(self.timestamp_ms), self.nonce, self.digest))

    @classmethod
    def decode(cls, data: bytes) -> Authenticator:
        r = ByteReader(data)
        auth = cls(_read_number(r), _read_ip(r), r.u64(), r.take(NONCE_BYTES),
                   r.take(DIGEST_BYTES))
        r.end()
        return auth


class IssuedTicket(NamedTuple):
    ticket: str
    k_c_ps: bytes
    expires: float


def issue_ticket(k_ps: KeyRing, number: str, ip: str, ps_id: str, now: float,
                 lifetime_s: float = TICKET_LIFETIME_S) -> IssuedTicket:
    """AS side: a fresh K_C,PS and the ticket carrying it, sealed with the current K_PS.

    ValueError for a number, address or PS id that does not fit the layout.
    """
    assert lifetime_s > 0, "ticket lifetime must be positive"
    issued_ms = to_ms(now)
    ticket = Ticket(number, pack_ip(ip), ps_id, issued_ms, issued_ms + to_ms(lifetime_s),
                    generate_key())
    sealed = k_ps.seal(TICKET_PURPOSE, ticket.encode())
    return IssuedTicket(encode_b64(sealed), ticket.k_c_ps, ticket.expires_ms / MS_PER_S)


def open_ticket(k_ps: KeyRing, ticket_b64: str | bytes) -> Ticket:
    """Opens a ticket (PS, or AS on renewal); raises a CryptoError subclass only."""
    return Ticket.decode(k_ps.open(TICKET_PURPOSE, decode_b64(ticket_b64, MAX_WIRE_CHARS)))


def seal_session_part(k: bytes, number: str, k_c_ps: bytes, nonce: bytes, expires: float,
                      ps_id: str) -> str:
    """AS side: the part only the enrolled DMD opens, bound to its number."""
    part = SessionPart(k_c_ps, nonce, to_ms(expires), ps_id)
    return encode_b64(AeadKey(k).seal(SESSION_PURPOSE, part.encode(), number.encode("utf-8")))


def open_session_part(k: bytes, number: str, session_b64: str | bytes,
                      expected_nonce: bytes) -> SessionPart:
    """DMD side; refuses a part that answers another ticket request (stale or replayed)."""
    sealed = decode_b64(session_b64, MAX_WIRE_CHARS)
    part = SessionPart.decode(AeadKey(k).open(SESSION_PURPOSE, sealed, number.encode("utf-8")))
    if not hmac.compare_digest(part.nonce, expected_nonce):
        raise OpenFailed("session part answers another request (nonce differs)")
    return part


def request_digest(method: str, uri: str, call_id: str, cseq_num: int, cseq_method: str,
                   body: bytes) -> bytes:
    """SHA-256 naming one request: the strings exactly as on the wire (no case
    folding), each with a four-byte length, so no two requests share an encoding."""
    if not 0 <= cseq_num < 2**32:
        raise ValueError("CSeq number out of range")
    # Written out rather than looped: the PS computes one for every request.
    u32 = _U32.pack
    m, u, c, cm = (method.encode("utf-8"), uri.encode("utf-8"), call_id.encode("utf-8"),
                   cseq_method.encode("utf-8"))
    return hashlib.sha256(b"".join((
        REQUEST_DIGEST_LABEL, u32(len(m)), m, u32(len(u)), u, u32(len(c)), c,
        _CSEQ_NUMBER_LENGTH, u32(cseq_num), u32(len(cm)), cm, u32(len(body)), body))).digest()


def make_authenticator(k_c_ps: bytes, number: str, ip: str, digest: bytes, now: float,
                       nonce: bytes | None = None, purpose: bytes = AUTHENTICATOR_PURPOSE) -> str:
    """DMD side: the authenticator for one request (a fresh random nonce by default).

    With K and ``TICKET_REQUEST_PURPOSE`` it is the ticket request's proof of K.
    """
    if nonce is None:
        nonce = os.urandom(NONCE_BYTES)
    auth = Authenticator(number, pack_ip(ip), to_ms(now), nonce, digest)
    return encode_b64(AeadKey(k_c_ps).seal(purpose, auth.encode()))


def open_authenticator(k_c_ps: bytes, authenticator_b64: str | bytes,
                       purpose: bytes = AUTHENTICATOR_PURPOSE) -> Authenticator:
    """Raises a CryptoError subclass only; checking it is the caller's (or the verifier's)."""
    sealed = decode_b64(authenticator_b64, MAX_WIRE_CHARS)
    # Only a ticket's K_C,PS is kept: the AS's K (a ticket request) is not worth keeping.
    key = _opening_key(k_c_ps) if purpose == AUTHENTICATOR_PURPOSE else AeadKey(k_c_ps)
    return Authenticator.decode(key.open(purpose, sealed))


_opening_keys: dict[bytes, AeadKey] = {}


def _opening_key(k_c_ps: bytes) -> AeadKey:
    """The AeadKey of a ticket's K_C,PS, built once per device rather than per request
    (its AES key schedule and key id were 6 us of each payment).  Opening never
    counts against a key's seal budget, so sharing one is safe."""
    key = _opening_keys.get(k_c_ps)
    if key is None:
        if len(_opening_keys) >= MAX_OPENING_KEYS:
            del _opening_keys[next(iter(_opening_keys))]
        key = _opening_keys[k_c_ps] = AeadKey(k_c_ps)
    return key

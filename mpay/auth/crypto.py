"""Cryptographic primitives of mpay: AEAD envelopes, key rings, signatures, key files.

Sans-IO except for the key-file helpers at the bottom, which only touch the
files they are named.  Everything sealed in mpay goes through one envelope,
described byte by byte in ``docs/tickets.rst``::

    version (1) | key id (4) | nonce (12) | ciphertext || GCM tag (16)

AES-256-GCM with a random 96-bit nonce.  The associated data is the 5-byte
header, then a one-byte length and a *purpose* label such as
``b"mpay-ticket-v1"``, then optional caller data (the number, for a sealed
device key).  The header in the AD stops a blob being re-labelled with
another version or key id; the purpose stops a blob of one kind being
accepted as another, even under the same key.

A key id is not chosen by an operator but derived from the key (SHA-256,
truncated), so two files can never give one id to two different keys.  A
``KeyRing`` holds several keys: the first seals, all open, which is how K_PS
and the master key rotate without a flag day.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
import struct
from typing import Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nacl import bindings as sodium
from nacl.exceptions import CryptoError as SodiumError

ENVELOPE_VERSION = 1
KEY_BYTES = 32
KEY_ID_BYTES = 4
AEAD_NONCE_BYTES = 12
AEAD_TAG_BYTES = 16
ENVELOPE_HEADER_BYTES = 1 + KEY_ID_BYTES
ENVELOPE_OVERHEAD_BYTES = ENVELOPE_HEADER_BYTES + AEAD_NONCE_BYTES + AEAD_TAG_BYTES
# NIST SP 800-38D: with random 96-bit nonces, at most 2**32 messages per key.
AEAD_MAX_SEALS_PER_KEY = 2**32
MAX_PURPOSE_BYTES = 255
KEY_ID_LABEL = b"mpay-key-id-v1"
DEVICE_KEY_PURPOSE = b"mpay-device-key-v1"

ED25519_PUBLIC_BYTES = 32
ED25519_SIGNATURE_BYTES = 64
# Signing keys whose libsodium form is kept: the PS's, and a load generator's payers.
MAX_CACHED_SIGNING_KEYS = 4096

_B64URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_PADDING = (b"", b"", b"==", b"=")
# The last character of a text 2 or 3 characters past a quantum carries 4 or 2 bits
# that encode nothing: canonical text has them zero.
_CANONICAL_LAST = {2: frozenset(_B64URL_ALPHABET[::16]), 3: frozenset(_B64URL_ALPHABET[::4])}
_U64 = struct.Struct("!Q")


class CryptoError(Exception):
    """Base of every refusal raised by mpay's crypto and ticket decoding."""


class DecodeError(CryptoError, ValueError):
    """Bytes or text that do not have the documented layout."""


class UnknownKeyId(CryptoError):
    """An envelope names a key this ring does not hold (rotated out, or another system's)."""


class OpenFailed(CryptoError):
    """The GCM tag did not verify: wrong key, wrong purpose or data, or tampered bytes."""


class BadSignature(CryptoError):
    """An Ed25519 signature that does not verify."""




class KeyExhausted(CryptoError):
    """A key sealed its budget of messages in this process: rotate it."""


# -- wire codec shared by every layout ------------------------------------------------


def encode_b64(data: bytes) -> str:
    """base64url without padding: safe in a SIP header value and a URI.  (binascii
    directly: ``base64.urlsafe_b64encode`` is two Python frames, four times a transfer.)"""
    return binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(
        b"=").decode("ascii")


def decode_b64(text: str | bytes, max_chars: int) -> bytes:
    """Strict inverse of ``encode_b64``; anything else (padding, other alphabets,
    non-canonical trailing bits, more than *max_chars*) is a DecodeError."""
    if isinstance(text, str):
        try:
            text = text.encode("ascii")
        except UnicodeEncodeError:
            raise DecodeError("not ASCII") from None
    if len(text) > max_chars:
        raise DecodeError(f"longer than {max_chars} characters")
    tail = len(text) % 4
    # strict_mode refuses what is outside the standard alphabet and any padding in the
    # middle; the standard alphabet's two characters and padding are refused here, by
    # deleting them in the same pass that maps the alphabet (``b"+" in text`` is dear:
    # bytes.__contains__ first tries its argument as an int, and raises and clears).
    standard = text.translate(_FROM_URLSAFE, b"+/=")
    if tail == 1 or len(standard) != len(text):
        raise DecodeError("not unpadded base64url")
    try:
        data = binascii.a2b_base64(standard + _PADDING[tail], strict_mode=True)
    except binascii.Error:
        raise DecodeError("not unpadded base64url") from None
    if tail and text[-1] not in _CANONICAL_LAST[tail]:
        raise DecodeError("non-canonical base64url")   # unused low bits set
    return data


def pack_var8(data: bytes) -> bytes:
    """A field of at most 255 bytes, preceded by its one-byte length."""
    assert len(data) <= 255, "var8 field too long"
    return bytes((len(data),)) + data


def pack_u64(value: int) -> bytes:
    return _U64.pack(value)


class ByteReader:
    """Reads a layout front to back; every shortfall or leftover is a DecodeError."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes):
        self._data = data
        self._pos = 0

    def take(self, size: int) -> bytes:
        end = self._pos + size
        if end > len(self._data):
            raise DecodeError("truncated")
        chunk = self._data[self._pos:end]
        self._pos = end
        return chunk

    def var8(self) -> bytes:
        return self.take(self.take(1)[0])

    def u64(self) -> int:
        return _U64.unpack(self.take(8))[0]

    def end(self) -> None:
        if self._pos != len(self._data):
            raise DecodeError("trailing bytes")


# -- AEAD envelope --------------------------------------------------------------------


def generate_key() -> bytes:
    """A fresh 256-bit secret from the OS CSPRNG (K_PS, master key, K_C,PS)."""
    return os.urandom(KEY_BYTES)


def derive_key_id(key: bytes) -> bytes:
    """The envelope's key id: names a key without revealing anything about it."""
    return hashlib.sha256(KEY_ID_LABEL + key).digest()[:KEY_ID_BYTES]


def envelope_key_id(envelope: bytes) -> bytes:
    """The key id an envelope claims, after checking its size and version."""
    if len(envelope) < ENVELOPE_OVERHEAD_BYTES:
        raise DecodeError("envelope too short")
    if envelope[0] != ENVELOPE_VERSION:
        raise DecodeError(f"envelope version {envelope[0]} unsupported")
    return envelope[1:ENVELOPE_HEADER_BYTES]


def _associated_data(header: bytes, purpose: bytes, ad: bytes) -> bytes:
    assert 0 < len(purpose) <= MAX_PURPOSE_BYTES, "purpose label required"
    return header + bytes((len(purpose),)) + purpose + ad


class AeadKey:
    """One AES-256-GCM key with its derived id; the AESGCM object is built once."""

    __slots__ = ("secret", "key_id", "_header", "_aead", "seals")

    def __init__(self, secret: bytes):
        if len(secret) != KEY_BYTES:
            raise ValueError(f"an AEAD key is {KEY_BYTES} bytes, not {len(secret)}")
        self.secret = bytes(secret)
        self.key_id = derive_key_id(self.secret)
        self._header = bytes((ENVELOPE_VERSION,)) + self.key_id
        self._aead = AESGCM(self.secret)
        self.seals = 0

    def __repr__(self) -> str:
        return f"<AeadKey id={self.key_id.hex()}>"

    def seal(self, purpose: bytes, plaintext: bytes, ad: bytes = b"") -> bytes:
        """Envelope of *plaintext*, bound to *purpose* and *ad*."""
        if self.seals >= AEAD_MAX_SEALS_PER_KEY:
            raise KeyExhausted(f"key {self.key_id.hex()} sealed {self.seals} messages")
        self.seals += 1
        nonce = os.urandom(AEAD_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext, _associated_data(self._header, purpose, ad))
        return self._header + nonce + sealed

    def open(self, purpose: bytes, envelope: bytes, ad: bytes = b"") -> bytes:
        """Plaintext of an envelope sealed by this very key for this purpose and *ad*."""
        if envelope_key_id(envelope) != self.key_id:
            raise UnknownKeyId(f"sealed under key {envelope[1:ENVELOPE_HEADER_BYTES].hex()}")
        nonce = envelope[ENVELOPE_HEADER_BYTES:ENVELOPE_HEADER_BYTES + AEAD_NONCE_BYTES]
        sealed = envelope[ENVELOPE_HEADER_BYTES + AEAD_NONCE_BYTES:]
        try:
            return self._aead.decrypt(nonce, sealed, _associated_data(self._header, purpose, ad))
        except InvalidTag:
            raise OpenFailed("authentication tag mismatch") from None


class KeyRing:
    """Keys by id: the first seals, every one opens (rotation of K_PS, master key)."""

    def __init__(self, keys: Iterable[bytes | AeadKey]):
        self._keys: dict[bytes, AeadKey] = {}
        for key in keys:
            aead_key = key if isinstance(key, AeadKey) else AeadKey(key)
            if aead_key.key_id in self._keys:
                raise ValueError(f"key id {aead_key.key_id.hex()} listed twice")
            self._keys[aead_key.key_id] = aead_key
        if not self._keys:
            raise ValueError("a key ring needs at least one key")
        self.current = next(iter(self._keys.values()))

    @classmethod
    def generate(cls) -> KeyRing:
        return cls([generate_key()])

    def __repr__(self) -> str:
        return f"<KeyRing current={self.current.key_id.hex()} keys={len(self._keys)}>"

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[AeadKey]:
        """All keys, the current one first."""
        return list(self._keys.values())

    def key_ids(self) -> list[bytes]:
        return list(self._keys)

    def seal(self, purpose: bytes, plaintext: bytes, ad: bytes = b"") -> bytes:
        return self.current.seal(purpose, plaintext, ad)

    def open(self, purpose: bytes, envelope: bytes, ad: bytes = b"") -> bytes:
        key = self._keys.get(envelope_key_id(envelope))
        if key is None:
            raise UnknownKeyId(f"no key {envelope[1:ENVELOPE_HEADER_BYTES].hex()} in ring")
        return key.open(purpose, envelope, ad)


def seal_device_key(master: KeyRing, number: str, k: bytes) -> bytes:
    """K at rest: sealed under the master key and bound to its number, so a row
    copied onto another account in the database does not open."""
    assert len(k) == KEY_BYTES, "K is 32 bytes"
    return master.seal(DEVICE_KEY_PURPOSE, k, number.encode("utf-8"))


def open_device_key(master: KeyRing, number: str, blob: bytes) -> bytes:
    k = master.open(DEVICE_KEY_PURPOSE, blob, number.encode("utf-8"))
    if len(k) != KEY_BYTES:
        raise DecodeError("sealed device key is not 32 bytes")
    return k


# -- Ed25519 --------------------------------------------------------------------------


def generate_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _signed_message(purpose: bytes, message: bytes) -> bytes:
    assert 0 < len(purpose) <= MAX_PURPOSE_BYTES, "purpose label required"
    return bytes((len(purpose),)) + purpose + message


# Keys are cryptography's objects (key files, enrolment); the signing and the checking on
# the payment path are libsodium's, which verifies in half OpenSSL's time (bench/auth.py)
# and refuses small-order keys and non-canonical signatures that OpenSSL lets through.

@functools.lru_cache(maxsize=MAX_CACHED_SIGNING_KEYS)
def _sodium_secret(seed: bytes) -> bytes:
    """libsodium's 64-byte secret (seed and public key), made once: it costs a signature."""
    return sodium.crypto_sign_seed_keypair(seed)[1]


def sign(key: Ed25519PrivateKey, purpose: bytes, message: bytes) -> bytes:
    """Signature over *message* under a purpose label, so a signature made for
    one protocol step can never be presented as another."""
    signed = sodium.crypto_sign(_signed_message(purpose, message),
                                _sodium_secret(key.private_bytes_raw()))
    return signed[:ED25519_SIGNATURE_BYTES]


def verify_signature(key: Ed25519PublicKey, purpose: bytes, message: bytes,
                     signature: bytes) -> None:
    verify_raw(public_key_raw(key), purpose, message, signature)


def verify_raw(public: bytes, purpose: bytes, message: bytes, signature: bytes) -> None:
    """`verify_signature` for a key kept as its raw 32 bytes (a device's, in the ledger)."""
    if len(signature) != ED25519_SIGNATURE_BYTES:
        raise BadSignature("an Ed25519 signature is 64 bytes")
    if len(public) != ED25519_PUBLIC_BYTES:
        raise DecodeError("an Ed25519 public key is 32 bytes")
    try:
        sodium.crypto_sign_open(signature + _signed_message(purpose, message), public)
    except SodiumError:
        raise BadSignature("signature does not verify") from None


def public_key_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_from_raw(raw: bytes) -> Ed25519PublicKey:
    if len(raw) != ED25519_PUBLIC_BYTES:
        raise DecodeError("an Ed25519 public key is 32 bytes")
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise DecodeError("not an Ed25519 public key") from None


def public_key_to_text(key: Ed25519PublicKey) -> str:
    """The documented text form: standard base64 of the raw 32 bytes (44 chars)."""
    return base64.b64encode(public_key_raw(key)).decode("ascii")


def public_key_from_text(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise DecodeError("an Ed25519 public key is base64 of 32 bytes") from None
    return public_key_from_raw(raw)

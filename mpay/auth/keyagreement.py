"""Enrolment key agreement: X25519, HKDF over the transcript, AS signature.

The DMD and the AS each contribute an X25519 public value and a nonce (DESIGN
section 3).  K is HKDF-SHA256 of the shared secret with the whole transcript
as ``info``, so both sides get the same K only if they saw the same number,
AS identity, public values, nonces and DMD signing key.  Plain Diffie-Hellman
would let a man in the middle run one exchange with each side; here the AS
signs the transcript with its long-term Ed25519 key, whose public half is
pinned in the DMD, and the DMD aborts unless that signature verifies.

Transcript encoding (version 1), all fields in this order::

    label "mpay-enrolment-transcript-v1" (28 bytes, fixed)
    number             var8  E.164, ASCII, "+" and 7..15 digits
    AS identity        var8  UTF-8, 1..255 bytes
    DMD X25519 public  32
    AS X25519 public   32
    DMD nonce          16
    AS nonce           16
    DMD Ed25519 public 32    (non-repudiation key registered at enrolment)

``var8`` is a one-byte length followed by that many bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mpay.auth.crypto import (
    ED25519_PUBLIC_BYTES, KEY_BYTES, BadSignature, ByteReader, CryptoError, DecodeError,
    pack_var8, public_key_raw, sign, verify_signature,
)
from mpay.e164 import is_e164

TRANSCRIPT_LABEL = b"mpay-enrolment-transcript-v1"
HKDF_SALT = b"mpay-enrolment-hkdf-salt-v1"
TRANSCRIPT_SIGNATURE_PURPOSE = b"mpay-enrolment-signature-v1"
X25519_PUBLIC_BYTES = 32
ENROLMENT_NONCE_BYTES = 16
MAX_IDENTITY_BYTES = 255


class EnrolmentAborted(CryptoError):
    """The DMD refuses to finish: the AS's signature over the transcript is not
    from the pinned key (a man in the middle, or a misconfigured AS)."""


class KeyAgreementFailed(CryptoError):
    """A peer sent a degenerate X25519 value (the shared secret would be zero)."""


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise DecodeError(what)


@dataclass(frozen=True)
class EnrolmentTranscript:
    """Everything both sides must agree on before K is used."""

    number: str
    as_identity: str
    dmd_public: bytes
    as_public: bytes
    dmd_nonce: bytes
    as_nonce: bytes
    dmd_signing_public: bytes

    def __post_init__(self) -> None:
        _check(is_e164(self.number), "number is not E.164")
        _check(0 < len(self.as_identity.encode("utf-8")) <= MAX_IDENTITY_BYTES,
               "AS identity must be 1..255 bytes")
        _check(len(self.dmd_public) == X25519_PUBLIC_BYTES, "DMD public value is 32 bytes")
        _check(len(self.as_public) == X25519_PUBLIC_BYTES, "AS public value is 32 bytes")
        _check(len(self.dmd_nonce) == ENROLMENT_NONCE_BYTES, "DMD nonce is 16 bytes")
        _check(len(self.as_nonce) == ENROLMENT_NONCE_BYTES, "AS nonce is 16 bytes")
        _check(len(self.dmd_signing_public) == ED25519_PUBLIC_BYTES, "DMD signing key is 32 bytes")

    def encode(self) -> bytes:
        """The canonical bytes: HKDF info and the message the AS signs."""
        return b"".join((
            TRANSCRIPT_LABEL, pack_var8(self.number.encode("ascii")),
            pack_var8(self.as_identity.encode("utf-8")), self.dmd_public, self.as_public,
            self.dmd_nonce, self.as_nonce, self.dmd_signing_public,
        ))

    @classmethod
    def decode(cls, data: bytes) -> EnrolmentTranscript:
        reader = ByteReader(data)
        _check(reader.take(len(TRANSCRIPT_LABEL)) == TRANSCRIPT_LABEL, "not a v1 transcript")
        try:
            number = reader.var8().decode("ascii")
            identity = reader.var8().decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("transcript text is not ASCII/UTF-8") from None
        fields = [reader.take(size) for size in (X25519_PUBLIC_BYTES, X25519_PUBLIC_BYTES,
                  ENROLMENT_NONCE_BYTES, ENROLMENT_NONCE_BYTES, ED25519_PUBLIC_BYTES)]
        reader.end()
        return cls(number, identity, *fields)


def derive_k(shared_secret: bytes, transcript: EnrolmentTranscript) -> bytes:
    """K = HKDF-SHA256(salt = fixed label, ikm = X25519 secret, info = transcript)."""
    assert len(shared_secret) == 32, "X25519 shared secret is 32 bytes"
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=HKDF_SALT,
                info=transcript.encode())
    return hkdf.derive(shared_secret)


def x25519_public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


def x25519_shared_secret(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """Shared secret with the peer's raw public value; low-order points are refused."""
    if len(peer_public) != X25519_PUBLIC_BYTES:
        raise DecodeError("an X25519 public value is 32 bytes")
    try:
        secret = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise KeyAgreementFailed("degenerate X25519 public value") from None
    if secret == bytes(32):
        raise KeyAgreementFailed("degenerate X25519 public value")
    return secret


def sign_transcript(signing_key: Ed25519PrivateKey, transcript: EnrolmentTranscript) -> bytes:
    return sign(signing_key, TRANSCRIPT_SIGNATURE_PURPOSE, transcript.encode())


def verify_transcript(pinned_as_key: Ed25519PublicKey, transcript: EnrolmentTranscript,
                      signature: bytes) -> None:
    """Raises EnrolmentAborted unless the pinned AS key signed this very transcript."""
    try:
        verify_signature(pinned_as_key, TRANSCRIPT_SIGNATURE_PURPOSE, transcript.encode(),
                         signature)
    except BadSignature as exc:
        raise EnrolmentAborted(f"AS signature over the transcript: {exc}") from None


@dataclass(frozen=True)
class AsAcceptance:
    """What the AS sends in its final 200: its public value, nonce and signature."""

    as_public: bytes
    as_nonce: bytes
    signature: bytes


def as_complete(signing_key: Ed25519PrivateKey, as_identity: str, number: str,
                dmd_public: bytes, dmd_nonce: bytes,
                dmd_signing_public: bytes) -> tuple[AsAcceptance, bytes]:
    """AS side of step 6, once caller ID matched: fresh X25519, K, signed transcript.

    Returns the acceptance for the DMD and K (seal it with ``seal_device_key``).
    Raises DecodeError or KeyAgreementFailed on malformed DMD values.
    """
    private = X25519PrivateKey.generate()
    transcript = EnrolmentTranscript(number, as_identity, dmd_public, x25519_public(private),
                                     dmd_nonce, os.urandom(ENROLMENT_NONCE_BYTES),
                                     dmd_signing_public)
    k = derive_k(x25519_shared_secret(private, dmd_public), transcript)
    acceptance = AsAcceptance(transcript.as_public, transcript.as_nonce,
                              sign_transcript(signing_key, transcript))
    return acceptance, k


class DmdKeyAgreement:
    """DMD side: holds the ephemeral X25519 key between REGISTER and the AS's 200."""

    def __init__(self, number: str, as_identity: str, dmd_signing_public: Ed25519PublicKey):
        self.number = number
        self.as_identity = as_identity
        self.dmd_signing_public = public_key_raw(dmd_signing_public)
        self._private: X25519PrivateKey | None = X25519PrivateKey.generate()
        self.public = x25519_public(self._private)
        self.nonce = os.urandom(ENROLMENT_NONCE_BYTES)

    def finish(self, acceptance: AsAcceptance, pinned_as_key: Ed25519PublicKey) -> bytes:
        """K, after the pinned AS key's signature over the transcript verified.

        Raises EnrolmentAborted (MITM), DecodeError or KeyAgreementFailed; the
        ephemeral key is forgotten either way, so a second attempt must start over.
        """
        private, self._private = self._private, None
        if private is None:
            raise EnrolmentAborted("key agreement already finished or aborted")
        transcript = EnrolmentTranscript(self.number, self.as_identity, self.public,
                                         acceptance.as_public, self.nonce, acceptance.as_nonce,
                                         self.dmd_signing_public)
        verify_transcript(pinned_as_key, transcript, acceptance.signature)
        return derive_k(x25519_shared_secret(private, acceptance.as_public), transcript)

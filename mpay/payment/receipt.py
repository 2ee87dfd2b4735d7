"""Non-repudiation (DESIGN section 6): the payer signs the request, the PS signs a receipt.

The payer's DMD signs the request digest (method, Request-URI, Call-ID, CSeq,
body) with its enrolled Ed25519 key; the PS verifies it against the key the
AS stored at enrolment and keeps the signature in the journal row.  The PS
answers with a receipt signed by its own Ed25519 key, which the DMD pins.
Either party can later show what was asked and what was done.

Wire form of both header fields: ``ed25519 <base64url signature>`` for
``Mpay-Signature``; ``v1 <base64url receipt>; sig=<base64url signature>`` for
``Mpay-Receipt``, the receipt being compact JSON with sorted keys.  Under load
a transfer's receipt is signed with the others of its turn (``v2``,
``receipt_groups.py``); a holder checks either kind with ``verify_receipt``.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from mpay.auth.crypto import (
    CryptoError, DecodeError, decode_b64, encode_b64, sign, verify_raw,
    verify_signature,
)
from mpay.payment.body import json_scalar
from mpay.payment.receipt_groups import TREE_PURPOSE, ReceiptSigner, parse_v2

SIGNATURE_HEADER = "Mpay-Signature"
RECEIPT_HEADER = "Mpay-Receipt"
REQUEST_SIGNATURE_PURPOSE = b"mpay-payment-request-v1"
RECEIPT_PURPOSE = b"mpay-receipt-v1"
MAX_RECEIPT_CHARS = 2048


class ReceiptError(ValueError):
    """A signature or receipt that does not verify or does not parse."""


class Receipt(NamedTuple):
    journal_id: int
    payer: str            # "anonymous" when the receipt goes to a payee who must not learn it
    payee: str
    amount: int           # minor units
    currency: str
    created: float        # Unix seconds of the commit
    digest: str           # base64url of the request digest it answers

    def encode(self) -> bytes:
        """Compact JSON with sorted keys, as ``json.dumps(sort_keys=True, separators=(",",
        ":"))`` writes it (tested): the bytes the PS signs."""
        return (_RECEIPT_JSON % (
            json_scalar(self.amount), json_scalar(self.created), json_scalar(self.currency),
            json_scalar(self.digest), json_scalar(self.journal_id), json_scalar(self.payee),
            json_scalar(self.payer))).encode()


_RECEIPT_JSON = ('{"amount":%s,"created":%s,"currency":%s,"digest":%s,"journal_id":%s,'
                 '"payee":%s,"payer":%s}')
assert tuple(sorted(Receipt._fields)) == ("amount", "created", "currency", "digest",
                                           "journal_id", "payee", "payer")


def sign_request(private_key: Any, digest: bytes) -> str:
    return "ed25519 " + encode_b64(sign(private_key, REQUEST_SIGNATURE_PURPOSE, digest))


def request_signature(value: str | None) -> bytes:
    """The raw signature from the header field, or ReceiptError."""
    word, _, encoded = (value or "").strip().partition(" ")
    if word.lower() != "ed25519":
        raise ReceiptError("Missing Payer Signature" if not value else "Bad Payer Signature")
    try:
        return decode_b64(encoded.strip(), 128)
    except DecodeError:
        raise ReceiptError("Bad Payer Signature") from None


def verify_request(device_key: bytes, digest: bytes, signature: bytes) -> None:
    try:
        verify_raw(device_key, REQUEST_SIGNATURE_PURPOSE, digest, signature)
    except CryptoError:
        raise ReceiptError("Payer Signature Invalid") from None


def sign_receipt(ps_key: Any, receipt: Receipt) -> str:
    return sign_body(ps_key, receipt.encode())


def sign_body(ps_key: Any, body: bytes) -> str:
    """The v1 header value of one encoded receipt, signed alone."""
    return f"v1 {encode_b64(body)}; sig={encode_b64(sign(ps_key, RECEIPT_PURPOSE, body))}"


def receipt_signer(reactor: Any, ps_key: Any) -> ReceiptSigner:
    """The PS's signer of transfer receipts: a turn's receipts under one signature."""
    return ReceiptSigner(reactor, ps_key, sign_body)


def verify_receipt(ps_public: Any, value: str | None) -> Receipt:
    """The receipt in a header field, after checking the PS's signature: its own (v1) or
    its group's (v2, ``receipt_groups.py``)."""
    try:
        version, _, rest = (value or "").strip().partition(" ")
        if version == "v2":
            body, signed, signature = parse_v2(rest, MAX_RECEIPT_CHARS)
            verify_signature(ps_public, TREE_PURPOSE, signed, signature)
            return Receipt(**json.loads(body))
        encoded, _, signature_text = rest.partition("; sig=")
        if version != "v1" or not signature_text:
            raise ReceiptError("not a v1 or v2 receipt")
        body = decode_b64(encoded.strip(), MAX_RECEIPT_CHARS)
        verify_signature(ps_public, RECEIPT_PURPOSE, body, decode_b64(signature_text.strip(), 128))
        return Receipt(**json.loads(body))
    except (CryptoError, ValueError, TypeError) as exc:
        raise ReceiptError(f"receipt does not verify: {exc}") from None

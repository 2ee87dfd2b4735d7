"""One-time credit numbers (OTCN): anonymous payment at a point of sale (thesis 3.5).

A consumer's DMD asks the PS for an OTCN and shows it to the merchant instead
of its phone number; the merchant's POS sends it as the Request-URI user part
of the charge (``sip:4000123456789017@domain``) and the PS resolves it to the
consumer, once.  The merchant never learns who paid.

The number is 15 digits from the CSPRNG followed by a Luhn check digit, so a
person keying it into a POS learns of a mistyped digit, or two swapped
neighbours, before anything is sent.  Luhn is a typing check, not a secret:
the 10^15 random digits are what make guessing hopeless, together with the
short lifetime, single use and guess blocking (`mpay.payment.guard`).

This module does no I/O; the store of live OTCNs is `mpay.stores.otcn`.
"""

from __future__ import annotations

import json
import re
import secrets
import unicodedata
from dataclasses import asdict, dataclass

OTCN_DIGITS = 16
"""Length of an OTCN, digits, the Luhn check digit included."""

OTCN_LIFETIME_S = 600
"""How long an issued OTCN stays usable, seconds (DESIGN section 11)."""

OTCN_MAX_LIFETIME_S = 86_400
"""Longest lifetime a store accepts, seconds; a longer one is a configuration error."""

MAX_OTCN_TEXT_CHARS = 64
"""Longer input than this is not an OTCN someone typed: refused before any work."""

OTCN_GROUP_DIGITS = 4
"""Digits per group when an OTCN is shown to a person."""

_PAYLOAD_SPACE = 10 ** (OTCN_DIGITS - 1)
_OTCN_RE = re.compile(r"[0-9]{%d}" % OTCN_DIGITS)  # [0-9], not \d: ASCII digits only
# What people type between groups; NFKC has already turned the full-width forms into these.
_SEPARATORS = str.maketrans("", "", " \t-")
_E164_MARK = "+"


class InvalidOTCN(ValueError):
    """Text that is not an OTCN; `reason` is short and fit to show the user."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class OTCNGrant:
    """An issued OTCN and what it stands for; it is stored, never sent to the merchant."""

    otcn: str
    consumer: str              # E.164 number of the account that pays
    cap: int | None            # most the charge may take, minor units; None: no cap
    expires_at: float          # server clock, seconds

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "OTCNGrant":
        return cls(**json.loads(text))


def luhn_check_digit(payload: str) -> str:
    """The digit that makes ``payload + digit`` pass the Luhn check."""
    total = 0
    # The check digit will sit at position 0 from the right, so the payload's
    # last digit is at position 1: the doubled one.
    for position, char in enumerate(reversed(payload), start=1):
        digit = ord(char) - 48
        if position % 2:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return str(-total % 10)


def luhn_valid(text: str) -> bool:
    """True if *text* is ASCII digits (at least two) whose last is the Luhn check digit."""
    if not isinstance(text, str) or len(text) < 2 or not text.isascii() or not text.isdigit():
        return False
    return luhn_check_digit(text[:-1]) == text[-1]


def with_check_digit(payload: str) -> str:
    """An OTCN from its first 15 digits; `new_otcn` draws them, tests choose them."""
    if len(payload) != OTCN_DIGITS - 1 or not payload.isascii() or not payload.isdigit():
        raise ValueError(f"an OTCN payload is {OTCN_DIGITS - 1} ASCII digits, got {payload!r}")
    return payload + luhn_check_digit(payload)


def new_otcn() -> str:
    """A fresh OTCN: 15 digits from the CSPRNG, leading zeros kept, then the check digit."""
    return with_check_digit(f"{secrets.randbelow(_PAYLOAD_SPACE):0{OTCN_DIGITS - 1}d}")


def is_otcn(text: str) -> bool:
    """True if *text* is an OTCN in canonical form (what the stores take); no I/O."""
    return isinstance(text, str) and _OTCN_RE.fullmatch(text) is not None and luhn_valid(text)


def normalise_otcn(text: str) -> str:
    """*text* as 16 ASCII digits, or `InvalidOTCN` with the reason.

    Spaces and dashes people put between groups are dropped, full-width
    digits (an East Asian phone keyboard) read as digits.
    """
    if not isinstance(text, str):
        raise InvalidOTCN("not a one-time number")
    if len(text) > MAX_OTCN_TEXT_CHARS:
        raise InvalidOTCN("too long")
    digits = unicodedata.normalize("NFKC", text).translate(_SEPARATORS)
    if not digits:
        raise InvalidOTCN("empty")
    if not digits.isascii() or not digits.isdigit():
        raise InvalidOTCN("only digits, spaces and dashes")
    if len(digits) != OTCN_DIGITS:
        raise InvalidOTCN(f"{OTCN_DIGITS} digits expected, got {len(digits)}")
    if not luhn_valid(digits):
        raise InvalidOTCN("check digit wrong: a digit mistyped?")
    return digits


def format_otcn(otcn: str) -> str:
    """*otcn* in groups of four for a screen or a receipt: ``4000 1234 5678 9017``."""
    if not is_otcn(otcn):
        raise InvalidOTCN("not a one-time number")
    return " ".join(otcn[i:i + OTCN_GROUP_DIGITS] for i in range(0, OTCN_DIGITS, OTCN_GROUP_DIGITS))


def otcn_in_user(user: str) -> str | None:
    """The OTCN a Request-URI user part names, or None when it names an E.164 number.

    A number always starts with ``+``; anything else has to be an OTCN, and is
    normalised (raising `InvalidOTCN`) so the caller can answer 404 and count
    the failure against the merchant's guesses.
    """
    if user.startswith(_E164_MARK):
        return None
    return normalise_otcn(user)

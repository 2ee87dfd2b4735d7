"""What the ledger promises: result types, errors, limits and input checks.

Both stores (``sqlite.py``, ``postgres.py``) and the Deferred-returning
``LedgerService`` (``service.py``) speak in these types, so the payment server
never learns which database is underneath.  Money is an ``int`` count of
minor units everywhere; a float or a bool is refused, never rounded.

Idempotency.  Every movement carries a key (for SIP: payer|Call-ID|CSeq).
Only a committed movement binds its key: a repeat is answered with the
original result (``DUPLICATE``: the original journal id, payer, payee,
amount, balance after and time, even if the repeat named other details, which
the caller may compare) and never moves money twice.  Refusals
(``INSUFFICIENT``, ``UNKNOWN_*``, ``BLOCKED``, ``INVALID``) are answers, not
exceptions, and are not recorded: a request refused for want of credit and
re-sent with the same key after a top-up may commit.
"""

from __future__ import annotations

import enum
import re
from typing import NamedTuple

SETTLEMENT = "settlement"
"""The counterpart of money outside the system; the only account that may go negative."""

MAX_AMOUNT_MINOR = 10**12
"""Largest single movement or hold, in minor units (ten billion in a 2-decimal currency)."""

MAX_STATEMENT_ROWS = 10_000
"""Upper bound of one statement request, in journal rows."""

STATEMENT_ROWS = 100
"""Journal rows in a statement when the caller does not say."""

MAX_KEY_CHARS = 512
"""Longest idempotency key accepted; a SIP key is payer|Call-ID|CSeq, well below this."""

MAX_REFERENCE_CHARS = 1024
"""Longest free-text reference stored with a journal row or hold."""

MAX_DIALOG_CHARS = 8192
"""Longest dialog description stored with a session (what a BYE to each side needs)."""

SESSIONS_HOLD_REF = "sessions"
"""The reference of the one hold that all of a consumer's timed sessions draw on."""

MAX_SIGNATURE_BYTES = 512
"""Longest payer signature stored (an Ed25519 signature is 64 bytes)."""

KINDS = ("transfer", "cash_in", "cash_out", "charge", "session")
"""Journal row kinds; cash_in/cash_out are the only ones that touch SETTLEMENT."""

ACTIVE, BLOCKED_STATUS = "active", "blocked"

# [0-9], not \d (which matches other scripts' digits); used with fullmatch, since
# "$" would let a trailing newline through.
_NUMBER_RE = re.compile(r"\+[1-9][0-9]{6,14}")


class Outcome(enum.Enum):
    """How a movement ended; the payment server maps these to SIP responses."""

    COMMITTED = "committed"
    DUPLICATE = "duplicate"  # the key was used before: the original result, replayed
    INSUFFICIENT = "insufficient"  # available (balance - held) is short
    UNKNOWN_PAYEE = "unknown_payee"
    UNKNOWN_PAYER = "unknown_payer"
    BLOCKED = "blocked"  # payer or payee is blocked; ``detail`` says which
    INVALID = "invalid"  # the request itself is malformed; ``detail`` says why
    NO_HOLD = "no_hold"  # the hold is unknown or already settled/released

    # Members are singletons compared by identity: the identity hash agrees, and is
    # C where Enum's own __hash__ is a Python call (looked up in REFUSALS per transfer).
    __hash__ = object.__hash__


# Results are NamedTuples: immutable, and cheap to build by the hundred
# thousand in the writer thread (a frozen dataclass costs several times more).


class TransferResult(NamedTuple):
    """The answer to a movement.  For DUPLICATE every field is the original's."""

    outcome: Outcome
    journal_id: int | None = None
    payer: str = ""
    payee: str = ""
    amount: int = 0
    payer_balance_after: int | None = None
    created: float | None = None  # Unix seconds of the commit
    detail: str = ""

    @property
    def ok(self) -> bool:
        """True when the money has moved (now or by the original request)."""
        return self.outcome in (Outcome.COMMITTED, Outcome.DUPLICATE)


class HoldResult(NamedTuple):
    """The answer to ``place_hold``: a hold id, or the refusal."""

    outcome: Outcome
    hold_id: int | None = None
    available_after: int | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.COMMITTED


class Balance(NamedTuple):
    """An account's money: ``available`` = ``balance`` - ``held`` is what it may spend."""

    balance: int
    held: int
    available: int
    status: str


class JournalEntry(NamedTuple):
    """One movement: ``amount`` left ``debit`` and reached ``credit``."""

    id: int
    debit: str
    credit: str
    amount: int
    kind: str
    reference: str
    idempotency_key: str
    payer_signature: bytes | None
    debit_balance_after: int
    credit_balance_after: int
    created: float


class Hold(NamedTuple):
    """Funds reserved for a session charged by time; ``checkpointed_amount`` is owed so far."""

    id: int
    account: str
    amount: int
    session_ref: str
    created: float
    checkpointed_amount: int
    status: str  # active / settled / released


class SessionResult(NamedTuple):
    """The answer to opening or settling a session charged by time.

    ``unspent`` is what the consumer's open sessions may still spend together
    (the sessions hold's rest): the PS's Timer C is computed from it.
    """

    outcome: Outcome
    session_id: int | None = None
    hold_id: int | None = None
    unspent: int = 0
    charged: int = 0
    journal_id: int | None = None
    created: float | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome in (Outcome.COMMITTED, Outcome.DUPLICATE)


class Session(NamedTuple):
    """An open session as a restarted PS finds it."""

    id: int
    hold_id: int
    consumer: str
    merchant: str
    rate: int
    session_ref: str
    owner: str
    opened: float
    checkpointed_amount: int
    checkpointed: float | None
    dialog: str


class DeviceKey(NamedTuple):
    """A device's enrolment secret K (encrypted at rest by the AS) and its Ed25519 key."""

    number: str
    encrypted_k: bytes
    ed25519_pub: bytes
    created: float


class LedgerError(Exception):
    """A ledger request that cannot be carried out; the message says why."""


class UnknownAccount(LedgerError):
    """The number has no account."""


class InvalidNumber(LedgerError, ValueError):
    """Not an E.164 number in canonical form (``+`` and 7 to 15 digits)."""


class LedgerBusy(LedgerError):
    """Too many operations queued; shed load (SIP 503) rather than grow without bound."""


class LedgerStopped(LedgerError):
    """The ledger service is stopping or stopped."""


def check_number(number: object) -> str:
    """Return *number* if it is a canonical E.164 string, else raise InvalidNumber.

    The one place account numbers are checked; normalising what a user typed
    (``mpay.e164``) happens before this.
    """
    if not isinstance(number, str) or not _NUMBER_RE.fullmatch(number):
        raise InvalidNumber(f"not an E.164 number (+ then 7 to 15 digits): {number!r}")
    return number


def sip_idempotency_key(payer: str, call_id: str, cseq: int) -> str:
    """The key of a SIP payment request: a re-sent request (same Call-ID and
    CSeq, after a lost response) is the same payment, a new CSeq is a new one."""
    return f"{payer}|{call_id}|{cseq}"


def validate_amount(amount: object, payer: str | None = None, payee: str | None = None,
                    *, minimum: int = 1) -> str | None:
    """Why *amount* (from *payer* to *payee*) cannot be moved, or None if it can.

    A plain int in [minimum, MAX_AMOUNT_MINOR]: no bool (``True`` is an int in
    Python), no float, no Decimal.  A movement needs two distinct accounts.
    """
    if type(amount) is not int:  # exactly int: bool and other int subclasses are refused
        return f"amount must be an integer count of minor units, not {type(amount).__name__}"
    if amount < minimum:
        return f"amount must be at least {minimum}"
    if amount > MAX_AMOUNT_MINOR:
        return f"amount exceeds the limit of {MAX_AMOUNT_MINOR}"
    if payer is not None and payer == payee:
        return "payer and payee are the same account"
    return None


def validate_movement(payer: str, payee: str, amount: object, kind: str,
                      idempotency_key: object, reference: object,
                      signature: object = None) -> str | None:
    """Why this movement is malformed, or None.  Settlement moves only by cash-in/out."""
    reason = validate_amount(amount, payer, payee)
    if reason:
        return reason
    if kind not in KINDS:
        return f"unknown kind {kind!r}"
    if (payer == SETTLEMENT) != (kind == "cash_in") \
            or (payee == SETTLEMENT) != (kind == "cash_out"):
        return "the settlement account moves money only by cash_in (payer) and cash_out (payee)"
    if not isinstance(idempotency_key, str) or not 0 < len(idempotency_key) <= MAX_KEY_CHARS:
        return f"idempotency key must be a string of 1 to {MAX_KEY_CHARS} characters"
    if not isinstance(reference, str) or len(reference) > MAX_REFERENCE_CHARS:
        return f"reference must be a string of at most {MAX_REFERENCE_CHARS} characters"
    if signature is not None and (not isinstance(signature, bytes)
                                  or len(signature) > MAX_SIGNATURE_BYTES):
        return f"payer signature must be at most {MAX_SIGNATURE_BYTES} bytes"
    return None

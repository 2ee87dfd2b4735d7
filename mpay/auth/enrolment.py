"""First-time enrolment of a phone number: the AS state machine (thesis Fig 4-2).

    REGISTER ──401──> RegisterUnauth ──Timer A──> ReferAS ──202──> WaitNotify
                                                    │                 │ NOTIFY + caller ID matches
                                          Timer C / │ error           v
                                           REFER    v             AuthComplete ──Timer F──> Terminate
                                          timeout  Terminate  <── Timer D / mismatch / withheld

The device claims a number and sends its X25519 share; the AS answers 401
(caller-ID verification required), then REFERs the device to the telephone
number of one of its caller-ID receiver lines.  The device places an ordinary
call there; the receiver reports the calling number; the device NOTIFYs that
it called.  Only a caller ID seen on that line, inside the window, equal to
the claimed number completes the key agreement.

The machine is sans-IO: each event returns a list of effects (respond to a
transaction, send the REFER, start or cancel a named timer, store the enrolled
key, finish) that ``mpay.auth.server`` carries out.  Transactions are opaque
tokens here.  Timer names are the design's A, C, D, F.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable

from mpay.effects import CancelTimer, StartTimer  # noqa: F401  (part of this machine's effects)

ENROL_TIMER_A_S = 0.5    # 401 sent -> send the REFER
ENROL_TIMER_C_S = 32.0   # REFER unanswered -> give up (64 x T1)
ENROL_TIMER_D_S = 60.0   # REFER accepted -> the call and the NOTIFY must be in by then
ENROL_TIMER_F_S = 32.0   # AuthComplete keeps answering retransmissions, then forgets
MAX_SIGHTINGS_PER_ENROLMENT = 16   # caller IDs remembered in one window


@dataclass(frozen=True)
class EnrolmentTimers:
    """The design's Timers A, C, D, F in seconds (configurable: [as] timer_*_s)."""

    a_s: float = ENROL_TIMER_A_S
    c_s: float = ENROL_TIMER_C_S
    d_s: float = ENROL_TIMER_D_S
    f_s: float = ENROL_TIMER_F_S


class EnrolmentState(enum.Enum):
    REGISTER_UNAUTH = "RegisterUnauth"
    REFER_AS = "ReferAS"
    WAIT_NOTIFY = "WaitNotify"
    AUTH_COMPLETE = "AuthComplete"
    TERMINATE = "Terminate"


@dataclass(frozen=True)
class Claim:
    """What the first REGISTER asserts; the number is already E.164-normalised."""

    number: str
    dmd_public: bytes      # X25519 public value, 32 bytes
    dmd_nonce: bytes
    device_key: bytes      # the DMD's Ed25519 public key (non-repudiation)


@dataclass(frozen=True)
class KeyAgreement:
    """The AS's half of the key agreement, computed only after the caller ID matched."""

    as_public: bytes
    as_nonce: bytes
    signature: bytes       # Ed25519 over the transcript, by the AS's long-term key
    k: bytes               # the shared device secret K


# -- effects ---------------------------------------------------------------
@dataclass(frozen=True)
class Respond:
    """Answer a transaction; ``challenge`` (401) or ``keys`` (200) say what to attach."""

    txn: Any
    status: int
    reason: str
    challenge: str | None = None          # tel: URI the device must call
    keys: KeyAgreement | None = None


@dataclass(frozen=True)
class SendRefer:
    refer_to: str          # tel: URI of the caller-ID receiver line


@dataclass(frozen=True)
class Enrolled:
    number: str
    k: bytes
    device_key: bytes


@dataclass(frozen=True)
class Finished:
    outcome: str           # "enrolled" or the refusal reason
    state: EnrolmentState


@dataclass(frozen=True)
class Sighting:
    number: str | None     # E.164, or None when withheld/unavailable/unreadable
    withheld: bool


REASON_CALLER_ID_REQUIRED = "Caller-ID Verification Required"
REASON_MISMATCH = "Caller ID Mismatch"
REASON_WITHHELD = "Caller ID Withheld"
REASON_NOT_SEEN = "Caller ID Not Seen"
REASON_REFER_UNANSWERED = "REFER Unanswered"
REASON_REFER_REFUSED = "REFER Refused"
REASON_KEY_AGREEMENT = "Key Agreement Failed"


class KeyAgreementRefused(ValueError):
    """The claim's key share cannot be used (a low-order X25519 point, say)."""


@dataclass
class Enrolment:
    """One device's enrolment; ``line`` is the receiver line it was sent to call."""

    claim: Claim
    line_id: str
    line_number: str
    agree: Callable[[Claim], KeyAgreement]
    timers: EnrolmentTimers = EnrolmentTimers()
    state: EnrolmentState = EnrolmentState.REGISTER_UNAUTH
    sightings: list[Sighting] = field(default_factory=list)
    pending_notify: Any = None
    result: KeyAgreement | None = None
    matched: bool = False                 # kept apart from the bounded sightings list

    # -- events ----------------------------------------------------------
    def start(self, txn: Any) -> list:
        """The first REGISTER of this claim."""
        assert self.state is EnrolmentState.REGISTER_UNAUTH and not self.sightings
        return [self._challenge(txn), StartTimer("A", self.timers.a_s)]

    def register(self, txn: Any) -> list:
        """The same claim again in a new transaction: the same answer, no second enrolment."""
        if self.state is EnrolmentState.TERMINATE:
            return []
        if self.state is EnrolmentState.AUTH_COMPLETE:
            return [Respond(txn, 200, "OK", keys=self.result)]
        return [self._challenge(txn)]

    def timer(self, name: str) -> list:
        handler = _TIMERS.get((self.state, name))
        return handler(self) if handler else []

    def refer_answered(self, status: int) -> list:
        if self.state is not EnrolmentState.REFER_AS or status < 200:
            return []
        if status >= 300:
            return self._fail(REASON_REFER_REFUSED, [CancelTimer("C")])
        self.state = EnrolmentState.WAIT_NOTIFY
        return [CancelTimer("C"), StartTimer("D", self.timers.d_s)]

    def refer_timed_out(self) -> list:
        if self.state is not EnrolmentState.REFER_AS:
            return []
        return self._fail(REASON_REFER_UNANSWERED, [CancelTimer("C")])

    def caller_id(self, number: str | None, withheld: bool) -> list:
        """A call seen on this enrolment's line while the window is open."""
        if self.state not in (EnrolmentState.REFER_AS, EnrolmentState.WAIT_NOTIFY):
            return []
        if number == self.claim.number:
            self.matched = True
        elif len(self.sightings) < MAX_SIGHTINGS_PER_ENROLMENT:
            self.sightings.append(Sighting(number, withheld))
        if self.pending_notify is not None and self.matched:
            return self._complete(self.pending_notify)
        return []

    def notify(self, txn: Any) -> list:
        """The device says it placed the call."""
        if self.state is EnrolmentState.AUTH_COMPLETE:
            # A NOTIFY re-sent in a new transaction: the same answer, the same K.
            return [Respond(txn, 200, "OK", keys=self.result)]
        if self.state is EnrolmentState.REFER_AS:
            # The 202 was lost but the device acted on the REFER: the NOTIFY proves it arrived.
            self.state = EnrolmentState.WAIT_NOTIFY
            effects: list = [CancelTimer("C"), StartTimer("D", self.timers.d_s)]
        elif self.state is EnrolmentState.WAIT_NOTIFY:
            effects = []
        else:
            return [Respond(txn, 481, "Call/Transaction Does Not Exist")]
        if self.matched:
            return effects + self._complete(txn)
        # The modem may report after the device's NOTIFY: hold the answer until the call or Timer D.
        self.pending_notify = txn
        return effects

    # -- transitions -----------------------------------------------------
    def _send_refer(self) -> list:
        self.state = EnrolmentState.REFER_AS
        return [SendRefer(self.line_number), StartTimer("C", self.timers.c_s)]

    def _window_closed(self) -> list:
        if any(s.withheld for s in self.sightings):
            reason = REASON_WITHHELD
        elif self.sightings:
            reason = REASON_MISMATCH
        else:
            reason = REASON_NOT_SEEN
        effects: list = []
        if self.pending_notify is not None:
            effects.append(Respond(self.pending_notify, 403, reason))
            self.pending_notify = None
        return self._fail(reason, effects)

    def _complete(self, txn: Any) -> list:
        self.pending_notify = None
        try:
            self.result = self.agree(self.claim)
        except KeyAgreementRefused:
            return self._fail(REASON_KEY_AGREEMENT, [CancelTimer("D"), Respond(txn, 403, REASON_KEY_AGREEMENT)])
        self.state = EnrolmentState.AUTH_COMPLETE
        return [
            CancelTimer("D"),
            Enrolled(self.claim.number, self.result.k, self.claim.device_key),
            Respond(txn, 200, "OK", keys=self.result),
            StartTimer("F", self.timers.f_s),
        ]

    def _forget(self) -> list:
        self.state = EnrolmentState.TERMINATE
        return [Finished("enrolled", EnrolmentState.AUTH_COMPLETE)]

    def _fail(self, reason: str, effects: list) -> list:
        previous = self.state
        self.state = EnrolmentState.TERMINATE
        return effects + [Finished(reason, previous)]

    def _challenge(self, txn: Any) -> Respond:
        return Respond(txn, 401, REASON_CALLER_ID_REQUIRED, challenge=self.line_number)


_TIMERS: dict[tuple[EnrolmentState, str], Callable[[Enrolment], list]] = {
    (EnrolmentState.REGISTER_UNAUTH, "A"): Enrolment._send_refer,
    (EnrolmentState.REFER_AS, "C"): lambda e: e._fail(REASON_REFER_UNANSWERED, []),
    (EnrolmentState.WAIT_NOTIFY, "D"): Enrolment._window_closed,
    (EnrolmentState.REFER_AS, "D"): Enrolment._window_closed,
    (EnrolmentState.AUTH_COMPLETE, "F"): Enrolment._forget,
}

"""Event charging and charged by time: the PS state machine of thesis Fig 4-4.

    RECEIVE ──forward──> WaitConfirm ──consumer 2xx──> [charge | open session] ──> WaitACK
                           │ 1xx: relayed                                          │ merchant ACK
                           │ 603: 603 to the merchant                  event: Complete ──> Terminate
                           │ Timer A: 408 to the merchant                 timed: WaitBYE
                           v                                                       │
                         Terminate           BYE from either side: settle, forward it;
                                             Timer C: settle, BYE to both ──> Complete ──> Terminate

A merchant's RECEIVE names a consumer (a number, or an OTCN already resolved
by the caller).  The PS forwards it; the person confirms on the phone.  For
*event charging* the amount moves when the consumer's 200 arrives; for
*charged by time* the 200 opens a session whose charge is rate x elapsed,
settled when either side sends BYE or when **Timer C** (the consumer's money
runs out, computed in :mod:`mpay.payment.charged_by_time`) fires.

The charge of a BYE is settled when the BYE arrives, and the BYE is then
forwarded with the receipt: the sender gets its 200 at once, and a silent
other side (gone, out of coverage) cannot keep the money in suspense.

Sans-IO: events in, effects out; the glue in the PS carries them out (SIP
messages, the ledger, timers on the wheel).  No effect names a transport or
a clock.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

from mpay.effects import CancelTimer, StartTimer  # noqa: F401  (part of this machine's effects)

CHARGE_TIMER_A_S = 60.0      # how long the person has to confirm on the phone


class ChargeState(enum.Enum):
    WAIT_CONFIRM = "WaitConfirm"
    WAIT_ACK = "WaitACK"
    WAIT_BYE = "WaitBYE"
    COMPLETE = "Complete"
    TERMINATE = "Terminate"


# -- effects ------------------------------------------------------------------
@dataclass(frozen=True)
class ToMerchant:
    """Answer the merchant's RECEIVE (provisional or final)."""
    status: int
    reason: str


@dataclass(frozen=True)
class CancelConsumer:
    """Withdraw the forwarded RECEIVE (CANCEL): the person took too long."""


@dataclass(frozen=True)
class Charge:
    """Event charging: move ``amount`` from consumer to merchant (answer with ``charged``)."""
    amount: int


@dataclass(frozen=True)
class OpenSession:
    """Charged by time: hold the consumer's funds for a session at ``rate`` per second."""
    rate: int


@dataclass(frozen=True)
class RelayAck:
    """The merchant's ACK, on to the consumer."""


@dataclass(frozen=True)
class SessionStarted:
    """Count the elapsed time from now; the glue re-arms Timer C for this consumer's sessions."""


@dataclass(frozen=True)
class ForwardBye:
    to: str                 # "consumer" or "merchant"


@dataclass(frozen=True)
class ByeBoth:
    """The PS ends the session towards both sides (Timer C, or no ACK)."""


@dataclass(frozen=True)
class Settle:
    """Close the session: charge ``rate x elapsed`` (``exhausted``: its share of what was left)."""
    exhausted: bool


@dataclass(frozen=True)
class Done:
    outcome: str


def charge_for(rate_per_s: int, elapsed_s: float) -> int:
    """Rate x elapsed in minor units, rounded up: a started minor unit is owed.

    The tolerance keeps float noise (0.1 + 0.2) from rounding up a whole unit.
    """
    assert rate_per_s > 0 and elapsed_s >= 0
    return math.ceil(rate_per_s * elapsed_s - 1e-9)


@dataclass
class ChargeRequest:
    """One RECEIVE; ``amount`` for event charging or ``rate`` for charged by time."""

    merchant: str
    consumer: str
    amount: int | None = None
    rate: int | None = None
    anonymous: bool = False              # the consumer came by OTCN: never show the number
    timer_a_s: float = CHARGE_TIMER_A_S
    state: ChargeState = ChargeState.WAIT_CONFIRM
    outcome: str = ""
    history: list[ChargeState] = field(default_factory=list)
    bye_from: str | None = None

    def __post_init__(self) -> None:
        assert (self.amount is None) != (self.rate is None), "an amount or a rate, not both"

    @property
    def timed(self) -> bool:
        return self.rate is not None

    def _go(self, state: ChargeState) -> None:
        assert state in _ALLOWED[self.state], f"charge {self.state} -> {state}"
        self.history.append(self.state)
        self.state = state

    # -- events ----------------------------------------------------------------
    def start(self) -> list:
        """The RECEIVE was forwarded to the consumer."""
        return [StartTimer("A", self.timer_a_s)]

    def consumer_answered(self, status: int, reason: str = "") -> list:
        if self.state is not ChargeState.WAIT_CONFIRM:
            return []
        if status < 200:
            return [ToMerchant(status, reason or "Ringing")]
        if status >= 300:
            return self._end(f"declined {status}", [CancelTimer("A"), ToMerchant(603, "Decline")])
        return [CancelTimer("A"), OpenSession(self.rate) if self.timed else Charge(self.amount)]

    def charged(self, ok: bool, status: int = 200, reason: str = "OK") -> list:
        """The ledger's answer to Charge / OpenSession."""
        if self.state is not ChargeState.WAIT_CONFIRM:
            return []
        if not ok:
            return self._end(reason, [ToMerchant(status, reason)])
        self._go(ChargeState.WAIT_ACK)
        return [ToMerchant(200, "OK")]

    def timer(self, name: str) -> list:
        if name == "A" and self.state is ChargeState.WAIT_CONFIRM:
            return self._end("unanswered", [CancelConsumer(), ToMerchant(408, "Consumer Did Not Answer")])
        if name == "C" and self.state is ChargeState.WAIT_BYE:
            self.bye_from = "server"
            return self._end("exhausted", [Settle(exhausted=True), ByeBoth()])
        if name == "ACK" and self.state is ChargeState.WAIT_ACK:
            if not self.timed:       # the money moved; only the relay of the ACK is lost
                return self._end("charged", [])
            self.bye_from = "server"  # a session nobody started: nothing owed, end both dialogs
            return self._end("no ACK", [Settle(exhausted=False), ByeBoth()])
        return []

    def merchant_ack(self) -> list:
        if self.state is not ChargeState.WAIT_ACK:
            return []
        if not self.timed:
            return self._end("charged", [RelayAck()])
        self._go(ChargeState.WAIT_BYE)
        return [RelayAck(), SessionStarted()]

    def bye(self, side: str) -> list:
        """A BYE from ``side`` ("consumer" or "merchant"): settled now, then forwarded."""
        assert side in ("consumer", "merchant")
        if not self.timed or self.state not in (ChargeState.WAIT_BYE, ChargeState.WAIT_ACK):
            return []
        self.bye_from = side
        return self._end(f"ended by {side}", [Settle(exhausted=False),
                                              ForwardBye("merchant" if side == "consumer" else "consumer")])

    def _end(self, outcome: str, effects: list) -> list:
        self.outcome = outcome
        self._go(ChargeState.COMPLETE)
        self._go(ChargeState.TERMINATE)
        return effects + [Done(outcome)]


_ALLOWED: dict[ChargeState, set[ChargeState]] = {
    ChargeState.WAIT_CONFIRM: {ChargeState.WAIT_ACK, ChargeState.COMPLETE},
    ChargeState.WAIT_ACK: {ChargeState.WAIT_BYE, ChargeState.COMPLETE},
    ChargeState.WAIT_BYE: {ChargeState.COMPLETE},
    ChargeState.COMPLETE: {ChargeState.TERMINATE},
    ChargeState.TERMINATE: set(),
}


def describe(request: ChargeRequest) -> dict[str, Any]:
    """What the manhole and logs show of a live charge (never the consumer's number if anonymous)."""
    return {"merchant": request.merchant, "consumer": "anonymous" if request.anonymous else request.consumer,
            "state": request.state.value, "amount": request.amount, "rate": request.rate}

"""A credit transfer's place in thesis Fig 4-3 (the diagram is in ``transfer.py``).

An explicit state machine: every step the handler takes is a transition
named here, and one the figure lacks is a bug, asserted.
"""

from __future__ import annotations

import enum


class TransferState(enum.Enum):
    AUTHENTICATED = "Authenticated"
    COMMITTED = "Committed"
    WAIT_PAYEE = "WaitPayee"
    CONFIRMED = "Confirmed"
    QUEUED = "Queued"
    REFUSED = "Refused"

    __hash__ = object.__hash__    # as Outcome's: three transitions a transfer look it up


_TRANSITIONS = {
    TransferState.AUTHENTICATED: {TransferState.COMMITTED, TransferState.REFUSED},
    TransferState.COMMITTED: {TransferState.WAIT_PAYEE, TransferState.QUEUED},
    TransferState.WAIT_PAYEE: {TransferState.CONFIRMED, TransferState.QUEUED},
}


class TransferFlow:
    """One transfer's place in Fig 4-3; a transition the figure lacks is a bug, asserted."""

    __slots__ = ("payer", "call_id", "state")

    def __init__(self, payer: str, call_id: str):
        self.payer = payer
        self.call_id = call_id
        self.state = TransferState.AUTHENTICATED

    def advance(self, state: TransferState) -> None:
        assert state in _TRANSITIONS.get(self.state, ()), f"transfer {self.state} -> {state}"
        self.state = state

    @property
    def done(self) -> bool:
        return self.state not in _TRANSITIONS

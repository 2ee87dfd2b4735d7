"""RFC 3261 transaction timing (table 4) and transaction states, shared by both sides."""

from __future__ import annotations

import enum
from dataclasses import dataclass

T1_S = 0.5   # round-trip time estimate
T2_S = 4.0   # cap on the non-INVITE request and INVITE response retransmit interval
T4_S = 5.0   # how long a message may linger in the network


# Methods run as INVITE transactions (provisional, 2xx, ACK): RECEIVE is how a
# merchant asks a consumer to pay, answered by a person (DESIGN section 7).
INVITE_STYLE_METHODS = frozenset({"INVITE", "RECEIVE"})


class State(enum.Enum):
    TRYING = "Trying"
    CALLING = "Calling"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    CONFIRMED = "Confirmed"
    ACCEPTED = "Accepted"
    TERMINATED = "Terminated"


@dataclass(frozen=True)
class TimerSettings:
    """T1/T2/T4 in seconds; everything else is derived from them as the RFC does."""

    t1_s: float = T1_S
    t2_s: float = T2_S
    t4_s: float = T4_S

    def __post_init__(self) -> None:
        assert 0 < self.t1_s <= self.t2_s, "RFC 3261 requires T1 <= T2"
        assert self.t4_s > 0, "T4 bounds Timer K and Timer I"

"""Charged by time: what a consumer's running sessions owe, and when its money runs out.

All timed sessions of one consumer spend one amount, the unspent rest of its
sessions hold in the ledger.  A session runs from the merchant's ACK at its
rate (minor units per second), so at time t the sessions together owe
sum(rate_i x (t - start_i)), and **Timer C** is the moment that reaches the
unspent amount:  t_C = now + (unspent - owed(now)) / sum(rates).  It is
recomputed whenever a session starts or ends, or the ledger reports a new
unspent amount.

Rounding (documented for merchants and consumers): a session that ends by
BYE owes rate x elapsed rounded *up* to the minor unit (a started unit is
owed), but never more than the hold has left.  Sessions ended together by
Timer C share exactly what was left, in proportion to rate x elapsed, the
odd minor units going to the largest remainders: nothing made, nothing lost.

Sans-IO: times are plain floats handed in by the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Hashable

from mpay.payment.charging import charge_for


@dataclass
class _Running:
    rate: int
    started: float


@dataclass
class ConsumerSessions:
    """One consumer's timed sessions, keyed by whatever the caller likes."""

    consumer: str
    unspent: int = 0                         # the sessions hold's rest, as the ledger last said
    running: dict[Hashable, _Running] = field(default_factory=dict)

    def start(self, key: Hashable, rate: int, now: float) -> None:
        assert rate > 0 and key not in self.running, (key, rate)
        self.running[key] = _Running(rate, now)

    def owed(self, now: float) -> float:
        """What the running sessions have used up, unrounded."""
        return sum(s.rate * max(0.0, now - s.started) for s in self.running.values())

    def exhaustion_delay_s(self, now: float) -> float | None:
        """Seconds from *now* to Timer C; None when no session runs."""
        rates = sum(s.rate for s in self.running.values())
        if not rates:
            return None
        return max(0.0, (self.unspent - self.owed(now)) / rates)

    def end(self, key: Hashable, now: float) -> int:
        """The charge of one session ending now by BYE; it stops running."""
        session = self.running.pop(key, None)
        if session is None:
            return 0                          # never started (no ACK): nothing used
        charge = min(charge_for(session.rate, max(0.0, now - session.started)), self.unspent)
        self.unspent -= charge                # until the ledger's answer says exactly
        return charge

    def exhaust(self, now: float) -> dict[Hashable, int]:
        """Timer C: every running session ends; they share exactly what is unspent."""
        weights = {key: s.rate * max(0.0, now - s.started) for key, s in self.running.items()}
        self.running.clear()
        charges = share(self.unspent, weights)
        self.unspent = 0
        return charges

    def checkpoint(self, now: float) -> dict[Hashable, int]:
        """What each running session owes so far, within what is unspent (for a restart)."""
        weights = {key: s.rate * max(0.0, now - s.started) for key, s in self.running.items()}
        charges = {key: charge_for(s.rate, max(0.0, now - s.started))
                   for key, s in self.running.items()}
        if sum(charges.values()) > self.unspent:
            return share(self.unspent, weights)
        return charges


def share(total: int, weights: dict[Hashable, float]) -> dict[Hashable, int]:
    """Split *total* minor units in proportion to *weights* (largest remainders).

    With no weight at all (nothing ran) nobody owes anything: the total stays
    with the consumer.
    """
    assert total >= 0
    exact_weights = {key: Fraction(weight) for key, weight in weights.items()}  # no float drift
    whole = sum(exact_weights.values())
    if whole <= 0:
        return {key: 0 for key in weights}
    exact = {key: total * weight / whole for key, weight in exact_weights.items()}
    charges = {key: math.floor(value) for key, value in exact.items()}
    left = total - sum(charges.values())
    for key in sorted(exact, key=lambda k: (charges[k] - exact[k], str(k)))[:left]:
        charges[key] += 1
    assert sum(charges.values()) == total, (total, charges)
    return charges

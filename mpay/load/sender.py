"""What every payer process of ``mpay-load`` shares, whichever generator sends.

The generators' names, how far ahead a request may be built, how often a
sender reports, its CPU, and the Device a payer builds its requests with.
"""

from __future__ import annotations

import resource
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mpay.load import sipp
from mpay.sim.device import Device, DeviceState

STACK, LEAN, SIPP = "stack", "lean", sipp.SIPP
GENERATORS = (STACK, LEAN, SIPP)
"""The load generators: every message through the SIP stack, bytes (``mpay.load.lean``), or
SIPp (``mpay.load.sipp``)."""

PRECOMPUTE_AHEAD_S = 120.0
"""Requests are built at most this long before they are due: well inside the PS's 300 s skew."""

PROGRESS_EVERY_S = 0.25
"""How often the sender reports how many requests have been answered."""


def cpu_s() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def payer_device(reactor, state: DeviceState, domain: str, ps_addr: tuple[str, int],
                 endpoint: Any) -> tuple[Device, Ed25519PrivateKey]:
    """An enrolled payer's Device that only builds requests (sent from *endpoint*), and its
    key, loaded once."""
    device = Device(state, domain=domain, as_addr=ps_addr, ps_addr=ps_addr, as_identity="",
                    pinned_as_key=None, ring=lambda number, line: None, clock=reactor.seconds,
                    reactor=reactor)
    device.endpoint = endpoint
    return device, state.private_key()

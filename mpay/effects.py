"""Effects every sans-IO state machine here may return (enrolment, charging).

A machine names its timers (the design's Timer A, C, D, F); the glue that
carries its effects out starts them on the time wheel and feeds their firing
back as an event.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StartTimer:
    name: str
    delay_s: float


@dataclass(frozen=True)
class CancelTimer:
    name: str

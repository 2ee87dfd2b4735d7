"""The garbage collector as a payment server wants it.

CPython collects its youngest generation every 700 allocations, and now and
then walks every object alive.  A loaded server keeps tens of thousands
alive (32 s of transactions, the replay cache, Deferreds in flight), so
those walks came often and long: mpay-load saw collector pauses of 50-120 ms
(the p99), and bench/ledger.py lost a fifth of its throughput to them.  A
server therefore collects its young generation every GC_GEN0_THRESHOLD
allocations instead.  (Freezing what exists at start, gc.freeze, made no
measurable difference here.)

Since completed transactions keep only bytes (``mpay.sip.transaction``), a
young generation is mostly short-lived garbage, and walking 50,000 of it
took 11-22 ms a time: at 96,000 transfers per minute p99 was 41 ms with
50,000 and 18 ms with 10,000 (and 20 ms with 3,000).
"""

from __future__ import annotations

import gc

GC_GEN0_THRESHOLD = 10_000
"""Allocations between two young collections (CPython's default is 700)."""

GC_GEN1_THRESHOLD = 20
GC_GEN2_THRESHOLD = 100
"""Young collections per middle one, middle per full one (CPython: 10 and 10)."""


def tune(gen0_threshold: int = GC_GEN0_THRESHOLD) -> None:
    """Set the server's thresholds; 0 leaves CPython's defaults."""
    if gen0_threshold:
        gc.set_threshold(gen0_threshold, GC_GEN1_THRESHOLD, GC_GEN2_THRESHOLD)

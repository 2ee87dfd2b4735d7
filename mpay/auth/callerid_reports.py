"""Caller-ID reports, sans-IO: a modem's unsolicited lines in, one event per call out.

When a report ends.  A block is the run of ``DATE``/``TIME``/``NMBR``/``NAME``
lines (``KEY = value``, spaces optional) of one call; it ends, giving exactly
one event, at the first of:

1. it holds both NMBR and NAME (either order: modems differ; both come last);
2. it holds NMBR and a blank line arrives;
3. a RING, a result code (OK, ERROR...) or an AT echo arrives;
4. a field it already holds arrives again: that field starts the next block;
5. `CallerIDParser.flush`, called by the protocol once the modem has been quiet
   for `BLOCK_SETTLE_S` (a caller may hang up right after a number-only report).

Blank lines before the number are ignored (some modems frame every line with
them).  Garbage (noise, unknown text, ``MESG`` data) is counted and never ends
a block, so noise does not split one call into two.  A block without NMBR
still gives an event, with number None, so the AS can say why it refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mpay.e164 import InvalidNumber, normalise

MAX_NAME_CHARS = 50
_FIELD_RE = re.compile(r"(DATE|TIME|NMBR|DDN_NMBR|NAME|MESG)\s*=\s*(.*)", re.IGNORECASE)
_DIGITS4_RE = re.compile(r"[0-9]{4}")
RESULT_CODES = frozenset(("OK", "ERROR", "NO CARRIER", "BUSY", "NO DIALTONE", "NO ANSWER"))
_WITHHELD = "P"      # NMBR = P: the caller asked for privacy
_UNAVAILABLE = "O"   # NMBR = O: out of area, or the network did not send it


@dataclass(frozen=True)
class CallerIDEvent:
    """One incoming call on line *line_id*.

    *number_e164* is None when the caller cannot be identified, and *reason*
    then says why (withheld, unavailable, not a valid number...).  *date* and
    *time* are the modem's ``MMDD`` and ``HHMM`` (local time of the exchange,
    no year), kept for logs only.
    """

    line_id: str
    number_e164: str | None
    withheld: bool
    unavailable: bool
    name: str | None
    raw_number: str | None
    date: str | None
    time: str | None
    reason: str | None = None

    def __post_init__(self) -> None:
        assert (self.number_e164 is None) == (self.reason is not None), self


class CallerIDParser:
    """Modem report lines in, `CallerIDEvent` out; never raises on input."""

    def __init__(self, line_id: str, default_region: str):
        self.line_id = line_id
        self.default_region = default_region
        self._block: dict[str, str] | None = None
        self.rings = 0
        self.events = 0
        self.garbage_lines = 0

    @property
    def in_block(self) -> bool:
        """A report is open: the caller of `flush` should wait for its end."""
        return self._block is not None

    def feed(self, line: str) -> CallerIDEvent | None:
        """One line without its terminator; the event, if this line ended a block."""
        text = line.strip()
        field = _FIELD_RE.fullmatch(text)
        if field is not None:
            return self._field(field.group(1).upper(), field.group(2).strip())
        block = self._block
        if not text:
            return self.flush() if block is not None and "NMBR" in block else None
        upper = text.upper()
        if upper == "RING":
            self.rings += 1
        elif upper not in RESULT_CODES and not upper.startswith("AT"):
            self.garbage_lines += 1
            return None
        return self.flush()

    def flush(self) -> CallerIDEvent | None:
        """End the open block, if any, and return its event."""
        block, self._block = self._block, None
        if block is None:
            return None
        self.events += 1
        return _event(self.line_id, self.default_region, block)

    def discard(self) -> bool:
        """Drop an unfinished block (the device went away); True if there was one."""
        block, self._block = self._block, None
        return block is not None

    def _field(self, key: str, value: str) -> CallerIDEvent | None:
        if key == "MESG":            # data of tags the modem does not know
            self.garbage_lines += 1
            return None
        if key == "DDN_NMBR":        # "dialable directory number": the same number
            key = "NMBR"
        event = None
        if self._block is not None and key in self._block:
            event = self.flush()
        if self._block is None:
            self._block = {}
        self._block[key] = value
        if "NMBR" in self._block and "NAME" in self._block:
            assert event is None     # a repeat leaves a block with one field
            event = self.flush()
        return event


def _event(line_id: str, region: str, block: dict[str, str]) -> CallerIDEvent:
    raw = block.get("NMBR")
    name = block.get("NAME")
    if name is not None:
        name = None if name.upper() in (_WITHHELD, _UNAVAILABLE, "") else name[:MAX_NAME_CHARS]
    date, time = block.get("DATE"), block.get("TIME")
    common = dict(line_id=line_id, name=name, raw_number=raw,
                  date=date if date and _DIGITS4_RE.fullmatch(date) else None,
                  time=time if time and _DIGITS4_RE.fullmatch(time) else None)
    flag = (raw or "").upper()
    if flag == _WITHHELD:
        return CallerIDEvent(number_e164=None, withheld=True, unavailable=False,
                             reason="caller withheld the number", **common)
    if flag == _UNAVAILABLE or not raw:
        why = "number unavailable" if raw else "caller-ID report without a number"
        return CallerIDEvent(number_e164=None, withheld=False, unavailable=True,
                             reason=why, **common)
    try:
        number = normalise(raw, region)
    except InvalidNumber as exc:
        return CallerIDEvent(number_e164=None, withheld=False, unavailable=False,
                             reason=f"caller number {raw!r}: {exc.reason}", **common)
    return CallerIDEvent(number_e164=number, withheld=False, unavailable=False, **common)

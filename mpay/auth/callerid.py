"""Caller-ID receiver: a modem on a serial port tells the AS who is calling.

A device proves it owns its number by calling one of the AS's telephone lines;
the modem reports the calling number between the first and second ring, and
the AS hangs up without answering, so the call costs nothing.  Three layers:

- `CallerIDParser` (sans-IO, in `mpay.auth.callerid_reports`): report lines in,
  one `CallerIDEvent` per call out.
- `ModemProtocol`: LineReceiver glue.  Sends the init commands one at a time (a
  modem resetting after ATZ drops what it is sent meanwhile), sends ATH when a
  report is complete, and owns the only timers.
- `CallerIDReceiverService`: opens the tty with Twisted's SerialPort, and
  reopens it when the device goes away (a USB modem unplugged).

Report framing is documented in `mpay.auth.callerid_reports`.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

import serial
from twisted.application import service
from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.serialport import SerialPort
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from mpay.auth.callerid_reports import CallerIDEvent, CallerIDParser

DEFAULT_INIT_COMMANDS = ("ATZ", "AT+VCID=1")
DEFAULT_BAUDRATE = 9600
# A report line is under 80 characters; a longer one is noise, discarded.
MAX_LINE_BYTES = 256
# Bytes held while waiting for a line end; beyond this the buffer is noise, dropped.
# Larger than a line, so noise and a good report in one read lose only the noise.
MAX_BUFFER_BYTES = 16384
# The FSK burst lasts about half a second and the modem prints the block in one
# go; this much silence after a field means no more fields are coming.
BLOCK_SETTLE_S = 1.5
# ATZ resets the modem, which takes a few hundred ms; give up waiting after this.
COMMAND_TIMEOUT_S = 3.0
# At most this many commands wait for the modem (init + one ATH).
MAX_QUEUED_COMMANDS = 8
# Caller-ID names are at most 15 characters on the wire; be generous, but bounded.
# Reopening a lost or missing device: first delay, doubling up to the cap.
REOPEN_DELAY_S = 1.0
REOPEN_MAX_DELAY_S = 60.0
# stopService waits this long for queued bytes to drain before closing anyway.
CLOSE_TIMEOUT_S = 2.0


OnCallerID = Callable[["CallerIDEvent"], object]


def _cancel(call: Any) -> None:
    """Cancel a pending timer: a wheel handle (idempotent) or a reactor DelayedCall."""
    if call is None:
        return
    active = call.active
    if active() if callable(active) else active:
        call.cancel()


class ReactorTimers:
    """The time wheel's ``start`` over a bare reactor: for tools and tests without a wheel.

    In the servers the receiver is given the wheel's driver, so its timers
    live with every other server timer.
    """

    def __init__(self, clock: IReactorTime):
        self.clock = clock

    def start(self, delay_s: float, callback: Callable[..., object], *args: object) -> IDelayedCall:
        return self.clock.callLater(delay_s, callback, *args)


class ModemProtocol(LineReceiver):
    """Talks to one modem: init commands, report lines to the parser, ATH per call.

    Lines end in CR LF or a bare CR (echoed commands end in CR alone): the
    delimiter is CR and the LF left at the start of the next line is dropped.
    """

    delimiter = b"\r"
    MAX_LENGTH = MAX_BUFFER_BYTES       # LineReceiver drops the whole buffer past this
    log = Logger()

    def __init__(self, parser: CallerIDParser, on_caller_id: OnCallerID,
                 init_commands: tuple[str, ...] | list[str] = DEFAULT_INIT_COMMANDS,
                 clock: IReactorTime | None = None,
                 on_connection_lost: Callable[[Failure], object] | None = None,
                 timers: Any = None):
        if clock is None:
            from twisted.internet import reactor as clock
        self.timers = timers if timers is not None else ReactorTimers(clock)
        self.parser = parser
        self.on_caller_id = on_caller_id
        self.init_commands = tuple(init_commands)
        self.clock = clock
        self.on_connection_lost = on_connection_lost
        self._queue: deque[str] = deque()
        self._waiting_for: str | None = None
        self._command_timer: Any = None
        self._settle_timer: Any = None

    def connectionMade(self) -> None:
        for command in self.init_commands:
            self.send_command(command)

    def send_command(self, command: str) -> None:
        """Queue *command*; it is sent once the modem has answered the previous one."""
        if len(self._queue) >= MAX_QUEUED_COMMANDS:
            self.log.warn("modem {line}: command queue full, dropped {command}",
                          line=self.parser.line_id, command=command)
            return
        self._queue.append(command)
        if self._waiting_for is None:
            self._send_next()

    def _send_next(self) -> None:
        if not self._queue or self.transport is None:
            return
        command = self._queue.popleft()
        self._waiting_for = command
        self.transport.write(command.encode("ascii") + b"\r")
        self._command_timer = self.timers.start(COMMAND_TIMEOUT_S, self._command_timed_out)

    def _command_timed_out(self) -> None:
        self._command_timer = None
        self.log.warn("modem {line} did not answer {command} within {timeout_s} s",
                      line=self.parser.line_id, command=self._waiting_for,
                      timeout_s=COMMAND_TIMEOUT_S)
        self._command_done()

    def _command_done(self) -> None:
        _cancel(self._command_timer)
        self._command_timer = None
        self._waiting_for = None
        self._send_next()

    def lineReceived(self, line: bytes) -> None:
        if len(line) > MAX_LINE_BYTES:
            self.parser.garbage_lines += 1
            return
        text = line.strip(b"\n").decode("ascii", "replace")
        result = text.strip().upper()
        if self._waiting_for is not None and result in ("OK", "ERROR"):
            if result == "ERROR":
                self.log.error("modem {line} refused {command}",
                               line=self.parser.line_id, command=self._waiting_for)
            self._command_done()
        self._deliver(self.parser.feed(text))
        self._arm_settle_timer()

    def lineLengthExceeded(self, line: bytes) -> None:
        """A buffer with no line end: noise, not a reason to drop the modem."""
        self.parser.garbage_lines += 1

    def _arm_settle_timer(self) -> None:
        _cancel(self._settle_timer)
        self._settle_timer = None
        if self.parser.in_block:
            self._settle_timer = self.timers.start(BLOCK_SETTLE_S, self._settled)

    def _settled(self) -> None:
        self._settle_timer = None
        self._deliver(self.parser.flush())

    def _deliver(self, event: CallerIDEvent | None) -> None:
        if event is None:
            return
        if "ATH" not in self._queue:     # one hang-up covers calls not yet hung up
            self.send_command("ATH")
        self.log.info("caller ID on line {line}: {number} ({reason})", line=event.line_id,
                      number=event.number_e164 or event.raw_number, reason=event.reason or "ok")
        try:
            self.on_caller_id(event)
        except Exception:
            self.log.failure("caller-ID consumer failed on {event!r}", event=event)

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:
        _cancel(self._command_timer)
        _cancel(self._settle_timer)
        self._command_timer = self._settle_timer = None
        self._queue.clear()
        self._waiting_for = None
        if self.parser.discard():
            self.log.warn("modem {line} went away mid-report; report discarded",
                          line=self.parser.line_id)
        if self.on_connection_lost is not None:
            self.on_connection_lost(reason)


class CallerIDReceiverService(service.Service):
    """One telephone line: its modem's tty, opened with the real SerialPort.

    *line_id* names the line (its own telephone number, so the AS can send
    each enrolling device to a different line and tell concurrent callers
    apart).  A device that is missing or goes away is retried, with doubling
    delays, until the service stops.
    """

    log = Logger()

    def __init__(self, device_path: str, on_caller_id: OnCallerID, line_id: str,
                 default_region: str,
                 init_commands: tuple[str, ...] | list[str] = DEFAULT_INIT_COMMANDS,
                 baudrate: int = DEFAULT_BAUDRATE, reactor=None,
                 reopen_delay_s: float = REOPEN_DELAY_S, timers: Any = None):
        if reactor is None:
            from twisted.internet import reactor
        self.timers = timers if timers is not None else ReactorTimers(reactor)
        self.device_path = device_path
        self.on_caller_id = on_caller_id
        self.line_id = line_id
        self.init_commands = tuple(init_commands)
        self.baudrate = baudrate
        self.reopen_delay_s = reopen_delay_s
        self.parser = CallerIDParser(line_id, default_region)
        self.name = f"callerid {line_id}"
        self.protocol: ModemProtocol | None = None
        self.port: SerialPort | None = None
        self._reactor = reactor
        self._delay_s = reopen_delay_s
        self._reopen: Any = None
        self._closed: defer.Deferred | None = None

    def startService(self) -> None:
        super().startService()
        self._open()

    def _open(self) -> None:
        self._reopen = None
        protocol = ModemProtocol(self.parser, self.on_caller_id, self.init_commands,
                                 clock=self._reactor, on_connection_lost=self._lost,
                                 timers=self.timers)
        try:
            self.port = SerialPort(protocol, self.device_path, self._reactor,
                                   baudrate=self.baudrate)
        except (OSError, serial.SerialException) as exc:
            self.log.error("caller-ID line {line}: cannot open {device}: {error};"
                           " retrying in {delay_s} s", line=self.line_id,
                           device=self.device_path, error=exc, delay_s=self._delay_s)
            self._schedule_reopen()
            return
        self.protocol = protocol
        self._delay_s = self.reopen_delay_s
        self.log.info("caller-ID line {line} listening on {device}",
                      line=self.line_id, device=self.device_path)

    def _schedule_reopen(self) -> None:
        self._reopen = self.timers.start(self._delay_s, self._open)
        self._delay_s = min(self._delay_s * 2, REOPEN_MAX_DELAY_S)

    def _lost(self, reason: Failure) -> None:
        self.port = self.protocol = None
        if self._closed is not None:
            closed, self._closed = self._closed, None
            closed.callback(None)
        elif self.running:
            self.log.error("caller-ID line {line}: lost {device} ({reason});"
                           " reopening in {delay_s} s", line=self.line_id,
                           device=self.device_path, reason=reason.getErrorMessage(),
                           delay_s=self._delay_s)
            self._schedule_reopen()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        _cancel(self._reopen)
        self._reopen = None
        if self.port is None:
            return defer.succeed(None)
        port = self.port
        # On timeout, the canceller closes the port, which fires the Deferred.
        self._closed = defer.Deferred(canceller=lambda _: self._force_close(port))
        port.loseConnection()
        return self._closed.addTimeout(CLOSE_TIMEOUT_S, self._reactor)

    def _force_close(self, port: SerialPort) -> None:
        """The device would not take our last bytes (flow control): close regardless."""
        self.log.warn("caller-ID line {line}: {device} did not drain; closing",
                      line=self.line_id, device=self.device_path)
        port.connectionLost(Failure(error.ConnectionDone()))

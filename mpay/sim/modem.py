"""A simulated caller-ID modem on a pseudo-terminal pair.

The AS opens the pty's slave side with the same SerialPort code it uses for a
real modem, so development, tests and demonstrations run the production path.
The simulator answers AT commands with OK (recording them: a test can check
that the AS sent ATH), echoes them as a modem does after ATZ, reports caller
ID only once it has been enabled (``AT+VCID=1`` or ``AT#CID=1``), and on
`SimulatedModem.ring` writes the lines a real modem writes for an incoming call.

Run alone, ``python -m mpay.sim.modem [--control PATH]`` prints the slave path
on stdout and accepts commands on a UNIX socket (default `DEFAULT_CONTROL_PATH`,
mode 0600: whoever may connect may forge caller IDs).  The control protocol is
one line per connection, answered with one line, then the simulator closes::

    ring +886912345678 [NAME ...]   ->  OK | ERROR reason
    withheld                        ->  OK        (NMBR = P)
    unavailable                     ->  OK        (NMBR = O)

`ring_via_control` is the client, for ``mpay-dmd enroll``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tty
from collections import deque

import phonenumbers
from twisted.application import service
from twisted.internet import abstract, defer, error, fdesc
from twisted.internet.endpoints import UNIXClientEndpoint, UNIXServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

DEFAULT_CONTROL_PATH = "var/sim-modem.sock"
CONTROL_SOCKET_MODE = 0o600
# A control request is one short line; anything longer is refused.
MAX_CONTROL_LINE_BYTES = 512
# How long ring_via_control waits for the simulator's answer.
CONTROL_TIMEOUT_S = 5.0
# AT commands remembered for assertions; older ones are forgotten.
MAX_RECORDED_COMMANDS = 1000
MAX_AT_LINE_BYTES = 256
CRLF = b"\r\n"
_CALLER_ID_ON = frozenset(("AT+VCID=1", "AT#CID=1"))
_CALLER_ID_OFF = frozenset(("AT+VCID=0", "AT#CID=0"))


class ControlError(Exception):
    """The simulator refused a control request; the message is its reason."""


class _PtyMaster(abstract.FileDescriptor):
    """The master fd as a Twisted transport (what SerialPort is for the slave)."""

    def __init__(self, fd: int, protocol, reactor):
        super().__init__(reactor)
        self._fd = fd
        self.connected = 1               # FileDescriptor.write drops data otherwise
        fdesc.setNonBlocking(fd)
        self.protocol = protocol
        protocol.makeConnection(self)

    def fileno(self) -> int:
        return self._fd

    def writeSomeData(self, data: bytes):
        return fdesc.writeToFD(self._fd, data)

    def doRead(self):
        return fdesc.readFromFD(self._fd, self.protocol.dataReceived)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self.protocol.connectionLost(reason)


class _ATCommandProtocol(LineReceiver):
    """The modem's command interpreter: CR-terminated commands in, results out."""

    delimiter = b"\r"
    MAX_LENGTH = MAX_AT_LINE_BYTES

    def __init__(self, modem: SimulatedModem):
        self.modem = modem

    def lineReceived(self, line: bytes) -> None:
        command = line.strip(b"\n").decode("ascii", "replace").strip()
        if not command.upper().startswith("AT"):
            return                       # a modem ignores what is not a command
        if self.modem.echo:
            self.transport.write(line.strip(b"\n") + b"\r")
        self.modem._command_received(command)
        self.transport.write(CRLF + b"OK" + CRLF)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.transport.write(CRLF + b"ERROR" + CRLF)


class SimulatedModem:
    """A pty pair whose master side behaves as a caller-ID modem.

    The pair is opened at construction, so `slave_path` is known when the
    service tree is built; `start` begins answering and `stop` closes both
    ends.  The simulator keeps its own slave fd open: the pty then survives
    the AS closing and reopening the device.
    """

    log = Logger()

    def __init__(self, reactor=None, echo: bool = True, national_region: str | None = None):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.national_region = national_region
        self.default_echo = self.echo = echo
        self.caller_id_enabled = False
        self.commands: deque[str] = deque(maxlen=MAX_RECORDED_COMMANDS)
        self._waiters: list[tuple[str, int, defer.Deferred]] = []
        self._master_fd, self._slave_fd = os.openpty()
        tty.setraw(self._slave_fd)        # no echo or CR/LF mangling before anyone opens it
        self.slave_path = os.ttyname(self._slave_fd)
        self._transport: _PtyMaster | None = None

    def start(self) -> None:
        if self._transport is None:
            assert self._master_fd >= 0, "stopped modems stay stopped"
            self._transport = _PtyMaster(self._master_fd, _ATCommandProtocol(self),
                                         self._reactor)
            self._transport.startReading()

    def stop(self) -> None:
        """Close both ends now; idempotent, so it suits addCleanup."""
        if self._transport is not None:
            transport, self._transport = self._transport, None
            transport.connectionLost(Failure(error.ConnectionDone()))
        for fd in (self._master_fd, self._slave_fd):
            if fd >= 0:
                os.close(fd)
        self._master_fd = self._slave_fd = -1

    def _command_received(self, command: str) -> None:
        upper = command.upper().replace(" ", "")
        self.commands.append(upper)
        if upper == "ATZ":
            self.echo, self.caller_id_enabled = self.default_echo, False
        elif upper in ("ATE0", "ATE1", "ATE"):
            self.echo = upper != "ATE0"
        elif upper in _CALLER_ID_ON or upper in _CALLER_ID_OFF:
            self.caller_id_enabled = upper in _CALLER_ID_ON
        for waiter in list(self._waiters):
            wanted, count, deferred = waiter
            if self.commands.count(wanted) >= count:
                self._waiters.remove(waiter)
                deferred.callback(wanted)

    def wait_for_command(self, command: str, count: int = 1) -> defer.Deferred:
        """Fires once *command* has been received *count* times in all."""
        command = command.upper().replace(" ", "")
        if self.commands.count(command) >= count:
            return defer.succeed(command)
        deferred = defer.Deferred()
        self._waiters.append((command, count, deferred))
        return deferred

    def ring(self, number: str | None, name: str | None = None, withheld: bool = False,
             unavailable: bool = False) -> None:
        """An incoming call: RING, then the caller-ID block if it is enabled.

        *number* is written as given, except that a ``+`` number of
        `national_region` is written in national digits (``0912345678``), as
        that region's exchanges present it.
        """
        lines = ["RING"]
        if self.caller_id_enabled:
            now = time.localtime(self._reactor.seconds())
            nmbr = ("P" if withheld else "O" if unavailable or not number
                    else self._presented(number))
            lines += ["", time.strftime("DATE = %m%d", now), time.strftime("TIME = %H%M", now),
                      f"NMBR = {nmbr}"]
            if name is not None:
                lines.append(f"NAME = {name}")
        self.send_raw(CRLF + CRLF.join(line.encode("ascii", "replace") for line in lines) + CRLF + CRLF)

    def _presented(self, number: str) -> str:
        if self.national_region is None or not number.startswith("+"):
            return number
        try:
            parsed = phonenumbers.parse(number)
        except phonenumbers.NumberParseException:
            return number
        if phonenumbers.region_code_for_number(parsed) != self.national_region:
            return number
        national = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.NATIONAL)
        return "".join(c for c in national if c.isdigit())

    def send_raw(self, data: bytes) -> None:
        """Write *data* as the modem; for line noise and odd report formats."""
        assert self._transport is not None, "start() the modem first"
        self._transport.write(data)


class _ControlProtocol(LineReceiver):
    """Server side of the control socket: one request, one answer, close."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_CONTROL_LINE_BYTES

    def __init__(self, modem: SimulatedModem):
        self.modem = modem

    def lineReceived(self, line: bytes) -> None:
        words = line.decode("utf-8", "replace").split()
        verb, args = (words[0].lower(), words[1:]) if words else ("", [])
        if verb == "ring" and args:
            self.modem.ring(args[0], " ".join(args[1:]) or None)
        elif verb in ("withheld", "unavailable") and not args:
            self.modem.ring(None, withheld=verb == "withheld", unavailable=verb == "unavailable")
        else:
            return self._answer(b"ERROR usage: ring NUMBER [NAME] | withheld | unavailable")
        SimulatedModem.log.info("control: {request}", request=" ".join(words))
        self._answer(b"OK")

    def lineLengthExceeded(self, line: bytes) -> None:
        self._answer(b"ERROR line too long")

    def _answer(self, reply: bytes) -> None:
        self.sendLine(reply)
        self.transport.loseConnection()


class SimulatedModemService(service.Service):
    """The simulator, and its control socket if *control_path* is given."""

    def __init__(self, modem: SimulatedModem, control_path: str | None = None, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.modem = modem
        self.control_path = control_path
        self._reactor = reactor
        self._listening = None

    @defer.inlineCallbacks
    def startService(self):
        super().startService()
        self.modem.start()
        if self.control_path:
            os.makedirs(os.path.dirname(self.control_path) or ".", exist_ok=True)
            endpoint = UNIXServerEndpoint(self._reactor, self.control_path,
                                          mode=CONTROL_SOCKET_MODE, wantPID=True)
            factory = Factory.forProtocol(lambda: _ControlProtocol(self.modem))
            factory.noisy = False
            self._listening = yield endpoint.listen(factory)
        self.modem.log.info("simulated modem on {slave}, control socket {control}",
                            slave=self.modem.slave_path, control=self.control_path or "none")

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        if self._listening is not None:
            listening, self._listening = self._listening, None
            yield listening.stopListening()
        self.modem.stop()


class _ControlClient(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = MAX_CONTROL_LINE_BYTES

    def __init__(self, request: str):
        self.request = request
        self.reply: str | None = None
        self.done = defer.Deferred()

    def connectionMade(self) -> None:
        self.sendLine(self.request.encode("utf-8"))

    def lineReceived(self, line: bytes) -> None:
        if self.reply is None:
            self.reply = line.decode("utf-8", "replace").strip()

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:
        """Answer only now: the simulator closes after its reply, so nothing is left open."""
        if self.reply == "OK":
            self.done.callback(None)
        elif self.reply is not None:
            self.done.errback(ControlError(self.reply.removeprefix("ERROR").strip()))
        else:
            self.done.errback(ControlError(f"no answer: {reason.getErrorMessage()}"))


def ring_via_control(path: str, number: str, name: str | None = None,
                     reactor=None) -> defer.Deferred:
    """Ask the simulator listening on UNIX socket *path* to ring with *number*.

    Fires with None once the modem has written the call, or fails with
    `ControlError` (refused, no answer within `CONTROL_TIMEOUT_S`) or a
    connection error (nobody listening).
    """
    if reactor is None:
        from twisted.internet import reactor
    request = f"ring {number}" + (f" {name}" if name else "")
    client = _ControlClient(request)
    endpoint = UNIXClientEndpoint(reactor, path, timeout=CONTROL_TIMEOUT_S)

    def connected(protocol: _ControlClient) -> defer.Deferred:
        timer = reactor.callLater(CONTROL_TIMEOUT_S, protocol.transport.abortConnection)

        def finished(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        return protocol.done.addBoth(finished)

    return connectProtocol(endpoint, client).addCallback(connected)


def main(argv: list[str] | None = None) -> None:
    """``python -m mpay.sim.modem``: run the simulator until interrupted."""
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    parser = argparse.ArgumentParser(prog="python -m mpay.sim.modem", description=__doc__
                                     .split("\n\n")[0])
    parser.add_argument("--control", default=DEFAULT_CONTROL_PATH,
                        help="UNIX socket for ring requests (default %(default)s)")
    parser.add_argument("--no-echo", action="store_true", help="do not echo AT commands")
    parser.add_argument("--national", metavar="REGION",
                        help="present numbers of REGION (e.g. TW) in national digits")
    options = parser.parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)],
                                     redirectStandardIO=False)
    modem = SimulatedModem(reactor, echo=not options.no_echo, national_region=options.national)
    simulator = SimulatedModemService(modem, options.control, reactor)
    print(modem.slave_path, flush=True)

    def start() -> None:
        def failed(failure: Failure) -> None:
            SimulatedModem.log.failure("simulated modem could not start", failure)
            reactor.stop()

        simulator.startService().addErrback(failed)

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", simulator.stopService)
    reactor.run()


if __name__ == "__main__":
    main()

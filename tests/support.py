"""Shared test doubles: the real time wheel on a task.Clock, a recording wire, a child's output,
callback receivers."""

from __future__ import annotations

from twisted.internet import defer, protocol, task

from mpay.sip.message import Request, Response, parse
from mpay.timewheel import TimeWheel
from mpay.timewheel_service import TimeWheelService

TICK_S = 0.1


class ClockWheel:
    """The production wheel and its driver, on a clock the test moves by hand."""

    def __init__(self, testcase, tick_s: float = TICK_S):
        self.clock = task.Clock()
        self.wheel = TimeWheel(tick_s=tick_s)
        self.service = TimeWheelService(self.wheel, reactor=self.clock)
        self.service.startService()
        testcase.addCleanup(self.service.stopService)

    def advance(self, seconds: float, step: float = TICK_S) -> None:
        """Move time forward in tick-sized steps, so every timer fires on its tick."""
        steps = round(seconds / step)
        for _ in range(steps):
            self.clock.advance(step)


class Wire:
    """Records what an endpoint or transaction layer sends, parsed for assertions."""

    def __init__(self):
        self.sent: list[tuple[bytes, object]] = []

    def __call__(self, data: bytes, addr) -> None:
        self.sent.append((data, addr))

    def messages(self) -> list[Request | Response]:
        return [parse(data) for data, _ in self.sent]

    def statuses(self) -> list[int]:
        return [m.status for m in self.messages() if isinstance(m, Response)]

    def clear(self) -> None:
        del self.sent[:]


def request_bytes(method: str = "OPTIONS", *, branch: str = "z9hG4bK-test-1", cseq: int = 1,
                  call_id: str = "call-1@198.51.100.7", via_host: str = "198.51.100.7:5061",
                  extra: str = "", body: bytes = b"", uri: str = "sip:+886912345678@mpay.test",
                  via_params: str = "", cseq_method: str | None = None) -> bytes:
    head = (
        f"{method} {uri} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {via_host};branch={branch}{via_params}\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:+886911111111@mpay.test>;tag=abc123\r\n"
        "To: <sip:+886912345678@mpay.test>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {cseq} {cseq_method or method}\r\n"
        f"{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def make_request(method: str = "OPTIONS", **kwargs) -> Request:
    message = parse(request_bytes(method, **kwargs))
    assert isinstance(message, Request)
    return message


class Receivers:
    """Callbacks for an API that answers by callback: ``kept`` records, and *done* fires
    after *count* of them; ``raising`` is a receiver with a bug."""

    def __init__(self, count: int):
        self.count = count
        self.results: list = []
        self.done = defer.Deferred()

    def kept(self, result) -> None:
        self.results.append(result)
        if len(self.results) == self.count:
            self.done.callback(None)

    @staticmethod
    def raising(result) -> None:
        raise RuntimeError("a receiver's bug")


class ProcessOutput(protocol.ProcessProtocol):
    """A child process's stdout and stderr, together; ``ended`` fires with its exit code."""

    def __init__(self):
        self.output = b""
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)


@defer.inlineCallbacks
def sweep_once(case, count: int, argv: list[str]):
    """One rate of ``mpay-load``'s sweep of *count* transfers, its output caught; (args,
    report, output), after asserting that each got 200 and every 200 is in the journal."""
    import io
    import sys

    from twisted.internet import reactor

    from mpay.cli import load
    args = load.parse_args(["--count", str(count)] + argv)
    out = io.StringIO()
    case.patch(sys, "stdout", out)
    reports = yield load.sweep(reactor, args)
    case.assertEqual(len(reports), 1, out.getvalue())
    report = reports[0]
    case.assertEqual(report.stats.status_text(), f"200:{count}", out.getvalue())
    case.assertTrue(report.audit_ok, report.audit_output)
    case.assertEqual((report.journal_checked, report.journal_missing), (count, 0))
    return args, report, out.getvalue()

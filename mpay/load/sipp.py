"""The SIPp generator: SIPp (Debian's sip-tester) carries the payers' and the payees' wire work.

A second load generator that none of us wrote, and a cheap one: SIPp is C++,
about 30 us of CPU a transaction on either side here, where the lean
generator's Python costs several times that on the two cores the server
shares.  Everything that needs the devices' keys stays ours:

- the payers: each sender process (``mpay.load.sipp_sender``) builds its whole
  share ahead -- signed, ticketed, authenticated transfer requests, exactly as
  a Sim-DMD builds them -- and writes what varies between them (payee, payer,
  From tag, CSeq, signature, ticket, authenticator) as SIPp's injection file,
  one line a call.  What SIPp writes itself is the Via (branch and port: not
  in the request digest) and the Call-ID, which is in the digest: SIPp numbers
  its calls 1, 2, ... and takes line n - 1 for call n (SEQUENTIAL), so with
  ``-cid_str`` the Call-ID of call n is known before it exists
  (:func:`call_id`).  SIPp opens the calls at the share's rate (uniform only:
  it has no Poisson process), retransmits from T1 as RFC 3261 17.1.2 does, and
  logs one line a call: its number, final status, the times it was sent and
  answered (gettimeofday, microseconds) and a 200's journal id
  (:func:`read_calls`).  A call with no line got no final answer in time.
- the payees: this process re-registers every payee from one UDP port
  (the registrar routes by where the REGISTER came from), then one SIPp UAS
  on that port answers each notice MESSAGE with a 200 (:func:`uas_scenario`).

The SIPp body: SIPp ends a message's last line with CRLF, so the JSON of a
request it sends is followed by one; the digest is of those bytes
(:data:`BODY_END`), and the PS's JSON reader takes the trailing whitespace.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
from typing import Any, Iterable, NamedTuple
from xml.sax.saxutils import escape

from twisted.internet import defer, protocol, task

from mpay.auth.tickets import AUTHENTICATOR_HEADER, TICKET_HEADER
from mpay.payment.receipt import SIGNATURE_HEADER
from mpay.payment.transfer import TRANSFER_CONTENT_TYPE

SIPP = "sipp"
"""The generator's name (``mpay-load --generator sipp``) and SIPp's command."""

BODY_END = b"\r\n"
"""What SIPp adds after the last body line of a message it sends."""

FIELD_SEPARATOR = ";"
"""SIPp's injection file separates the fields of a line with this, and has no escape."""

FINAL_STATUSES = (202, 400, 401, 402, 403, 404, 408, 413, 415, 420, 480, 481, 482, 483,
                  500, 503, 513)
"""The non-200 final answers a payer's call logs; any other is a call SIPp fails unlogged
(a failure with no status, as a lost answer is)."""

SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
"""SIPp's SO_RCVBUF/SO_SNDBUF (its default 64 KiB holds about a hundred answers)."""

TIMER_RESOLUTION_MS = 1
"""SIPp's scheduling tick (its default, 10 ms, holds a call's next step up to that long)."""

UAS_TIMEWAIT_MS = 4000
"""How long the payees' SIPp keeps an answered notice, so that a retransmission of it
gets the same 200 (the same To tag); later ones get a new 200, harmless outside a dialog."""

T1_MS = 500

ANY_PORT = 0
"""SIPp binds a free port of its own."""

LOG_LINE_BYTES = 64
"""About one call's log line: progress is the log's size over this."""

BIND_WAIT_S = 10.0
BIND_POLL_S = 0.02
"""Waiting for the payees' SIPp to listen: how long at most, how often to look."""

EXIT_WAIT_S = 5.0
"""After SIGTERM, how long a SIPp may take before it is killed."""


def binary() -> str | None:
    """SIPp's path, or None where it is not installed."""
    return shutil.which(SIPP)


def require() -> str:
    """SIPp's path; RuntimeError where it is not installed."""
    path = binary()
    if path is None:
        raise RuntimeError("--generator sipp: SIPp is not installed (Debian: sip-tester)")
    return path


def call_id(run_tag: str, call_number: int, host: str) -> str:
    """The Call-ID SIPp gives call *call_number* (1-based) under :func:`cid_format`."""
    return f"{call_number}-{run_tag}@{host}"


def cid_format(run_tag: str, host: str) -> str:
    """SIPp's ``-cid_str`` for :func:`call_id` (%u: the call's number)."""
    return f"%u-{run_tag}@{host}"


class CallFields(NamedTuple):
    """What varies between two transfer requests, in injection-file order."""

    payee: str
    payer: str
    from_tag: str
    cseq: int
    signature: str
    ticket: str
    authenticator: str

    def line(self) -> str:
        text = FIELD_SEPARATOR.join(str(field) for field in self)
        assert text.count(FIELD_SEPARATOR) == len(self) - 1 and "\n" not in text, text
        return text


def call_fields(request: Any, payee: str, payer: str, domain: str) -> CallFields:
    """The injection fields of *request* (a transfer request a Device built), checked to be
    what :func:`uac_scenario` renders: the rest of the request is the scenario's."""
    assert request.uri == _uri(payee, domain), (request.uri, payee)
    assert request.from_addr.uri == _uri(payer, domain), request.from_addr.uri
    return CallFields(payee, payer, request.from_addr.params["tag"], request.cseq[0],
                      request.headers.get(SIGNATURE_HEADER), request.headers.get(TICKET_HEADER),
                      request.headers.get(AUTHENTICATOR_HEADER))


def _uri(number: str, domain: str) -> str:
    return f"sip:{number}@{domain};user=phone"


def injection_file(lines: Iterable[str]) -> str:
    """SIPp's ``-inf`` text: call n takes line n - 1."""
    return "SEQUENTIAL\n" + "".join(line + "\n" for line in lines)


def uac_scenario(domain: str, body: bytes) -> str:
    """The payers' scenario: one transfer request a call, the request as a Device builds it
    (header for header; tests/test_load_sipp.py holds the two together), then its answer."""
    assert body.endswith(BODY_END) and b"\n" not in body[:-len(BODY_END)], body
    request = "\n".join([
        f"MESSAGE {_uri('[field0]', domain)} SIP/2.0",
        "Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport",
        "Max-Forwards: 70",
        f"From: <{_uri('[field1]', domain)}>;tag=[field2]",
        f"To: <{_uri('[field0]', domain)}>",
        "Call-ID: [call_id]",
        "CSeq: [field3] MESSAGE",
        f"Content-Type: {TRANSFER_CONTENT_TYPE}",
        f"{SIGNATURE_HEADER}: [field4]",
        f"{TICKET_HEADER}: [field5]",
        f"{AUTHENTICATOR_HEADER}: [field6]",
        "Content-Length: [len]",
        "",
        body[:-len(BODY_END)].decode("ascii"),
    ])
    sent = '<action><gettimeofday assign_to="s0,u0"/></action>'
    answered = '<gettimeofday assign_to="s1,u1"/>'
    times = "[$s0] [$u0] [$s1] [$u1]"
    parts = [
        '<?xml version="1.0" encoding="ISO-8859-1" ?>',
        '<scenario name="mpay credit transfer">',
        f"  <nop>{sent}</nop>",
        f'  <send retrans="{T1_MS}"><![CDATA[\n{request}\n]]></send>',
        '  <recv response="100" optional="true"/>',
    ]
    parts += [f'  <recv response="{status}" optional="true" next="s{status}"/>'
              for status in FINAL_STATUSES]
    journal = escape('"journal_id": ([0-9]+)', {'"': "&quot;"})
    parts += [
        '  <recv response="200"><action>'
        f'<ereg regexp="{journal}" search_in="body" check_it="false" assign_to="j,journal"/>'
        "</action></recv>",
        f'  <nop><action>{answered}<log message="[call_number] 200 {times} [$journal]"/>'
        '</action></nop>',
        '  <nop next="end"/>',
    ]
    for status in FINAL_STATUSES:
        parts += [f'  <label id="s{status}"/>',
                  f'  <nop><action>{answered}<log message="[call_number] {status} {times} -"/>'
                  '</action></nop>',
                  '  <nop next="end"/>']
    parts += ['  <label id="end"/>', '  <Reference variables="j"/>', "</scenario>", ""]
    return "\n".join(parts)


def uas_scenario() -> str:
    """The payees' scenario: a notice MESSAGE, its 200 (RFC 3261 8.2.6: Vias, From, Call-ID
    and CSeq echoed, To tagged), kept UAS_TIMEWAIT_MS for retransmissions."""
    return "\n".join([
        '<?xml version="1.0" encoding="ISO-8859-1" ?>',
        '<scenario name="mpay payee">',
        '  <recv request="MESSAGE"/>',
        "  <send><![CDATA[",
        "SIP/2.0 200 OK",
        "[last_Via:]",
        "[last_From:]",
        "[last_To:];tag=[pid]-[call_number]",
        "[last_Call-ID:]",
        "[last_CSeq:]",
        "Content-Length: 0",
        "",
        "]]></send>",
        f'  <timewait milliseconds="{UAS_TIMEWAIT_MS}"/>',
        "</scenario>",
        "",
    ])


class Call(NamedTuple):
    """One call's log line: its final status, when sent and how long to the answer."""

    status: int
    sent_s: float
    latency_s: float
    journal_id: int | None


def read_calls(lines: Iterable[str]) -> dict[int, Call]:
    """Call number -> :class:`Call`, from the UAC scenario's log (lines it did not write,
    SIPp's own messages, are left out)."""
    calls = {}
    for line in lines:
        words = line.split()      # a 200 without a journal id has no seventh word
        if len(words) not in (6, 7) or not words[0].isdigit() or not words[1].isdigit():
            continue
        try:
            sent_s = float(words[2]) + float(words[3]) / 1e6
            answered_s = float(words[4]) + float(words[5]) / 1e6
        except ValueError:
            continue
        journal_id = int(words[6]) if len(words) == 7 and words[6].isdigit() else None
        calls[int(words[0])] = Call(int(words[1]), sent_s, answered_s - sent_s, journal_id)
    return calls


def retransmissions(stat_csv: str) -> int:
    """The requests SIPp sent again, from the last line of its ``-trace_stat`` file."""
    lines = [line.split(";") for line in stat_csv.splitlines() if line.strip()]
    if len(lines) < 2 or "Retransmissions(C)" not in lines[0]:
        return 0
    value = lines[-1][lines[0].index("Retransmissions(C)")]
    return int(value) if value.isdigit() else 0


def uac_command(sipp: str, directory: str, target: tuple[str, int], *, host: str,
                run_tag: str, calls: int, rate_per_min: float, timeout_s: float) -> list[str]:
    """SIPp sending *calls* transfers at *rate_per_min* from a port of its own to *target*."""
    return [sipp, f"{target[0]}:{target[1]}",
            "-sf", os.path.join(directory, "uac.xml"), "-inf", os.path.join(directory, "calls.csv"),
            "-i", host, "-t", "u1", "-m", str(calls),
            "-r", f"{rate_per_min:.3f}", "-rp", "60000",
            "-cid_str", cid_format(run_tag, host),
            "-recv_timeout", str(max(1, round(timeout_s * 1000))),
            "-default_behaviors", "none", "-buff_size", str(SOCKET_BUFFER_BYTES),
            "-timer_resol", str(TIMER_RESOLUTION_MS),
            "-trace_logs", "-log_file", os.path.join(directory, "calls.log"),
            "-trace_stat", "-stf", os.path.join(directory, "stats.csv"),
            "-trace_err", "-error_file", os.path.join(directory, "errors.log"),
            "-nostdin"]


def uas_command(sipp: str, directory: str, host: str, port: int) -> list[str]:
    """SIPp answering notices on *host*:*port*."""
    return [sipp, "-sf", os.path.join(directory, "uas.xml"), "-i", host, "-p", str(port),
            "-t", "u1", "-buff_size", str(SOCKET_BUFFER_BYTES),
            "-timer_resol", str(TIMER_RESOLUTION_MS),
            "-trace_err", "-error_file", os.path.join(directory, "uas-errors.log"),
            "-nostdin"]


def port_taken(host: str, port: int) -> bool:
    """Whether a UDP socket is bound at *host*:*port* (ours cannot be)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.bind((host, port))
    except OSError as exc:
        return exc.errno == errno.EADDRINUSE
    finally:
        probe.close()
    return False


@defer.inlineCallbacks
def until_bound(reactor: Any, host: str, port: int, process: "SippProcess",
                limit_s: float = BIND_WAIT_S):
    """Fires once *process* listens on *host*:*port*; fails if it ends or takes too long."""
    waited = 0.0
    while not port_taken(host, port):
        if process.ended.called or waited >= limit_s:
            raise RuntimeError(f"SIPp is not answering on {host}:{port}: "
                               + bytes(process.output[-2000:]).decode("utf-8", "replace"))
        yield task.deferLater(reactor, BIND_POLL_S, lambda: None)
        waited += BIND_POLL_S


class SippProcess(protocol.ProcessProtocol):
    """A SIPp run: ``ended`` fires with its exit code; its output is kept for an error."""

    KEPT_BYTES = 16 * 1024

    def __init__(self) -> None:
        self.ended: defer.Deferred = defer.Deferred()
        self.output = bytearray()
        self.pid: int | None = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def outReceived(self, data: bytes) -> None:
        self.output += data
        del self.output[:-self.KEPT_BYTES]

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        code = getattr(reason.value, "exitCode", None)
        self.ended.callback(code)

    def stop(self, reactor: Any) -> defer.Deferred:
        """SIGTERM (SIGKILL after EXIT_WAIT_S); fires once it has ended."""
        if self.ended.called or self.transport is None:      # ended, or never started
            return defer.succeed(None)
        self.transport.signalProcess("TERM")
        killer = reactor.callLater(EXIT_WAIT_S, self._kill)
        done: defer.Deferred = defer.Deferred()

        def ended(result: Any) -> Any:
            if killer.active():
                killer.cancel()
            done.callback(None)
            return result

        self.ended.addBoth(ended)
        return done

    def _kill(self) -> None:
        try:
            self.transport.signalProcess(signal.SIGKILL)
        except Exception:      # gone meanwhile
            pass

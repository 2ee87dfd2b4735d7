"""``mpay-dmd``: the device side (Sim-DMD) from the command line.

    mpay-dmd enroll +886912345678      # caller-ID enrolment (the simulated modem rings)
    mpay-dmd ticket +886912345678      # get or renew a ticket
    mpay-dmd register +886912345678    # tell the PS where this device is
    mpay-dmd transfer +886912345678 +886987654321 500 [--conceal]
    mpay-dmd listen +886987654321 [--auto-confirm]  # stay registered: notices, charge requests
    mpay-dmd otcn +886912345678 [--cap 5000]   # a one-time credit number for a merchant
    mpay-dmd charge +886223334444 TARGET 1200  # merchant: a fixed amount (number or OTCN)
    mpay-dmd session start +886223334444 TARGET 50 [--seconds 60]  # merchant: 50 per second
    mpay-dmd session stop +886223334444 [CALL-ID]   # end a session started with --detach
    mpay-dmd --transport tls transfer ...      # over TLS (or tcp), checking the server's cert

As a consumer, ``listen`` asks on the terminal whether to pay each charge
request (amount or rate, and the merchant), or pays every one with
``--auto-confirm`` (simulations); without a terminal it declines.

It reads the servers' INI file (``--config``, default etc/mpay.ini when
present) for the domain, the listeners, the AS's identity and its pinned
public key, so against ``make run`` no other option is needed.  The device's
state (K, keys, ticket) lives in ``var/dmd/<number>.json``, mode 0600.  Exit
status 0 means the step succeeded; otherwise the reason is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from twisted.internet import defer, task, threads

from mpay import config as mpay_config
from mpay import e164
from mpay.auth.keyfiles import load_public_key
from mpay.payment import receipt as receipts
from mpay.payment.receipt import RECEIPT_HEADER
from mpay.sim.device import Device, DeviceError, DeviceState
from mpay.sip.dialog import Dialog
from mpay.sip import tls
from mpay.sip.endpoint import SIPEndpoint, SIPTimeout
from mpay.sip.stream import Flow, open_flow
from mpay.sip.transport import UDPListenerService, parse_udp_description
from mpay.timewheel import TimeWheel
from mpay.timewheel_service import TimeWheelService

DEFAULT_CONFIG = "etc/mpay.ini"
STATE_DIR = "var/dmd"


def _address(description: str) -> tuple[str, int]:
    port, interface = parse_udp_description(description)
    return (interface if interface not in ("", "0.0.0.0") else "127.0.0.1", port)


def _public_path(private_path: str) -> str:
    """Where the servers write the public half of a key they create (PATH.pem -> PATH.pub)."""
    return (private_path[:-4] if private_path.endswith(".pem") else private_path) + ".pub"


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return (host or "127.0.0.1", int(port))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mpay-dmd", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help=f"the servers' INI file (default {DEFAULT_CONFIG} if present)")
    parser.add_argument("--as", dest="as_addr", type=_host_port, help="AS address HOST:PORT")
    parser.add_argument("--ps", dest="ps_addr", type=_host_port, help="PS address HOST:PORT")
    parser.add_argument("--as-key", help="the AS's pinned Ed25519 public key file")
    parser.add_argument("--ps-key", help="the PS's pinned Ed25519 public key file (receipts)")
    parser.add_argument("--state", help=f"device state file (default {STATE_DIR}/NUMBER.json)")
    parser.add_argument("--bind", default="127.0.0.1", help="local address to send from")
    parser.add_argument("--transport", choices=("udp", "tcp", "tls"), default="udp",
                        help="how to reach the servers (tcp/tls: their listen_tcp/listen_tls)")
    parser.add_argument("--tls-trust", help="the servers' pinned certificate or their CA (PEM);"
                                            " default: the configured tls.certificate")
    commands = parser.add_subparsers(dest="command", required=True)
    session = commands.add_parser("session", help="merchant: a session charged by time")
    actions = session.add_subparsers(dest="action", required=True)
    start = actions.add_parser("start", help="open a session; ended by --seconds, Ctrl-C or the PS")
    start.add_argument("number", help="the merchant device's telephone number")
    start.add_argument("target", help="the consumer's number or OTCN")
    start.add_argument("rate", type=int, help="minor units per second")
    start.add_argument("--seconds", type=float, help="end it (BYE) after this long")
    start.add_argument("--detach", action="store_true",
                       help="leave it running; `session stop` ends it (the PS's BYE is not seen)")
    stop = actions.add_parser("stop", help="end a session started with --detach")
    stop.add_argument("number", help="the merchant device's telephone number")
    stop.add_argument("call_id", nargs="?", help="which session (default: the only one)")
    for name, text in (("enroll", "prove the number by caller ID and agree K with the AS"),
                       ("ticket", "get (or renew) a ticket for the PS"),
                       ("register", "register this device's location at the PS"),
                       ("transfer", "pay another number (amount in minor units)"),
                       ("listen", "stay registered and print incoming credit notices"),
                       ("otcn", "get a one-time credit number to show a merchant"),
                       ("charge", "merchant: charge a number or an OTCN a fixed amount")):
        command = commands.add_parser(name, help=text)
        command.add_argument("number", help="the device's telephone number")
        if name == "register":
            command.add_argument("--expires", type=int, default=3600, help="seconds; 0 unregisters")
        if name == "transfer":
            command.add_argument("payee", help="the payee's telephone number")
            command.add_argument("amount", type=int, help="minor units, e.g. 500 = 5.00 TWD")
            command.add_argument("--conceal", action="store_true",
                                 help="the payee is not shown who paid (RFC 3323 anonymous)")
        if name == "otcn":
            command.add_argument("--cap", type=int, help="spending cap in minor units")
        if name == "listen":
            command.add_argument("--seconds", type=float, default=60.0, help="how long to listen")
            command.add_argument("--auto-confirm", action="store_true",
                                 help="pay every charge request without asking")
        if name == "charge":
            command.add_argument("target", help="the consumer's number or OTCN")
            command.add_argument("amount", type=int, help="minor units")
    return parser.parse_args(argv)


def _server_address(cfg: mpay_config.Config, role: str, transport: str, given=None):
    """Where *role* is reached over *transport*: the --as/--ps address or its configured listener."""
    if transport == "udp":
        return given or _address(cfg[role]["listen"])
    if given is None:
        description = cfg[role][f"listen_{transport}"]
        if not description:
            raise DeviceError(f"the servers' configuration has no {role}.listen_{transport}")
        port, interface = parse_udp_description(description, transport)
        given = (interface if interface not in ("", "0.0.0.0") else "127.0.0.1", port)
    return Flow(given[0], given[1], transport.upper())


def start_device(reactor, cfg: mpay_config.Config, state: DeviceState, state_path: str | None, *,
                 bind: str = "127.0.0.1", as_addr=None, ps_addr=None, as_key=None, ps_key=None,
                 quiet: bool = False, transport: str = "udp", tls_trust: str | None = None):
    """A running Sim-DMD for the servers *cfg* describes: (device, stop() -> Deferred)."""
    as_key = as_key or _public_path(cfg["as"]["signing_key"])
    ps_key = ps_key or _public_path(cfg["ps"]["signing_key"])
    as_addr = _server_address(cfg, "as", transport, as_addr)
    ps_addr = _server_address(cfg, "ps", transport, ps_addr)

    def ring(number: str, line: str) -> defer.Deferred:
        from mpay.sim.modem import ring_via_control

        if not quiet:
            print(f"placing the call to {line} (simulated modem)")
        return ring_via_control(cfg["callerid"]["sim_control"], number, reactor=reactor)

    timers = TimeWheelService(TimeWheel(tick_s=cfg["timewheel"]["tick_ms"] / 1000.0), reactor=reactor)
    device = Device(state, domain=cfg["server"]["domain"],
                    as_addr=as_addr, ps_addr=ps_addr,
                    as_identity=cfg["as"]["identity"], pinned_as_key=load_public_key(as_key),
                    ring=ring, clock=reactor.seconds, reactor=reactor, state_path=state_path,
                    pinned_ps_key=load_public_key(ps_key) if os.path.exists(ps_key) else None)
    device.endpoint = SIPEndpoint("dmd", device, timers)
    listener = UDPListenerService(f"udp:0:interface={bind}", device.endpoint, reactor=reactor)
    if transport != "udp":
        options = None
        if transport == "tls":
            options = tls.client_options(ps_addr[0], tls_trust or cfg["tls"]["certificate"],
                                         cfg["tls"]["min_version"])
        endpoint = device.endpoint
        endpoint.connector = lambda flow: open_flow(reactor, endpoint, flow.transport, flow, options)
    timers.startService()
    listener.startService()

    @defer.inlineCallbacks
    def stop():
        device.stopping = True
        yield device.endpoint.close_flows()
        yield listener.stopService()
        timers.stopService()

    return device, stop


@defer.inlineCallbacks
def run(reactor, args: argparse.Namespace):
    path = args.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    cfg = mpay_config.load(path)
    number = e164.normalise(args.number, cfg["server"]["default_region"])
    state_path = args.state or os.path.join(STATE_DIR, f"{number}.json")
    if args.command == "enroll":
        state = DeviceState.new(number)
    elif os.path.exists(state_path):
        state = DeviceState.load(state_path)
    else:
        raise DeviceError(f"{state_path}: no such device; run `mpay-dmd enroll {number}` first")
    os.makedirs(os.path.dirname(state_path) or ".", exist_ok=True)
    device, stop = start_device(reactor, cfg, state, state_path, bind=args.bind,
                                as_addr=args.as_addr, ps_addr=args.ps_addr,
                                as_key=args.as_key, ps_key=args.ps_key,
                                transport=args.transport, tls_trust=args.tls_trust)
    as_key = args.as_key or _public_path(cfg["as"]["signing_key"])
    try:
        if args.command == "enroll":
            yield device.enroll()
            print(f"enrolled {number}; K agreed with the AS (signature verified against {as_key})")
            print(f"device state: {state_path}")
        elif args.command == "ticket":
            yield device.get_ticket()
            until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(state.ticket_expires))
            print(f"ticket for {number}, valid until {until}")
        elif args.command == "register":
            response = yield device.register(args.expires)
            print(f"registered {number} at the PS: {response.status} {response.reason}, "
                  f"expires {response.headers.get('Expires')} s")
        elif args.command == "transfer":
            payee = e164.normalise(args.payee, cfg["server"]["default_region"])
            response, receipt = yield device.transfer(payee, args.amount, args.conceal)
            print(f"{response.status} {response.reason}")
            if receipt is not None:
                print(f"receipt (signature verified): journal #{receipt.journal_id}, "
                      f"{receipt.amount} {receipt.currency} from {receipt.payer} to {receipt.payee}")
            print(f"balance: {response.body.decode()}")
        elif args.command == "otcn":
            grant = yield device.request_otcn(args.cap)
            until = time.strftime("%H:%M:%S UTC", time.gmtime(grant["expires_at"]))
            cap = f", cap {grant['cap']}" if grant["cap"] is not None else ""
            print(f"OTCN {grant['display']} (single use, until {until}{cap})")
        elif args.command == "charge":
            response = yield device.charge(_target(args.target, cfg), args.amount)
            print(f"{response.status} {response.reason}")
            _print_receipt(device, response.headers.get(RECEIPT_HEADER))
        elif args.command == "session":
            yield _session(reactor, device, args, cfg, state_path)
        else:
            device.charge_policy = _confirmer(args.auto_confirm)
            device.on_session_end = lambda end: print(
                f"session ended by {'the PS' if end['by'] == 'peer' else 'me'}: charged "
                f"{end['charged']} {end['currency']}", flush=True)
            device.on_notice = lambda notice: print(
                f"received {notice['amount']} {notice['currency']} from {notice['from']} "
                f"(journal #{notice['journal_id']}, receipt verified)", flush=True)
            yield device.register()
            if args.transport != "udp":
                device.stay_registered()   # a lost connection: connect, REGISTER again
            print(f"listening for {args.seconds:.0f} s as {number} ...", flush=True)
            yield task.deferLater(reactor, args.seconds, lambda: None)
            device.stopping = True
            yield device.register(0)
            print(f"{len(device.notices)} notice(s)")
    finally:
        yield stop()


def _target(text: str, cfg: mpay_config.Config) -> str:
    """A consumer's number (normalised) or an OTCN (digits, spaces and dashes dropped)."""
    digits = text.replace(" ", "").replace("-", "")
    if digits.isdigit() and len(digits) == 16:
        return digits
    return e164.normalise(text, cfg["server"]["default_region"])


def _print_receipt(device: Device, header: str | None) -> None:
    if header and device.pinned_ps_key is not None:
        receipt = receipts.verify_receipt(device.pinned_ps_key, header)
        print(f"receipt (signature verified): journal #{receipt.journal_id}, {receipt.amount} "
              f"{receipt.currency} from {receipt.payer} to {receipt.payee}")


def _confirmer(auto: bool):
    """The consumer's answer to a charge request: always yes, or the person at the terminal."""

    def describe(asked: dict) -> str:
        what = (f"{asked['rate']} {asked.get('currency', '')} per second" if "rate" in asked
                else f"{asked.get('amount')} {asked.get('currency', '')}")
        return f"{asked.get('merchant')} asks you to pay {what}"

    def confirm(asked: dict):
        if auto:
            print(f"{describe(asked)}: paying (--auto-confirm)", flush=True)
            return 200
        if not sys.stdin.isatty():
            print(f"{describe(asked)}: declined (no terminal to ask; see --auto-confirm)", flush=True)
            return 603
        answer = threads.deferToThread(input, f"{describe(asked)}. Pay? [y/N] ")
        return answer.addCallback(lambda text: 200 if text.strip().lower() in ("y", "yes") else 603)

    return confirm


def _sessions_path(state_path: str) -> str:
    return (state_path[:-5] if state_path.endswith(".json") else state_path) + ".sessions.json"


@defer.inlineCallbacks
def _session(reactor, device: Device, args: argparse.Namespace, cfg: mpay_config.Config,
             state_path: str):
    """``session start`` runs the session here; ``--detach`` keeps its dialog for ``stop``."""
    path = _sessions_path(state_path)
    saved = json.load(open(path)) if os.path.exists(path) else {}
    if args.action == "stop":
        call_id = args.call_id or (next(iter(saved)) if len(saved) == 1 else None)
        if call_id not in saved:
            raise DeviceError(f"no detached session {args.call_id or ''} in {path}".strip())
        device.sessions[call_id] = Dialog.from_json(saved.pop(call_id))
        end = yield device.end_session(call_id)
        _write_private(path, saved)
        _print_end(end)
        return
    response = yield device.charge(_target(args.target, cfg), rate=args.rate)
    print(f"{response.status} {response.reason}")
    if response.status != 200:
        raise DeviceError(f"session refused: {response.status} {response.reason}")
    call_id = response.call_id
    if args.detach:
        saved[call_id] = device.sessions[call_id].to_json()
        _write_private(path, saved)
        print(f"session {call_id} open at {args.rate} per second; `mpay-dmd session stop "
              f"{args.number} {call_id}` ends it")
        return
    ended: defer.Deferred = defer.Deferred()
    finished: defer.Deferred = defer.Deferred()
    device.on_session_end = lambda end: ended.called or ended.callback(end)
    print(f"session {call_id} open at {args.rate} per second; Ctrl-C ends it", flush=True)
    timer = reactor.callLater(args.seconds, ended.callback, None) if args.seconds else None

    def interrupted():
        """Ctrl-C: the shutdown waits until our BYE is answered."""
        if not ended.called:
            ended.callback(None)
        return finished

    trigger = reactor.addSystemEventTrigger("before", "shutdown", interrupted)
    try:
        end = yield ended
        if timer is not None and timer.active():
            timer.cancel()
        if end is None:       # our decision to stop: BYE
            end = yield device.end_session(call_id)
        _print_end(end)
    finally:
        finished.callback(None)
        reactor.removeSystemEventTrigger(trigger)


def _print_end(end: dict) -> None:
    who = f"the PS ({end['reason']})" if end["by"] == "peer" else "this merchant"
    print(f"session ended by {who}: charged {end['charged']} {end['currency']}")
    receipt = end["receipt"]
    if receipt is not None:
        print(f"receipt (signature verified): journal #{receipt.journal_id}, {receipt.amount} "
              f"{receipt.currency} from {receipt.payer} to {receipt.payee}")


def _write_private(path: str, data: dict) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def go(reactor):
        done = run(reactor, args)

        def failed(failure):
            failure.trap(DeviceError, SIPTimeout, e164.InvalidNumber, mpay_config.ConfigError,
                         OSError, defer.TimeoutError, ValueError, tls.TLSConfigError)
            print(f"mpay-dmd: {failure.getErrorMessage()}", file=sys.stderr)
            raise SystemExit(1)

        return done.addErrback(failed)

    try:
        task.react(go)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

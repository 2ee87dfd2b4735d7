"""``mpay-dmd``: the device side (Sim-DMD) from the command line.

    mpay-dmd enroll +886912345678      # caller-ID enrolment (the simulated modem rings)
    mpay-dmd ticket +886912345678      # get or renew a ticket
    mpay-dmd register +886912345678    # tell the PS where this device is
    mpay-dmd transfer +886912345678 +886987654321 500 [--conceal]
    mpay-dmd listen +886987654321      # stay registered and print incoming notices
    mpay-dmd otcn +886912345678 [--cap 5000]   # a one-time credit number for a merchant

It reads the servers' INI file (``--config``, default etc/mpay.ini when
present) for the domain, the listeners, the AS's identity and its pinned
public key, so against ``make run`` no other option is needed.  The device's
state (K, keys, ticket) lives in ``var/dmd/<number>.json``, mode 0600.  Exit
status 0 means the step succeeded; otherwise the reason is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from twisted.internet import defer, task

from mpay import config as mpay_config
from mpay import e164
from mpay.auth.keyfiles import load_public_key
from mpay.sim.device import Device, DeviceError, DeviceState
from mpay.sip.endpoint import SIPEndpoint, SIPTimeout
from mpay.sip.transport import UDPListenerService, parse_udp_description
from mpay.timewheel import TimeWheel, TimeWheelService

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
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("enroll", "prove the number by caller ID and agree K with the AS"),
                       ("ticket", "get (or renew) a ticket for the PS"),
                       ("register", "register this device's location at the PS"),
                       ("transfer", "pay another number (amount in minor units)"),
                       ("listen", "stay registered and print incoming credit notices"),
                       ("otcn", "get a one-time credit number to show a merchant")):
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
    return parser.parse_args(argv)


def start_device(reactor, cfg: mpay_config.Config, state: DeviceState, state_path: str | None, *,
                 bind: str = "127.0.0.1", as_addr=None, ps_addr=None, as_key=None, ps_key=None,
                 quiet: bool = False):
    """A running Sim-DMD for the servers *cfg* describes: (device, stop() -> Deferred)."""
    as_key = as_key or _public_path(cfg["as"]["signing_key"])
    ps_key = ps_key or _public_path(cfg["ps"]["signing_key"])

    def ring(number: str, line: str) -> defer.Deferred:
        from mpay.sim.modem import ring_via_control

        if not quiet:
            print(f"placing the call to {line} (simulated modem)")
        return ring_via_control(cfg["callerid"]["sim_control"], number, reactor=reactor)

    timers = TimeWheelService(TimeWheel(tick_s=cfg["timewheel"]["tick_ms"] / 1000.0), reactor=reactor)
    device = Device(state, domain=cfg["server"]["domain"],
                    as_addr=as_addr or _address(cfg["as"]["listen"]),
                    ps_addr=ps_addr or _address(cfg["ps"]["listen"]),
                    as_identity=cfg["as"]["identity"], pinned_as_key=load_public_key(as_key),
                    ring=ring, clock=reactor.seconds, reactor=reactor, state_path=state_path,
                    pinned_ps_key=load_public_key(ps_key) if os.path.exists(ps_key) else None)
    device.endpoint = SIPEndpoint("dmd", device, timers)
    listener = UDPListenerService(f"udp:0:interface={bind}", device.endpoint, reactor=reactor)
    timers.startService()
    listener.startService()

    @defer.inlineCallbacks
    def stop():
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
                                as_key=args.as_key, ps_key=args.ps_key)
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
        else:
            device.on_notice = lambda notice: print(
                f"received {notice['amount']} {notice['currency']} from {notice['from']} "
                f"(journal #{notice['journal_id']}, receipt verified)", flush=True)
            yield device.register()
            print(f"listening for {args.seconds:.0f} s as {number} ...", flush=True)
            yield task.deferLater(reactor, args.seconds, lambda: None)
            yield device.register(0)
            print(f"{len(device.notices)} notice(s)")
    finally:
        yield stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def go(reactor):
        done = run(reactor, args)

        def failed(failure):
            failure.trap(DeviceError, SIPTimeout, e164.InvalidNumber, mpay_config.ConfigError,
                         OSError, defer.TimeoutError, ValueError)
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

"""Assembling the authentication server from the configuration.

    as (MultiService)
    |-- sim-modem          only with [callerid] simulate: a pty modem + control socket
    |-- callerid:<line>    one SerialPort receiver per telephone line
    `-- as-sip             UDP listener -> SIPEndpoint -> AuthenticationServer
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.logger import Logger

from mpay import e164
from mpay.auth.callerid import CallerIDReceiverService
from mpay.auth.enrolment import EnrolmentTimers
from mpay.auth.devicekeys import LedgerDeviceKeyStore
from mpay.auth.keyfiles import ensure_keyring, ensure_signing_key
from mpay.auth.ratelimit import SourceRateLimiter
from mpay.auth.server import AuthenticationServer, ReceiverLine
from mpay.auth.verifier import ReplayCache, TicketVerifier
from mpay.config import Config
from mpay.sip.endpoint import SIPEndpoint
from mpay.sip.transport import sip_listener, stream_listeners

log = Logger()


def ticket_verifier(cfg: Config, k_ps: Any) -> TicketVerifier:
    """The one verifier configuration the AS (renewals, ticket requests) and the PS share."""
    tickets = cfg["tickets"]
    skew = tickets["clock_skew_s"]
    cache = ReplayCache(2 * skew + 1, tickets["replay_cache_max_entries"])
    return TicketVerifier(k_ps, tickets["ps_id"], check_source_ip=tickets["check_source_ip"],
                          clock_skew_s=skew, replay_cache=cache)


def k_ps_ring(cfg: Config) -> Any:
    """K_PS: created on first start only when this process is both AS and PS."""
    return ensure_keyring(cfg["tickets"]["k_ps_keys"], create=cfg["server"]["role"] == "all")


def build_as(cfg: Config, timers: Any, settings: Any, reactor: Any,
             ledger: Any) -> tuple[service.MultiService, SIPEndpoint]:
    region = cfg["server"]["default_region"]
    caller_id = cfg["callerid"]
    parent = service.MultiService()
    parent.setName("as")
    lines: list[tuple[str, str]] = []     # (tty device, E.164 number of the line)
    if caller_id["simulate"]:
        from mpay.sim.modem import SimulatedModem, SimulatedModemService

        modem = SimulatedModem(reactor=reactor)
        sim = SimulatedModemService(modem, caller_id["sim_control"], reactor=reactor)
        sim.setName("sim-modem")
        sim.setServiceParent(parent)
        lines.append((modem.slave_path, e164.normalise(caller_id["sim_line"], region)))
        log.warn("as: caller ID is SIMULATED (line {line}, control {control}): not for production",
                 line=lines[-1][1], control=caller_id["sim_control"])
    for device, number in caller_id["lines"]:
        lines.append((device, e164.normalise(number, region)))

    tickets = cfg["tickets"]
    k_ps = k_ps_ring(cfg)
    core = AuthenticationServer(
        domain=cfg["server"]["domain"], identity=cfg["as"]["identity"],
        signing_key=ensure_signing_key(cfg["as"]["signing_key"]), k_ps=k_ps,
        ps_id=tickets["ps_id"], master=ensure_keyring(cfg["as"]["master_keys"]),
        device_keys=LedgerDeviceKeyStore(ledger),
        lines=[ReceiverLine(number, number) for _, number in lines], wheel=timers,
        clock=reactor.seconds, verifier=ticket_verifier(cfg, k_ps),
        ticket_lifetime_s=tickets["lifetime_s"],
        timers=EnrolmentTimers(cfg["as"]["timer_a_s"], cfg["as"]["timer_c_s"],
                               cfg["as"]["timer_d_s"], cfg["as"]["timer_f_s"]),
        limiter=SourceRateLimiter(cfg["as"]["register_rate_per_source_s"],
                                  cfg["as"]["register_burst_per_source"], reactor.seconds,
                                  exempt=cfg["as"]["rate_limit_exempt"]))
    for device, number in lines:
        receiver = CallerIDReceiverService(device, core.caller_id, line_id=number, default_region=region,
                                           init_commands=caller_id["init"].split(),
                                           baudrate=caller_id["baudrate"], reactor=reactor,
                                           timers=timers)
        receiver.setName(f"callerid:{number}")
        receiver.setServiceParent(parent)

    sip = cfg["sip"]
    endpoint, listener = sip_listener("as", cfg["as"]["listen"], core, timers, settings,
                                      sip["max_transactions"], sip["udp_rcvbuf_bytes"], reactor)
    core.endpoint = endpoint
    listener.setServiceParent(parent)
    for stream in stream_listeners("as", endpoint, cfg["as"], cfg["tls"], reactor):
        stream.setServiceParent(parent)
    parent.core, parent.listener = core, listener
    return parent, endpoint

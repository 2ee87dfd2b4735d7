"""``twistd mpay``: options and the service tree.

    mpay (MultiService)
    |-- timewheel         every server timer; started first, stopped last
    |-- ledger            group-commit writer thread + readers (mpay/ledger)
    |-- as                caller-ID receivers + UDP listener -> AuthenticationServer
    |                     (mpay/auth/service.py)
    |-- ps                [redis pool] + UDP listener -> PaymentServer (mpay/payment/service.py)
    |-- overload          reactor lag, UDP receive queue: past them new work gets 503
    |-- metrics           Prometheus page (loopback)
    |-- manhole           SSH (loopback, only when configured)
    `-- workers           --workers N: PS workers 2..N, restarted if they die (mpay/ops/workers.py)
"""

from __future__ import annotations

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from mpay import compiled, config as mpay_config
from mpay.auth.crypto import CryptoError
from mpay.auth.service import build_as
from mpay.e164 import InvalidNumber
from mpay.ledger import LedgerError, LedgerService, store_opener
from mpay.ops import collector
from mpay.ops.manhole import ManholeConfigError, manhole_service
from mpay.ops.metrics import metrics_service
from mpay.ops.workers import worker_settings, workers_service
from mpay.payment.service import build_ps
from mpay.sip.endpoint import SIPEndpoint
from mpay.sip.overload import RESUME_BELOW_LAG_S, LagMonitorService, OverloadGuard
from mpay.sip.timing import TimerSettings
from mpay.sip.tls import TLSConfigError
from mpay.sip.transport import UDPListenerService
from mpay.timewheel import TimeWheel
from mpay.timewheel_service import TimeWheelService

log = Logger()

# Command-line option -> configuration key it overrides.
_OPTION_KEYS = {
    "role": "server.role",
    "as-listen": "as.listen",
    "ps-listen": "ps.listen",
    "metrics-listen": "metrics.listen",
    "manhole-listen": "manhole.listen",
}


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "Runs the mpay authentication and payment servers (etc/mpay.ini documents every key)."
    optParameters = [
        ["config", "c", None, "INI configuration file; without it the embedded defaults apply."],
        ["role", None, None, "as, ps or all: which servers this process runs."],
        ["as-listen", None, None, "AS listener, e.g. udp:5070:interface=127.0.0.1 (port 0: any)."],
        ["ps-listen", None, None, "PS listener, e.g. udp:5060:interface=127.0.0.1 (port 0: any)."],
        ["metrics-listen", None, None, "Metrics page listener, e.g. tcp:9460:interface=127.0.0.1; '' disables."],
        ["manhole-listen", None, None, "SSH manhole listener, e.g. tcp:2222:interface=127.0.0.1."],
        ["workers", None, 1, "PS processes sharing the PS port (SO_REUSEPORT); needs Redis.", int],
    ]

    def __init__(self):
        super().__init__()
        self["set"] = {}
        self.config: mpay_config.Config | None = None
        self.overrides: dict[str, str] = {}
        self.children: list[dict[str, str]] = []   # --workers: the other workers' settings

    def opt_set(self, assignment: str) -> None:
        """section.key=value: override any configuration key (repeatable)."""
        key, sep, value = assignment.partition("=")
        if not sep:
            raise usage.UsageError(f"--set wants section.key=value, not {assignment!r}")
        self["set"][key.strip()] = value

    def postOptions(self) -> None:
        overrides = dict(self["set"])
        for option, key in _OPTION_KEYS.items():
            if self[option] is not None:
                overrides[key] = self[option]
        self.overrides = overrides
        try:
            self.config = mpay_config.load(self["config"], overrides)
            if self["workers"] > 1:
                first, *self.children = worker_settings(self.config, self["workers"])
                self.config = mpay_config.load(self["config"], {**overrides, **first})
        except mpay_config.ConfigError as exc:
            raise usage.UsageError(str(exc)) from exc
        refusal = compiled.refusal()
        if refusal is not None:
            raise usage.UsageError(refusal)


class MpayService(service.MultiService):
    """The root service; its attributes are what the manhole and tests look at."""

    def __init__(self, config: mpay_config.Config, wheel: TimeWheel):
        super().__init__()
        self.config = config
        self.wheel = wheel
        self.endpoints: dict[str, SIPEndpoint] = {}
        self.listeners: dict[str, UDPListenerService] = {}
        self.cores: dict[str, object] = {}


def makeService(options: Options, reactor=None) -> MpayService:
    cfg = options.config
    assert cfg is not None, "postOptions was not run"
    collector.tune(cfg["server"]["gc_threshold"])
    wheel = TimeWheel(tick_s=cfg["timewheel"]["tick_ms"] / 1000.0)
    top = MpayService(cfg, wheel)
    # Servers start timers through the driver: it counts from reactor time, so none fires early.
    timers = TimeWheelService(wheel, reactor=reactor)
    timers.setName("timewheel")
    timers.setServiceParent(top)
    top.timers = timers

    if reactor is None:
        from twisted.internet import reactor
    sip = cfg["sip"]
    settings = TimerSettings(sip["t1_ms"] / 1000.0, sip["t2_ms"] / 1000.0, sip["t4_ms"] / 1000.0)
    # Before the servers, so it stops after them: no request finds the ledger gone.
    try:
        ledger = LedgerService(store_opener(cfg["ledger"]), reactor,
                               commit_delay_s=cfg["ledger"]["commit_delay_ms"] / 1000.0,
                               writer_process=cfg["ledger"]["writer_process"])
    except LedgerError as exc:
        raise usage.UsageError(str(exc)) from exc
    ledger.setServiceParent(top)
    top.ledger = ledger
    role = cfg["server"]["role"]
    builders = {"as": build_as, "ps": build_ps}
    for name, build in builders.items():
        if role not in (name, "all"):
            continue
        try:
            parent, endpoint = build(cfg, timers, settings, reactor, ledger)
        except (CryptoError, InvalidNumber, OSError, TLSConfigError) as exc:
            raise usage.UsageError(f"cannot start the {name.upper()}: {exc}") from exc
        parent.setServiceParent(top)
        top.endpoints[name] = endpoint
        top.listeners[name] = parent.listener
        top.cores[name] = parent.core

    shed_lag_s = sip["shed_lag_ms"] / 1000.0
    if shed_lag_s and top.endpoints:
        # One reactor, one lag: the AS and PS of this process share the guard.
        guard = OverloadGuard(shed_lag_s, min(RESUME_BELOW_LAG_S, shed_lag_s / 2))
        listeners = list(top.listeners.values())
        monitor = LagMonitorService(guard, reactor, sockets=lambda: [
            listener.listening.socket for listener in listeners
            if listener.listening is not None and hasattr(listener.listening, "socket")])
        monitor.setName("overload")
        monitor.setServiceParent(top)
        for endpoint in top.endpoints.values():
            endpoint.layer.guard = guard
        top.overload = guard
    if cfg["metrics"]["listen"]:
        sources = {}
        if "as" in top.cores:
            sources["enrolment"] = top.cores["as"]
        if "ps" in top.cores:
            sources.update(transfer=top.cores["ps"].transfer, charge=top.cores["ps"].charges)
        metrics_service(cfg["metrics"]["listen"], top.endpoints.values(), reactor,
                        outcomes=sources, ledger=ledger).setServiceParent(top)
    manhole = cfg["manhole"]
    if manhole["listen"]:
        namespace = {"mpay": top, "config": cfg, "wheel": wheel, "endpoints": top.endpoints,
                     "cores": top.cores, "ledger": ledger}
        try:
            manhole_service(manhole["listen"], manhole["host_key"], manhole["authorized_keys"],
                            manhole["passwords"], namespace, reactor).setServiceParent(top)
        except ManholeConfigError as exc:
            raise usage.UsageError(str(exc)) from exc
    if options.children:
        workers_service(options["config"], options.overrides, options.children,
                        reactor).setServiceParent(top)
    log.info("mpay: roles {roles}, domain {domain}", roles=sorted(top.endpoints), domain=cfg["server"]["domain"])
    log.info("mpay: compiled modules {modules}", modules=sorted(
        module for module, how in compiled.status().items() if how == "compiled") or "none")
    return top

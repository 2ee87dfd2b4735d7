"""Assembling the payment server from the configuration.

    ps (MultiService)
    |-- redis              only with [location] backend = redis: the pool (locations, OTCNs,
    |                      guess blocking, the shared replay cache)
    |-- ps-signatures      the payer signatures' check, in a child process ([ps] signature_process)
    |-- ps-sip             UDP listener -> SIPEndpoint -> PaymentServer (registrar, transfer, charges)
    |-- ps-relay           only with [ps] relay_listen: frames to and from the other PS instances
    `-- ps-sessions        timed sessions: checkpoints; at start, settles what a crash left open

The ledger service is the tree's, shared with the AS (device keys).
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from mpay.auth.devicekeys import CachedDeviceKeys, LedgerDeviceKeyStore
from mpay.auth.keyfiles import ensure_signing_key
from mpay.auth.service import k_ps_ring, ticket_verifier
from mpay.config import Config
from mpay.ledger.api import LedgerStopped
from mpay.payment.notices import NoticeQueue
from mpay.payment.guard import MemoryGuessGuard, RedisGuessGuard
from mpay.payment.otcn_request import OTCNIssuer
from mpay.payment.receipt import receipt_signer
from mpay.payment.receive import ChargeService
from mpay.payment.registrar import Registrar
from mpay.payment.server import PaymentServer
from mpay.payment.signatures import SignatureChecks, SignatureService
from mpay.payment.transfer import CreditTransfer
from mpay.sip.endpoint import SIPEndpoint
from mpay.sip.peers import PeerRelay
from mpay.sip.transport import RelayListenerService, sip_listener, stream_listeners
from mpay.stores.location import (
    BoundedRedis, MemoryLocationStore, RedisLocationStore, connect_redis,
)
from mpay.stores.otcn import MemoryOTCNStore, RedisOTCNStore
from mpay.stores.replay import RedisReplayCache


class RedisService(service.Service):
    """Owns the txredisapi pool: connects lazily, reconnects, disconnects when the PS stops.

    The stores get ``bounded``: every command fails after REDIS_TIMEOUT_S, so
    a Redis that is away means 503 and Retry-After, not a request left hanging.
    """

    def __init__(self, host: str, port: int, db: int, reactor: Any):
        self.pool = connect_redis(host, port, db)
        self.bounded = BoundedRedis(self.pool, reactor)

    def stopService(self):
        super().stopService()
        return self.pool.disconnect()


class SessionService(service.Service):
    """Timed sessions: checkpoints while running; at start, settle what a crash left open."""

    log = Logger()

    def __init__(self, charges: ChargeService, ledger: Any, adopted: tuple[str, ...] = ()):
        self.charges = charges
        self.ledger = ledger
        self.adopted = adopted
        self.recovered: defer.Deferred | None = None

    def startService(self) -> None:
        super().startService()
        self.charges.start()
        self.recovered = self.ledger.whenOpen().addCallback(
            lambda _: self.charges.sessions.recover(self.adopted))
        self.recovered.addErrback(self._not_recovered)

    def _not_recovered(self, failure: Any) -> None:
        if failure.check(LedgerStopped):   # stopped before the ledger opened: next start
            return
        self.log.failure("ps: open sessions not recovered (they will be at the next start)",
                         failure)

    def stopService(self):
        super().stopService()
        self.charges.stop()


def build_ps(cfg: Config, timers: Any, settings: Any, reactor: Any,
             ledger: Any) -> tuple[service.MultiService, SIPEndpoint]:
    parent = service.MultiService()
    parent.setName("ps")
    signatures = SignatureChecks(reactor, use_child=cfg["ps"]["signature_process"])
    checker = SignatureService(signatures)    # first: it stops after the listeners
    checker.setName("ps-signatures")
    checker.setServiceParent(parent)
    location = cfg["location"]
    limits = {"limit": cfg["guard"]["limit"], "window_s": cfg["guard"]["window_s"],
              "block_s": cfg["guard"]["block_s"]}
    if location["backend"] == "redis":
        redis = RedisService(location["redis_host"], location["redis_port"], location["redis_db"],
                             reactor)
        redis.setName("redis")
        redis.setServiceParent(parent)
        locations: Any = RedisLocationStore(redis.bounded, location["redis_prefix"], reactor)
        otcns: Any = RedisOTCNStore(redis.bounded, location["redis_prefix"], now=reactor.seconds)
        guard: Any = RedisGuessGuard(redis.bounded, location["redis_prefix"], **limits)
    else:
        locations = MemoryLocationStore(timers)
        otcns = MemoryOTCNStore(timers, reactor.seconds)
        guard = MemoryGuessGuard(timers, reactor.seconds, **limits)
    registrar = Registrar(ticket_verifier(cfg, k_ps_ring(cfg)), locations, reactor.seconds)
    if location["backend"] == "redis":   # any PS process may see a copy of any request
        registrar.shared_replay = RedisReplayCache(redis.bounded, location["redis_prefix"],
                                                   registrar.verifier.replay_cache.retention_s)
    ps_key = ensure_signing_key(cfg["ps"]["signing_key"])
    transfer = CreditTransfer(
        authenticate=registrar.authenticate, ledger=ledger, device_keys=CachedDeviceKeys(LedgerDeviceKeyStore(ledger), reactor.seconds),
        locations=locations, notices=NoticeQueue(ledger),
        receipt_signer=receipt_signer(reactor, ps_key),
        currency=cfg["ledger"]["currency"], domain=cfg["server"]["domain"],
        default_region=cfg["server"]["default_region"], timers=timers,
        timer_a_s=cfg["ps"]["transfer_timer_a_s"], signatures=signatures)
    charges = ChargeService(
        authenticate=registrar.authenticate, ledger=ledger, locations=locations, otcns=otcns,
        guard=guard, ps_key=ps_key, currency=cfg["ledger"]["currency"], domain=cfg["server"]["domain"],
        timers=timers, clock=reactor.seconds, timer_a_s=cfg["ps"]["charge_timer_a_s"],
        owner=cfg["ps"]["instance_id"], checkpoint_s=cfg["ps"]["checkpoint_s"])
    core = PaymentServer(registrar, transfer,
                         OTCNIssuer(registrar.authenticate, otcns, cfg["otcn"]["lifetime_s"]), charges,
                         require_tls=cfg["ps"]["require_tls"])
    sip = cfg["sip"]
    endpoint, listener = sip_listener("ps", cfg["ps"]["listen"], core, timers, settings,
                                      sip["max_transactions"], sip["udp_rcvbuf_bytes"], reactor,
                                      reuse_port=cfg["ps"]["reuse_port"])
    transfer.endpoint = charges.endpoint = registrar.endpoint = endpoint
    listener.setServiceParent(parent)
    if cfg["ps"]["relay_listen"]:
        relay = PeerRelay(cfg["ps"]["instance_id"], cfg["ps"]["peers"], endpoint)
        endpoint.join_peers(relay)
        relaying = RelayListenerService(cfg["ps"]["relay_listen"], relay, reactor)
        relaying.setName("ps-relay")
        relaying.setServiceParent(parent)
    for stream in stream_listeners("ps", endpoint, cfg["ps"], cfg["tls"], reactor):
        stream.setServiceParent(parent)
    sessions = SessionService(charges, ledger, tuple(cfg["ps"]["adopt_sessions"]))
    sessions.setName("ps-sessions")
    sessions.setServiceParent(parent)  # after the listener: recovery sends BYEs
    parent.core, parent.listener, parent.locations, parent.otcns = core, listener, locations, otcns
    return parent, endpoint

"""The Prometheus metrics page (text format, loopback by default).

The SIP path counts into plain Counters; this collector turns them into
metric families only when Prometheus scrapes, so observing the system costs
the hot path nothing but a dictionary increment.
"""

from __future__ import annotations

from typing import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.twisted import MetricsResource
from twisted.application import service, strports
from twisted.web.resource import Resource
from twisted.web.server import Site

from mpay.sip.endpoint import SIPEndpoint


class SIPCollector:
    """Exposes the request, response, parse-error and transaction figures of every endpoint."""

    def __init__(self, endpoints: Iterable[SIPEndpoint]):
        self.endpoints = list(endpoints)

    def collect(self):
        requests = CounterMetricFamily("mpay_sip_requests", "SIP requests received, retransmissions included",
                                       labels=["role", "method"])
        responses = CounterMetricFamily("mpay_sip_responses", "SIP responses sent by server transactions",
                                        labels=["role", "method", "status"])
        errors = CounterMetricFamily("mpay_sip_parse_errors", "Malformed messages, answered (400) or dropped",
                                     labels=["role", "action"])
        absorbed = CounterMetricFamily("mpay_sip_retransmissions_absorbed",
                                       "Retransmitted requests answered by their transaction",
                                       labels=["role"])
        overload = CounterMetricFamily("mpay_sip_overload_refusals",
                                       "Requests refused with 503 because the transaction table was full",
                                       labels=["role"])
        transactions = GaugeMetricFamily("mpay_sip_transactions", "Live SIP transactions",
                                         labels=["role", "kind"])
        for endpoint in self.endpoints:
            role = endpoint.role
            for method, count in endpoint.requests.items():
                requests.add_metric([role, method], count)
            for (method, status), count in endpoint.responses.items():
                responses.add_metric([role, method, str(status)], count)
            for action, count in endpoint.parse_errors.items():
                errors.add_metric([role, action], count)
            stats = endpoint.layer.stats
            absorbed.add_metric([role], stats["retransmissions_absorbed"])
            overload.add_metric([role], stats["overload_refusals"])
            for kind, count in endpoint.layer.counts().items():
                transactions.add_metric([role, kind], count)
        yield from (requests, responses, errors, absorbed, overload, transactions)


class OutcomeCollector:
    """How enrolments, transfers and charges ended (by reason phrase), and the ledger's queue.

    *sources* maps a service name to an object with an ``outcomes`` dict
    (reason -> count), kept by the AS and PS cores; reasons are a closed set of
    the code's own phrases, so the label cardinality is bounded.
    """

    def __init__(self, sources: dict[str, object], ledger: object | None = None):
        self.sources = sources
        self.ledger = ledger

    def collect(self):
        outcomes = CounterMetricFamily("mpay_outcomes", "How each service's requests ended",
                                       labels=["service", "outcome"])
        for name, source in self.sources.items():
            for outcome, count in getattr(source, "outcomes", {}).items():
                outcomes.add_metric([name, outcome], count)
        yield outcomes
        checks = getattr(self.sources.get("transfer"), "signatures", None)
        if checks is not None:
            where = CounterMetricFamily("mpay_payer_signature_checks",
                                        "Payer signatures checked, by where (the signature "
                                        "process, or the PS while it was not running)",
                                        labels=["where"])
            where.add_metric(["process"], checks.in_child)
            where.add_metric(["ps"], checks.inline)
            restarts = CounterMetricFamily("mpay_signature_process_restarts",
                                           "Times the signature process stopped and was started again")
            restarts.add_metric([], checks.restarts)
            yield from (where, restarts)
        signer = getattr(self.sources.get("transfer"), "receipt_signer", None)
        if signer is not None:
            signed = CounterMetricFamily("mpay_receipts_signed", "Transfer receipts signed")
            signed.add_metric([], signer.receipts)
            signatures = CounterMetricFamily(
                "mpay_receipt_signatures",
                "PS signatures made for transfer receipts (one per group of a turn)")
            signatures.add_metric([], signer.groups)
            yield from (signed, signatures)
        if self.ledger is not None:
            stats = self.ledger.stats()
            pending = GaugeMetricFamily("mpay_ledger_pending", "Operations queued for the ledger writer")
            pending.add_metric([], stats["pending"])
            batches = CounterMetricFamily("mpay_ledger_batches", "Group commits")
            batches.add_metric([], stats["batches"])
            operations = CounterMetricFamily("mpay_ledger_operations", "Operations committed or refused")
            operations.add_metric([], stats["operations"])
            redos = CounterMetricFamily(
                "mpay_ledger_careful_redos",
                "Group commits whose run of transfers found the database other than it read it")
            redos.add_metric([], stats["careful_redos"])
            restarts = CounterMetricFamily(
                "mpay_ledger_writer_restarts",
                "Times the ledger writer process stopped and was started again")
            restarts.add_metric([], stats["writer_restarts"])
            yield from (pending, batches, operations, redos, restarts)


def metrics_service(listen: str, endpoints: Iterable[SIPEndpoint], reactor=None,
                    outcomes: dict[str, object] | None = None, ledger: object | None = None) -> service.Service:
    """A web listener serving /metrics from a registry of its own (no global state)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SIPCollector(endpoints))
    registry.register(OutcomeCollector(outcomes or {}, ledger))
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=registry))
    svc = strports.service(listen, Site(root), reactor=reactor)
    svc.setName("metrics")
    svc.registry = registry
    return svc

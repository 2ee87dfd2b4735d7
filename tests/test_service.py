"""The service tree as twistd builds it, on real loopback sockets."""

from twisted.application.service import IServiceMaker
from twisted.internet import defer, protocol, reactor
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial import unittest
from twisted.web.client import Agent, readBody

import tap
from mpay.sip.message import parse

from tests.support import request_bytes

LOOPBACK_ARGS = [
    "--as-listen", "udp:0:interface=127.0.0.1",
    "--ps-listen", "udp:0:interface=127.0.0.1",
    "--metrics-listen", "tcp:0:interface=127.0.0.1",
    "--set", "callerid.simulate=false",
]


class SIPClient(protocol.DatagramProtocol):
    """Sends datagrams and hands each reply to whoever waits for the next one."""

    def __init__(self):
        self.waiting: list[defer.Deferred] = []
        self.replies: list[bytes] = []

    def datagramReceived(self, data, addr):
        self.replies.append(data)
        if self.waiting:
            self.waiting.pop(0).callback(parse(data))

    def ask(self, data: bytes, port: int) -> defer.Deferred:
        waiter = defer.Deferred()
        waiter.addTimeout(5, reactor)
        self.waiting.append(waiter)
        self.transport.write(data, ("127.0.0.1", port))
        return waiter


def listening_port(svc) -> defer.Deferred:
    """The port of an endpoint service, without consuming the service's own Deferred."""
    result = defer.Deferred()

    def got(port):
        result.callback(port)
        return port

    svc._waitingForPort.addCallback(got)
    return result


def build(args=()):
    options = tap.Options()
    options.parseOptions(list(LOOPBACK_ARGS) + list(args))
    return tap.makeService(options)


class ServiceTreeTests(unittest.TestCase):
    def test_twistd_finds_the_mpay_plugin(self):
        names = [maker.tapname for maker in getPlugins(IServiceMaker)]
        self.assertIn("mpay", names)

    def test_roles_select_the_servers(self):
        self.assertEqual(sorted(build().endpoints), ["as", "ps"])
        self.assertEqual(sorted(build(["--role", "ps"]).endpoints), ["ps"])
        self.assertEqual(sorted(build(["--role", "as"]).endpoints), ["as"])

    def test_manhole_without_credentials_is_refused(self):
        self.assertRaises(usage.UsageError, build, ["--manhole-listen", "tcp:0:interface=127.0.0.1"])

    @defer.inlineCallbacks
    def test_both_servers_answer_options_over_udp_and_metrics_count_it(self):
        top = build()
        top.startService()
        self.addCleanup(top.stopService)
        client = SIPClient()
        port = reactor.listenUDP(0, client, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        me = f"127.0.0.1:{port.getHost().port}"

        for role in ("as", "ps"):
            response = yield client.ask(request_bytes("OPTIONS", via_host=me, branch=f"z9hG4bK-{role}"),
                                        top.listeners[role].port)
            self.assertEqual(response.status, 200)
            self.assertIn("OPTIONS", response.headers.getall("Allow"))
        again = yield client.ask(request_bytes("OPTIONS", via_host=me, branch="z9hG4bK-ps"),
                                 top.listeners["ps"].port)
        self.assertEqual(again.headers.get("To"), response.headers.get("To"), "answered from the transaction")

        # The PS's start-up recovery is a ledger write: once it is done, nothing is queued.
        yield top.getServiceNamed("ps").getServiceNamed("ps-sessions").recovered
        metrics = top.getServiceNamed("metrics")
        listening = yield listening_port(metrics)
        url = f"http://127.0.0.1:{listening.getHost().port}/metrics".encode()
        body = yield readBody((yield Agent(reactor).request(b"GET", url)))
        text = body.decode()
        self.assertIn('mpay_sip_requests_total{method="OPTIONS",role="ps"} 2.0', text)
        self.assertIn('mpay_sip_responses_total{method="OPTIONS",role="ps",status="200"} 1.0', text)
        self.assertIn('mpay_sip_retransmissions_absorbed_total{role="ps"} 1.0', text)
        self.assertIn('mpay_payer_signature_checks_total{where="process"} 0.0', text)
        self.assertIn('mpay_signature_process_restarts_total 0.0', text)
        self.assertIn('mpay_receipts_signed_total 0.0', text)
        self.assertIn('mpay_receipt_signatures_total 0.0', text)
        self.assertIn("mpay_ledger_pending 0.0", text)
        self.assertIn("# TYPE mpay_outcomes_total counter", text)

    def test_udp_receive_buffer_is_raised(self):
        top = build()
        top.startService()
        self.addCleanup(top.stopService)
        import socket

        sock = top.listeners["ps"].listening.socket
        # Linux reports double what was granted; at least the 1 MiB asked for.
        self.assertGreaterEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), 1 << 20)

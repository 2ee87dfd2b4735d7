"""SIP over TCP and TLS: framing, keep-alives, limits, bad input, certificates (issue 9).

``StreamFramer`` is tested sans-IO (and fuzzed: any split of a valid stream
gives the same messages; any bytes give messages or a FramingError, within
bounded memory).  The rest runs a real endpoint on loopback TCP and TLS
listeners and talks to it with raw clients: pipelined requests, a half
message, a short body, a 10 MB header, a certificate the client does not
trust, more connections than allowed.  Every test ends with no connection
left at the server (counted).
"""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, endpoints, protocol, reactor, ssl, task
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mpay.sip import tls
from mpay.sip.endpoint import SIPEndpoint
from mpay.sip.message import parse
from mpay.sip.stream import (
    MAX_STREAM_HEADER_BYTES, FramingError, SIPStreamProtocol, StreamFramer,
    StreamListenerService, open_flow,
)
from mpay.timewheel import TimeWheel
from mpay.timewheel_service import TimeWheelService

PIPELINED = 1_000
WAIT_TRIES, WAIT_EVERY_S = 200, 0.02


def options(cseq: int, body: bytes = b"", length: int | None = None,
            extra: str = "") -> bytes:
    return (f"OPTIONS sip:ps@127.0.0.1 SIP/2.0\r\n"
            f"Via: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bK-{cseq}-stream\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:t@x>;tag=t{cseq}\r\nTo: <sip:ps@x>\r\n"
            f"Call-ID: stream-{cseq}@x\r\nCSeq: {cseq} OPTIONS\r\n{extra}"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n").encode() + body


class FramerTests(unittest.TestCase):
    def test_messages_cut_by_content_length_whatever_the_chunks(self):
        stream = options(1, b"hello") + options(2) + options(3, b"x" * 300)
        framer = StreamFramer()
        messages = []
        for index in range(len(stream)):      # one byte at a time
            messages += framer.feed(stream[index:index + 1])[0]
        self.assertEqual(messages, [options(1, b"hello"), options(2), options(3, b"x" * 300)])
        self.assertEqual(framer.buffered, 0)

    def test_keepalive_pings_are_counted_and_pongs_ignored(self):
        framer = StreamFramer()
        self.assertEqual(framer.feed(b"\r\n\r\n\r\n\r\n"), ([], 2))
        self.assertEqual(framer.feed(b"\r\n"), ([], 0))          # a pong, or half a ping
        self.assertEqual(framer.feed(b"\r\n" + options(4)), ([options(4)], 0))

    def test_compact_content_length(self):
        message = options(5, b"abc").replace(b"Content-Length:", b"l :")
        self.assertEqual(StreamFramer().feed(message), ([message], 0))

    def test_a_message_without_content_length_breaks_the_stream(self):
        message = options(6).replace(b"Content-Length: 0\r\n", b"")
        with self.assertRaisesRegex(FramingError, "exactly one Content-Length"):
            StreamFramer().feed(message)

    def test_conflicting_content_lengths_break_the_stream(self):
        with self.assertRaisesRegex(FramingError, "conflicting"):
            StreamFramer().feed(options(7, extra="Content-Length: 3\r\n"))

    def test_a_body_over_the_limit_is_refused_before_it_arrives(self):
        with self.assertRaisesRegex(FramingError, "exceeds"):
            StreamFramer(max_body_bytes=100).feed(options(8, length=101))

    def test_headers_over_the_limit_are_refused_without_waiting_for_their_end(self):
        framer = StreamFramer()
        framer.feed(b"OPTIONS sip:x SIP/2.0\r\n" + b"X: " + b"a" * (MAX_STREAM_HEADER_BYTES - 100))
        with self.assertRaisesRegex(FramingError, "no end of headers"):
            framer.feed(b"a" * 200)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(max_size=40), min_size=1, max_size=5), st.data())
    def test_any_split_gives_the_same_messages(self, bodies, data):
        messages = [options(index, body) for index, body in enumerate(bodies)]
        stream = b"\r\n\r\n".join(messages)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
        framer, seen = StreamFramer(), []
        for start, end in zip([0, *cuts], [*cuts, len(stream)]):
            seen += framer.feed(stream[start:end])[0]
        self.assertEqual(seen, messages)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.binary(max_size=3000), max_size=8))
    def test_any_bytes_give_messages_or_a_framing_error_in_bounded_memory(self, chunks):
        framer = StreamFramer(max_header_bytes=2048, max_body_bytes=2048)
        try:
            for chunk in chunks:
                framer.feed(chunk)
                self.assertLessEqual(framer.buffered, 2048 + 4 + 2048 + 3000)
        except FramingError:
            pass


class _FakeTimers:
    def __init__(self):
        self.pending = []

    def start(self, delay_s, callback, *args):
        call = [delay_s, callback, args, False]
        self.pending.append(call)

        class Handle:
            def cancel(self_):
                call[3] = True
        return Handle()

    def fire_all(self):
        due, self.pending = self.pending, []
        for _, callback, args, cancelled in due:
            if not cancelled:
                callback(*args)


class IdleTimeoutTests(unittest.TestCase):
    def test_an_idle_connection_is_closed_and_an_active_one_kept(self):
        timers = _FakeTimers()
        endpoint = SIPEndpoint("ps", type("Core", (), {"handlers": {}})(), timers)
        proto = SIPStreamProtocol(endpoint, "TCP", idle_timeout_s=10)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.assertEqual(len(endpoint.flows), 1)
        proto.dataReceived(b"\r\n\r\n")          # a ping: activity, and a pong back
        self.assertEqual(transport.value(), b"\r\n")
        timers.fire_all()
        self.assertFalse(transport.disconnecting, "active during the period: kept")
        timers.fire_all()
        self.assertTrue(transport.disconnecting, "a whole period idle: closed")
        proto.connectionLost(None)
        self.assertEqual(endpoint.flows, {})


class _Client(protocol.Protocol):
    """A raw stream client: collects framed responses."""

    def __init__(self):
        self.framer = StreamFramer()
        self.responses = []
        self.raw = b""
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        self.raw += data
        self.responses += [parse(message) for message in self.framer.feed(data)[0]]

    def connectionLost(self, reason):
        self.lost.callback(None)


class StreamListenerTests(unittest.TestCase):
    transport = "TCP"

    @defer.inlineCallbacks
    def setUp(self):
        directory = self.mktemp()
        os.makedirs(directory)
        self.cert = os.path.join(directory, "server.crt")
        self.tls_cfg = {"certificate": self.cert, "private_key": os.path.join(directory, "key"),
                        "min_version": "1.2", "self_signed": True, "names": ["127.0.0.1"]}
        wheel = TimeWheelService(TimeWheel(tick_s=0.05))
        wheel.startService()
        self.addCleanup(wheel.stopService)
        self.endpoint = SIPEndpoint("ps", type("Core", (), {"handlers": {}})(), wheel)
        if self.transport == "TCP":
            server = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        else:
            server = endpoints.SSL4ServerEndpoint(reactor, 0, tls.server_options(self.tls_cfg),
                                                  interface="127.0.0.1")
        self.listener = StreamListenerService(server, self.endpoint, self.transport, "test")
        self.listener.startService()
        yield self.listener._listened
        self.addCleanup(self.no_connection_left)
        self.addCleanup(self.listener.stopService)

    def no_connection_left(self):
        self.assertEqual(self.endpoint.flows, {}, "a connection leaked")

    @defer.inlineCallbacks
    def eventually(self, predicate, what):
        for _ in range(WAIT_TRIES):
            if predicate():
                return
            yield task.deferLater(reactor, WAIT_EVERY_S, lambda: None)
        self.fail(what)

    def client_endpoint(self, trust=None):
        port = self.listener.port
        if self.transport == "TCP":
            return endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        return endpoints.SSL4ClientEndpoint(reactor, "127.0.0.1", port,
                                            tls.client_options("127.0.0.1", trust or self.cert))

    @defer.inlineCallbacks
    def connect(self):
        client = yield endpoints.connectProtocol(self.client_endpoint(), _Client())
        self.addCleanup(lambda: client.lost if client.lost.called else
                        (client.transport.abortConnection(), client.lost)[1])
        return client

    @defer.inlineCallbacks
    def test_pipelined_requests_are_answered_in_order(self):
        client = yield self.connect()
        client.transport.write(b"".join(options(cseq) for cseq in range(1, PIPELINED + 1)))
        yield self.eventually(lambda: len(client.responses) >= PIPELINED, "not every answer came")
        self.assertEqual([(r.status, r.cseq[0]) for r in client.responses],
                         [(200, cseq) for cseq in range(1, PIPELINED + 1)])
        self.assertEqual(self.endpoint.requests["OPTIONS"], PIPELINED)
        self.assertEqual(client.responses[0].top_via.transport, "TCP")

    @defer.inlineCallbacks
    def test_a_keepalive_ping_gets_a_pong(self):
        client = yield self.connect()
        client.transport.write(b"\r\n\r\n")
        yield self.eventually(lambda: client.raw == b"\r\n", "no pong")

    @defer.inlineCallbacks
    def test_half_a_message_then_disconnect_leaves_nothing(self):
        client = yield self.connect()
        yield self.eventually(lambda: len(self.endpoint.flows) == 1, "never connected")
        client.transport.write(options(1)[:60])
        client.transport.loseConnection()
        yield client.lost
        yield self.eventually(lambda: not self.endpoint.flows, "the server kept the connection")
        self.assertEqual(sum(self.endpoint.requests.values()), 0)

    @defer.inlineCallbacks
    def test_a_content_length_longer_than_what_follows_is_never_processed(self):
        client = yield self.connect()
        client.transport.write(options(2, b"short", length=500))
        yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(sum(self.endpoint.requests.values()), 0, "a half body was processed")
        client.transport.loseConnection()
        yield client.lost
        yield self.eventually(lambda: not self.endpoint.flows, "the server kept the connection")

    @defer.inlineCallbacks
    def test_a_ten_megabyte_header_is_refused_and_the_connection_closed(self):
        client = yield self.connect()
        client.transport.write(b"OPTIONS sip:ps@x SIP/2.0\r\nX-Junk: " + b"a" * (10 * 1024 * 1024))
        yield client.lost       # the server closed it
        self.assertEqual(self.endpoint.stream_errors["header_too_large"], 1)
        yield self.eventually(lambda: not self.endpoint.flows, "the server kept the connection")

    @defer.inlineCallbacks
    def test_a_message_without_content_length_closes_the_connection(self):
        client = yield self.connect()
        client.transport.write(options(3).replace(b"Content-Length: 0\r\n", b""))
        yield client.lost
        self.assertEqual(client.responses, [])
        self.assertEqual(self.endpoint.stream_errors["no_content_length"], 1)

    @defer.inlineCallbacks
    def test_connections_past_the_limit_are_closed_at_once(self):
        self.endpoint.max_flows = 2
        clients = []
        for _ in range(2):
            clients.append((yield self.connect()))
        yield self.eventually(lambda: len(self.endpoint.flows) == 2, "never connected")
        third = yield self.connect()
        yield third.lost
        self.assertEqual(len(self.endpoint.flows), 2)


class TLSListenerTests(StreamListenerTests):
    transport = "TLS"

    @defer.inlineCallbacks
    def test_tls_is_at_least_1_2_and_the_certificate_checked(self):
        client = yield self.connect()
        client.transport.write(options(9))
        yield self.eventually(lambda: client.responses, "no answer over TLS")
        version = client.transport.getHandle().get_protocol_version_name()
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))

    @defer.inlineCallbacks
    def test_a_server_certificate_the_device_does_not_trust_is_refused(self):
        other = os.path.join(self.mktemp() + "-other")
        os.makedirs(other)
        tls.make_self_signed(os.path.join(other, "c.pem"), os.path.join(other, "k.pem"),
                             ["127.0.0.1"])
        device = SIPEndpoint("dmd", type("Core", (), {"handlers": {}})(), _FakeTimers())
        opened = open_flow(reactor, device, "TLS", ("127.0.0.1", self.listener.port),
                           tls.client_options("127.0.0.1", os.path.join(other, "c.pem")))
        error = yield self.assertFailure(opened, ssl.SSL.Error)
        self.assertIn("certificate verify failed", repr(error))
        self.assertEqual(device.flows, {})
        yield self.eventually(lambda: not self.endpoint.flows, "the server kept the connection")

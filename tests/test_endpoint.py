"""The common receive path of the AS and PS: what every input gets back."""

import errno

from twisted.internet.error import InvalidAddressError
from twisted.trial import unittest

from mpay.sip.endpoint import SIPEndpoint
from mpay.sip.message import Request
from mpay.sip.transport import checked_writer

from tests.support import ClockWheel, Wire, request_bytes

SOURCE = ("198.51.100.7", 5061)


class Core:
    def __init__(self):
        self.seen = []
        self.acks = []
        self.handlers = {"MESSAGE": self.message, "BYE": self.explode}

    def message(self, txn, request):
        self.seen.append(request)
        txn.respond_with(200)

    def explode(self, txn, request):
        raise RuntimeError("handler bug")

    def ack_received(self, request, addr):
        self.acks.append(request)


class EndpointTests(unittest.TestCase):
    def setUp(self):
        self.time = ClockWheel(self)
        self.core = Core()
        self.endpoint = SIPEndpoint("ps", self.core, self.time.wheel)
        self.wire = Wire()
        self.endpoint.write = self.wire

    def feed(self, data: bytes, source=SOURCE):
        self.endpoint.datagram_received(data, source)
        return self.wire.messages()

    def test_options_ping_gets_200_with_allow(self):
        (response,) = self.feed(request_bytes("OPTIONS"))
        self.assertEqual(response.status, 200)
        allow = set(response.headers.getall("Allow"))
        self.assertEqual(allow, {"ACK", "BYE", "CANCEL", "MESSAGE", "OPTIONS"})
        self.assertEqual(response.call_id, "call-1@198.51.100.7")
        self.assertIn(";tag=", response.headers.get("To"))
        self.assertEqual(self.wire.sent[0][1], SOURCE, "routed back by Via sent-by")

    def test_unknown_method_is_501_and_known_unserved_method_405(self):
        (unknown,) = self.feed(request_bytes("FROBNICATE"))
        self.wire.clear()
        (unserved,) = self.feed(request_bytes("SUBSCRIBE", branch="z9hG4bK-2"))
        self.assertEqual((unknown.status, unserved.status), (501, 405))
        self.assertIn("MESSAGE", unserved.headers.getall("Allow"))
        self.assertEqual(self.endpoint.requests["other"], 1, "unknown methods share one label")

    def test_unsupported_require_is_420_naming_the_option(self):
        (response,) = self.feed(request_bytes("MESSAGE", extra="Require: 100rel, foo\r\n"))
        self.assertEqual(response.status, 420)
        self.assertEqual(response.headers.getall("Unsupported"), ["100rel", "foo"])
        self.assertEqual(self.core.seen, [])

    def test_malformed_but_addressable_request_gets_400_with_reason(self):
        data = request_bytes("MESSAGE", extra="", body=b"hi").replace(b"Content-Length: 2", b"Content-Length: 99")
        (response,) = self.feed(data)
        self.assertEqual(response.status, 400)
        self.assertTrue(response.reason)
        self.assertEqual(self.endpoint.parse_errors["answered"], 1)

    def test_unaddressable_garbage_is_dropped_and_counted(self):
        for junk in (b"", b"\x00\xff" * 50, b"HELLO\r\n\r\n", b"SIP/2.0 200 OK\r\n\r\n",
                     request_bytes("MESSAGE").replace(b"Via:", b"Xia:")):
            self.feed(junk)
        self.assertEqual(self.wire.sent, [])
        self.assertEqual(self.endpoint.parse_errors["dropped"], 5)

    def test_handler_bug_is_500_and_logged_not_raised(self):
        (response,) = self.feed(request_bytes("BYE"))
        self.assertEqual(response.status, 500)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_request_is_processed_once_across_retransmissions(self):
        for _ in range(3):
            self.feed(request_bytes("MESSAGE"))
        self.assertEqual(len(self.core.seen), 1)
        self.assertEqual(self.wire.statuses(), [200, 200, 200])
        self.assertEqual(self.endpoint.requests["MESSAGE"], 3)
        self.assertEqual(self.endpoint.responses[("MESSAGE", 200)], 1)

    def test_nat_source_gets_received_and_rport(self):
        data = request_bytes("OPTIONS", via_host="10.0.0.5:5060", via_params=";rport")
        (response,) = self.feed(data, source=("203.0.113.50", 40000))
        self.assertEqual(self.wire.sent[0][1], ("203.0.113.50", 40000))
        via = response.top_via
        self.assertEqual(via.received, "203.0.113.50")
        self.assertEqual(via.rport, "40000")

    def test_received_without_rport_goes_to_the_via_port(self):
        self.feed(request_bytes("OPTIONS", via_host="10.0.0.5:5070"), source=("203.0.113.50", 40000))
        self.assertEqual(self.wire.sent[0][1], ("203.0.113.50", 5070))

    def test_ack_is_never_answered(self):
        self.feed(request_bytes("ACK", branch="z9hG4bK-ack"))
        self.assertEqual(self.wire.sent, [])
        self.assertEqual(len(self.core.acks), 1)
        self.assertIsInstance(self.core.acks[0], Request)

    def test_send_error_is_counted_not_raised(self):
        def refuse(data, addr):
            raise ConnectionRefusedError(111, "Connection refused")

        self.endpoint.write = refuse
        self.endpoint.datagram_received(request_bytes("OPTIONS"), SOURCE)
        self.assertEqual(self.endpoint.send_errors, 1)


class CheckedWriterTests(unittest.TestCase):
    """The UDP sender checks a destination's address once, then uses sendto directly."""

    class Port:
        def __init__(self):
            self.sent: list[tuple[str, bytes, tuple]] = []
            self.socket = self
            self.connected = True
            self.fail: OSError | None = None

        def write(self, data, addr):
            if not addr[0][0].isdigit():
                raise InvalidAddressError(addr[0], "not an IP address")
            self.sent.append(("write", data, addr))

        def sendto(self, data, addr):
            if self.fail is not None:
                raise self.fail
            self.sent.append(("sendto", data, addr))

    def test_first_datagram_is_checked_then_sent_directly(self):
        port = self.Port()
        send = checked_writer(port)
        send(b"a", ("127.0.0.1", 5060))
        send(b"b", ("127.0.0.1", 5061))
        self.assertEqual([how for how, _, _ in port.sent], ["write", "sendto"])

    def test_a_name_is_refused_every_time(self):
        send = checked_writer(self.Port())
        for _ in range(2):
            self.assertRaises(InvalidAddressError, send, b"a", ("ps.example", 5060))

    def test_errors_as_twisted_handles_them(self):
        port = self.Port()
        send = checked_writer(port)
        send(b"a", ("127.0.0.1", 5060))
        port.fail = OSError(errno.ECONNREFUSED, "refused")
        send(b"b", ("127.0.0.1", 5060))                      # dropped, as Twisted does
        port.fail = OSError(errno.EMSGSIZE, "too long")
        send(b"c", ("127.0.0.1", 5060))                      # Twisted's write decides
        self.assertEqual([how for how, _, _ in port.sent], ["write", "write"])
        port.fail = OSError(errno.ENOBUFS, "full")
        self.assertRaises(OSError, send, b"d", ("127.0.0.1", 5060))

    def test_a_closed_listener_is_a_failed_send_not_a_crash(self):
        port = self.Port()
        send = checked_writer(port)
        send(b"a", ("127.0.0.1", 5060))
        port.connected = False     # a retransmission timer fired during shutdown
        self.assertRaises(OSError, send, b"b", ("127.0.0.1", 5060))
        self.assertEqual(len(port.sent), 1)

    def test_real_datagrams_arrive(self):
        from twisted.internet import defer, reactor
        from twisted.internet.protocol import DatagramProtocol

        got: list[bytes] = []
        done = defer.Deferred()

        class Receiver(DatagramProtocol):
            def datagramReceived(self, data, addr):
                got.append(data)
                if len(got) == 2:
                    done.callback(None)

        receiver = reactor.listenUDP(0, Receiver(), interface="127.0.0.1")
        sender = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(receiver.stopListening)
        self.addCleanup(sender.stopListening)
        send = checked_writer(sender)
        for data in (b"one", b"two"):
            send(data, ("127.0.0.1", receiver.getHost().port))
        return done.addCallback(lambda _: self.assertEqual(got, [b"one", b"two"]))

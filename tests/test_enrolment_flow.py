"""Enrolment, tickets and registration, walked over real UDP with the pty modem (issue 4)."""

import os
import stat

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mpay.auth.crypto import open_device_key
from mpay.auth.tickets import TICKET_HEADER
from mpay.auth.keyagreement import EnrolmentAborted
from mpay.sim.device import DeviceError
from mpay.stores.location import connect_redis

from tests.flow import MpayFixture, redis_prefix

NUMBER = "+886912345678"
OTHER = "+886987654321"

EXPECTED_FLOW = [
    (">", "REGISTER"), ("<", 401),          # claim: number, X25519 share, nonce, Ed25519 key
    ("<", "REFER"), (">", 202),             # Refer-To: the caller-ID line; the call is placed
    (">", "NOTIFY"), ("<", 200),            # 200 carries the AS share, nonce, signature
    (">", "REGISTER"), ("<", 200),          # ticket request (proof under K) -> ticket
    (">", "REGISTER"), ("<", 200),          # REGISTER to the PS with ticket + authenticator
]


class EnrolmentOverUDPTests(unittest.TestCase):
    settings: tuple = ()
    transport = "UDP"

    @defer.inlineCallbacks
    def setUp(self):
        self.mpay = MpayFixture(self, *self.settings, transport=self.transport)
        yield self.mpay.start()

    @defer.inlineCallbacks
    def test_enrolment_ticket_and_registration_message_by_message(self):
        device, recorder = self.mpay.device(NUMBER)
        k = yield device.enroll()
        yield device.get_ticket()
        yield device.register()
        self.assertEqual(recorder.flow(), EXPECTED_FLOW)

        record = yield self.mpay.as_core.device_keys.load(NUMBER)
        self.assertEqual(open_device_key(self.mpay.as_core.master, NUMBER, record.sealed_k), k)
        self.assertNotIn(k, record.sealed_k, "K is sealed at rest")
        binding = yield self.mpay.ps_core.registrar.locations.lookup(NUMBER)
        self.assertEqual((binding.host, binding.port, binding.transport),
                         (*self.mpay.source_of(device, "ps"), self.transport))
        mode = stat.S_IMODE(os.stat(device.state_path).st_mode)
        self.assertEqual(mode, 0o600, "the device keeps K in a private file")

    @defer.inlineCallbacks
    def test_renewal_and_unregistration(self):
        device, _ = self.mpay.device(NUMBER)
        yield device.enroll()
        first = yield device.get_ticket()
        second = yield device.get_ticket()   # the valid ticket stands in for the K proof
        self.assertNotEqual(first, second)
        yield device.register()
        yield device.register(expires_s=0)
        binding = yield self.mpay.ps_core.registrar.locations.lookup(NUMBER)
        self.assertIsNone(binding)


class EnrolmentOverUDPWithRedisTests(EnrolmentOverUDPTests):
    """The same walk with the location store in the Redis on 127.0.0.1:6379."""

    @defer.inlineCallbacks
    def setUp(self):
        self.prefix = redis_prefix()
        self.settings = ("location.backend=redis", f"location.redis_prefix={self.prefix}")
        yield super().setUp()
        self.assertEqual(type(self.mpay.ps_core.registrar.locations).__name__, "RedisLocationStore")

    @defer.inlineCallbacks
    def tearDown(self):
        redis = yield connect_redis("127.0.0.1", 6379, pool_size=1)
        keys = yield redis.keys(self.prefix + "*")
        if keys:
            yield redis.delete(keys)
        yield redis.disconnect()


class EnrolmentRefusalTests(unittest.TestCase):
    """Each refusal its own test; short design timers so the windows close quickly."""

    @defer.inlineCallbacks
    def setUp(self):
        self.mpay = MpayFixture(self, "as.timer_d_s=1.5", "as.timer_c_s=1")
        yield self.mpay.start()

    @defer.inlineCallbacks
    def assertEnrolmentRefused(self, device, reason):
        try:
            yield device.enroll()
        except DeviceError as exc:
            self.assertIn(reason, str(exc))
        else:
            self.fail("enrolment succeeded")
        record = yield self.mpay.as_core.device_keys.load(device.state.number)
        self.assertIsNone(record, "nothing half-enrolled stays behind")
        self.assertEqual(self.mpay.as_core.pending, {})

    def test_caller_id_differs_from_the_claimed_number(self):
        device, _ = self.mpay.device(NUMBER, ring=lambda number, line: self.mpay.ring(OTHER, line))
        return self.assertEnrolmentRefused(device, "403 Caller ID Mismatch")

    def test_withheld_caller_id(self):
        def ring(number, line):
            self.mpay.modem.ring(None, withheld=True)
            return defer.succeed(None)

        device, _ = self.mpay.device(NUMBER, ring=ring)
        return self.assertEnrolmentRefused(device, "403 Caller ID Withheld")

    def test_no_call_before_timer_d(self):
        device, _ = self.mpay.device(NUMBER, ring=lambda number, line: defer.succeed(None))
        return self.assertEnrolmentRefused(device, "403 Caller ID Not Seen")

    @defer.inlineCallbacks
    def test_wrong_as_signature_makes_the_device_abort(self):
        impostor = Ed25519PrivateKey.generate().public_key()
        device, _ = self.mpay.device(NUMBER, pinned_as_key=impostor)
        yield self.assertFailure(device.enroll(), EnrolmentAborted)
        self.assertIsNone(device.state.k, "the device keeps no K from an unverified AS")

    @defer.inlineCallbacks
    def test_refer_unanswered_by_timer_c(self):
        device, recorder = self.mpay.device(NUMBER)
        device.handlers["REFER"] = lambda txn, request: None   # a device that never answers
        attempt = device.enroll()
        for _ in range(100):   # bounded wait: Timer C is 1 s here
            if self.mpay.as_core.outcomes:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        attempt.cancel()
        yield self.assertFailure(attempt, defer.CancelledError)
        self.assertEqual(self.mpay.as_core.outcomes, {"REFER Unanswered": 1})
        self.assertEqual(self.mpay.as_core.pending, {})
        refers = [entry for entry in recorder.seen if entry == ("<", "REFER")]
        self.assertGreater(len(refers), 1, "the REFER was retransmitted before giving up")


class DuplicationAndBadInputTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.mpay = MpayFixture(self)
        yield self.mpay.start()

    @defer.inlineCallbacks
    def test_every_datagram_twice_gives_one_enrolment_and_one_k(self):
        agreements = []
        agree = self.mpay.as_core._agree
        self.mpay.as_core._agree = lambda claim: agreements.append(claim) or agree(claim)
        device, _ = self.mpay.device(NUMBER)
        write = device.endpoint.write

        def twice(data, addr):
            write(data, addr)
            write(data, addr)

        device.endpoint.write = twice
        k = yield device.enroll()
        yield device.get_ticket()
        yield device.register()
        self.assertEqual(len(agreements), 1, "one key agreement")
        record = yield self.mpay.as_core.device_keys.load(NUMBER)
        self.assertEqual(open_device_key(self.mpay.as_core.master, NUMBER, record.sealed_k), k)
        absorbed = self.mpay.top.endpoints["as"].layer.stats["retransmissions_absorbed"]
        self.assertGreaterEqual(absorbed, 3, "REGISTER, NOTIFY and ticket request each absorbed")

    @defer.inlineCallbacks
    def test_claim_of_an_invalid_number_is_refused_and_nothing_kept(self):
        device, _ = self.mpay.device("+886912345678")
        device.state.number = "+88691234"          # too short for Taiwan: libphonenumber says no
        try:
            yield device.enroll()
        except DeviceError as exc:
            self.assertIn("400 Invalid Number", str(exc))
        else:
            self.fail("an invalid number was enrolled")
        self.assertEqual(self.mpay.as_core.pending, {})

    @defer.inlineCallbacks
    def test_ticket_request_from_a_number_never_enrolled_is_404(self):
        device, _ = self.mpay.device(NUMBER)
        device.state.k = "A" * 43 + "="
        try:
            yield device.get_ticket()
        except DeviceError as exc:
            self.assertIn("404 Number Not Enrolled", str(exc))
        else:
            self.fail("a ticket for nobody")


class LateNotifyTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.mpay = MpayFixture(self, "as.timer_d_s=0.5")
        yield self.mpay.start()

    @defer.inlineCallbacks
    def test_notify_after_timer_d_is_refused(self):
        def slow_ring(number, line):
            # The call and the NOTIFY only after Timer D has closed the window.
            return task.deferLater(reactor, 1.0, self.mpay.ring, number, line)

        device, _ = self.mpay.device(NUMBER, ring=slow_ring)
        try:
            yield device.enroll()
        except DeviceError as exc:
            self.assertIn("481", str(exc))
        else:
            self.fail("a NOTIFY after Timer D enrolled")
        self.assertEqual(self.mpay.as_core.outcomes, {"Caller ID Not Seen": 1})
        self.assertIsNone((yield self.mpay.as_core.device_keys.load(NUMBER)))


class RegistrarRefusalTests(unittest.TestCase):
    """Ticket and authenticator refusals as the PS gives them, over UDP."""

    @defer.inlineCallbacks
    def setUp(self):
        self.mpay = MpayFixture(self, "tickets.lifetime_s=1")
        yield self.mpay.start()
        self.device, _ = self.mpay.device(NUMBER)
        yield self.device.enroll()
        yield self.device.get_ticket()

    def register_request(self):
        host, port = self.device.endpoint.sent_by
        return self.device._request("REGISTER", "sip:mpay.test", contact=f"sip:{NUMBER}@{host}:{port}",
                                    headers=[("Expires", "600")])

    @defer.inlineCallbacks
    def answer(self, request):
        response = yield self.device.endpoint.send_request(request, self.mpay.address("ps"))
        return (response.status, response.reason)

    @defer.inlineCallbacks
    def test_forged_ticket(self):
        request = self.device.authenticate(self.register_request())
        ticket = request.headers.get(TICKET_HEADER)
        request.headers.set(TICKET_HEADER, ticket[:-4] + ("AAAA" if ticket[-4:] != "AAAA" else "BBBB"))
        self.assertEqual((yield self.answer(request)), (403, "Ticket Forged"))

    @defer.inlineCallbacks
    def test_authenticator_replayed(self):
        request = self.device.authenticate(self.register_request())
        self.assertEqual((yield self.answer(request)), (200, "OK"))
        request.headers.set("Via", request.headers.getall("Via")[0].replace("branch=", "branch=z9hG4bKreplay"))
        self.assertEqual((yield self.answer(request)), (403, "Authenticator Replayed"))

    @defer.inlineCallbacks
    def test_authenticator_moved_onto_another_request(self):
        request = self.device.authenticate(self.register_request())
        request.headers.set("Call-ID", "another-call@127.0.0.1")
        self.assertEqual((yield self.answer(request)), (403, "Request Digest Mismatch"))

    @defer.inlineCallbacks
    def test_expired_ticket_asks_for_a_new_one(self):
        yield task.deferLater(reactor, 1.2, lambda: None)     # [tickets] lifetime_s = 1 here
        request = self.device.authenticate(self.register_request())
        self.assertEqual((yield self.answer(request)), (401, "Ticket Expired"))
        yield self.device.get_ticket()
        self.assertEqual((yield self.device.register()).status, 200)


class EnrolmentOverTCPTests(EnrolmentOverUDPTests):
    transport = "TCP"


class EnrolmentOverTLSTests(EnrolmentOverUDPTests):
    transport = "TLS"

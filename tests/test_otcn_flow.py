"""A consumer asks the PS for a one-time credit number, over real UDP (issue 6)."""

from twisted.internet import defer
from twisted.trial import unittest

from mpay.payment.otcn import luhn_valid
from mpay.sim.device import DeviceError

from tests.flow import MpayFixture

CONSUMER = "+886912345678"


class OTCNRequestTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.mpay = MpayFixture(self)
        yield self.mpay.start()
        self.device, _ = self.mpay.device(CONSUMER)
        yield self.device.enroll()
        yield self.device.get_ticket()
        self.store = self.mpay.top.getServiceNamed("ps").otcns

    @defer.inlineCallbacks
    def test_otcn_request_gets_a_single_use_number(self):
        grant = yield self.device.request_otcn(cap=5000)
        self.assertTrue(luhn_valid(grant["otcn"]))
        self.assertEqual(grant["display"].replace(" ", ""), grant["otcn"])
        self.assertEqual(grant["cap"], 5000)
        stored = yield self.store.consume(grant["otcn"])
        self.assertEqual((stored.consumer, stored.cap), (CONSUMER, 5000))
        self.assertIsNone((yield self.store.consume(grant["otcn"])), "single use")

    @defer.inlineCallbacks
    def test_each_request_gets_another_number(self):
        first = yield self.device.request_otcn()
        second = yield self.device.request_otcn()
        self.assertNotEqual(first["otcn"], second["otcn"])
        self.assertIsNone(first["cap"])

    @defer.inlineCallbacks
    def test_bad_cap_is_400(self):
        for cap in (0, -1, 10**13):
            try:
                yield self.device.request_otcn(cap=cap)
            except DeviceError as exc:
                self.assertIn("400 Invalid Cap", str(exc))
            else:
                self.fail(f"cap {cap} accepted")

    @defer.inlineCallbacks
    def test_without_a_ticket_is_401(self):
        self.device.state.ticket = None
        try:
            yield self.device.request_otcn()
        except DeviceError as exc:
            self.assertIn("401 Ticket Required", str(exc))
        else:
            self.fail("an OTCN without a ticket")

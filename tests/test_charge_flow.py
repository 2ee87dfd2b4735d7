"""Event charging over real UDP: RECEIVE by number and by OTCN (issue 6, Fig 4-4)."""

from twisted.internet import defer
from twisted.trial import unittest

from mpay.payment.otcn import new_otcn
from mpay.payment.receipt import RECEIPT_HEADER, verify_receipt
from mpay.auth.keyfiles import load_public_key

from tests.flow import MpayFixture

CONSUMER = "+886912345678"
MERCHANT = "+886223334444"
TOP_UP = 1_000


class EventChargingTests(unittest.TestCase):
    transport = "UDP"

    @defer.inlineCallbacks
    def setUp(self):
        self.mpay = MpayFixture(self, "ps.charge_timer_a_s=1", transport=self.transport)
        yield self.mpay.start()
        self.ledger = self.mpay.top.ledger
        self.consumer, self.consumer_wire = yield self.mpay.ready(CONSUMER)
        self.merchant, self.merchant_wire = yield self.mpay.ready(MERCHANT)
        yield self.ledger.cash_in(CONSUMER, TOP_UP, "topup")
        self.consumer.charge_policy = lambda asked: 200

    @defer.inlineCallbacks
    def balances(self):
        consumer = yield self.ledger.balance(CONSUMER)
        merchant = yield self.ledger.balance(MERCHANT)
        return consumer.balance, merchant.balance

    @defer.inlineCallbacks
    def test_event_charging_by_number_confirmed(self):
        response = yield self.merchant.charge(CONSUMER, 300)
        self.assertEqual(response.status, 200)
        receipt = verify_receipt(load_public_key(self.mpay.dir + "/ps.pub"), response.headers.get(RECEIPT_HEADER))
        self.assertEqual((receipt.payer, receipt.payee, receipt.amount), (CONSUMER, MERCHANT, 300))
        self.assertEqual((yield self.balances()), (700, 300))
        self.assertEqual(self.consumer.charge_requests, [{"merchant": MERCHANT, "amount": 300, "currency": "TWD"}])
        consumer_flow = self.consumer_wire.flow()
        start = consumer_flow.index(("<", "RECEIVE"))
        self.assertEqual(consumer_flow[start:start + 3], [("<", "RECEIVE"), (">", 180), (">", 200)])
        yield self.mpay.eventually(lambda: ("<", "ACK") in self.consumer_wire.flow())
        self.assertEqual(self.mpay.ps_core.charges.live, {})

    @defer.inlineCallbacks
    def test_anonymous_event_charging_by_otcn(self):
        grant = yield self.consumer.request_otcn()
        response = yield self.merchant.charge(grant["otcn"], 250)
        self.assertEqual(response.status, 200)
        self.assertIn("anonymous", response.headers.get("P-Asserted-Identity"))
        receipt = verify_receipt(load_public_key(self.mpay.dir + "/ps.pub"), response.headers.get(RECEIPT_HEADER))
        self.assertEqual(receipt.payer, "anonymous")
        self.assertEqual((yield self.balances()), (750, 250))
        for direction, data in self.merchant_wire.raw:
            if direction == "<":
                self.assertNotIn(CONSUMER[1:].encode(), data, "the consumer's number reached the merchant")

    @defer.inlineCallbacks
    def test_event_charging_declined(self):
        self.consumer.charge_policy = lambda asked: 603
        response = yield self.merchant.charge(CONSUMER, 300)
        self.assertEqual(response.status, 603)
        self.assertEqual((yield self.balances()), (TOP_UP, 0))

    @defer.inlineCallbacks
    def test_event_charging_unanswered_gets_408(self):
        self.consumer.charge_policy = lambda asked: None     # the person never answers
        response = yield self.merchant.charge(CONSUMER, 300)
        self.assertEqual(response.status, 408)
        self.assertEqual((yield self.balances()), (TOP_UP, 0))
        yield self.mpay.eventually(lambda: ("<", "CANCEL") in self.consumer_wire.flow())

    @defer.inlineCallbacks
    def test_short_balance_gets_402(self):
        response = yield self.merchant.charge(CONSUMER, TOP_UP + 1)
        self.assertEqual((response.status, response.reason), (402, "Insufficient Credit"))
        self.assertEqual((yield self.balances()), (TOP_UP, 0))

    @defer.inlineCallbacks
    def test_otcn_reused_gets_404_and_no_second_charge(self):
        grant = yield self.consumer.request_otcn()
        first = yield self.merchant.charge(grant["otcn"], 100)
        again = yield self.merchant.charge(grant["otcn"], 100)
        self.assertEqual((first.status, again.status), (200, 404))
        self.assertEqual((yield self.balances()), (900, 100))

    @defer.inlineCallbacks
    def test_otcn_over_its_cap_is_refused(self):
        grant = yield self.consumer.request_otcn(cap=200)
        response = yield self.merchant.charge(grant["otcn"], 201)
        self.assertEqual((response.status, response.reason), (403, "Amount Over OTCN Cap"))
        self.assertEqual((yield self.balances()), (TOP_UP, 0))

    @defer.inlineCallbacks
    def test_guessing_merchant_is_blocked_and_the_consumer_never_disturbed(self):
        statuses = []
        for _ in range(6):
            response = yield self.merchant.charge(new_otcn(), 10)
            statuses.append(response.status)
        self.assertEqual(statuses, [404] * 5 + [403])
        grant = yield self.consumer.request_otcn()
        blocked = yield self.merchant.charge(grant["otcn"], 10)
        self.assertEqual((blocked.status, blocked.reason), (403, "Too Many Unknown OTCNs"))
        self.assertEqual(self.consumer.charge_requests, [], "no guess reached the consumer")
        self.assertEqual((yield self.balances()), (TOP_UP, 0))


class ExpiredOTCNTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_an_expired_otcn_gets_404_and_the_consumer_is_never_asked(self):
        mpay = MpayFixture(self, "otcn.lifetime_s=1")
        yield mpay.start()
        consumer, consumer_wire = yield mpay.ready(CONSUMER)
        merchant, _ = yield mpay.ready(MERCHANT)
        yield mpay.top.ledger.cash_in(CONSUMER, TOP_UP, "topup")
        consumer.charge_policy = lambda asked: 200
        grant = yield consumer.request_otcn()
        store = mpay.ps_core.charges.otcns
        yield mpay.eventually(lambda: grant["otcn"] not in store._grants)   # lapsed on the wheel
        response = yield merchant.charge(grant["otcn"], 100)
        self.assertEqual((response.status, response.reason), (404, "Unknown OTCN"))
        self.assertNotIn(("<", "RECEIVE"), consumer_wire.flow())
        self.assertEqual((yield mpay.top.ledger.balance(CONSUMER)).balance, TOP_UP)


class EventChargingOverTCPTests(EventChargingTests):
    transport = "TCP"


class EventChargingOverTLSTests(EventChargingTests):
    transport = "TLS"

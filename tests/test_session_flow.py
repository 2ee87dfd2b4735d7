"""Sessions charged by time over real UDP (issue 6): BYE from either side, Timer C, holds."""

from twisted.internet import defer
from twisted.trial import unittest

from mpay.auth.keyfiles import load_public_key
from mpay.payment.receipt import RECEIPT_HEADER

from tests.flow import MpayFixture

CONSUMER = "+886912345678"
MERCHANT = "+886223334444"
OTHER_MERCHANT = "+886223335555"
PAYEE = "+886912000777"


class ChargedByTimeTests(unittest.TestCase):
    transport = "UDP"

    @defer.inlineCallbacks
    def setUp(self):
        self.mpay = MpayFixture(self, "ps.checkpoint_s=0.2", transport=self.transport)
        yield self.mpay.start()
        self.ledger = self.mpay.top.ledger
        self.consumer, self.consumer_wire = yield self.mpay.ready(CONSUMER)
        self.merchant, self.merchant_wire = yield self.mpay.ready(MERCHANT)
        self.consumer.charge_policy = lambda asked: 200
        self.ps_public = load_public_key(self.mpay.dir + "/ps.pub")
        self.charges = self.mpay.ps_core.charges

    @defer.inlineCallbacks
    def topUp(self, amount):
        yield self.ledger.cash_in(CONSUMER, amount, f"topup|{amount}")

    @defer.inlineCallbacks
    def balance(self, number):
        return (yield self.ledger.balance(number))

    @defer.inlineCallbacks
    def open(self, merchant=None, rate=10):
        merchant = merchant or self.merchant
        response = yield merchant.charge(CONSUMER, rate=rate)
        self.assertEqual(response.status, 200)
        yield self.mpay.eventually(lambda: any(s.running for s in
                                               self.charges.sessions.consumers.values()))
        return response.call_id

    @defer.inlineCallbacks
    def assertSettled(self):
        yield self.mpay.eventually(lambda: not self.charges.sessions.members
                                   and not self.charges.live)
        report = yield self.ledger.audit()
        self.assertTrue(report.ok, report.format())
        self.assertEqual((yield self.balance(CONSUMER)).held, 0)
        self.assertEqual((yield self.ledger.open_sessions()), [])

    @defer.inlineCallbacks
    def test_session_ended_by_the_merchant(self):
        yield self.topUp(10_000)
        call_id = yield self.open(rate=10)
        self.assertEqual(self.consumer.charge_requests[-1],
                         {"merchant": MERCHANT, "rate": 10, "currency": "TWD"})
        held = yield self.balance(CONSUMER)
        self.assertEqual((held.held, held.available), (10_000, 0), "all of it is held")
        end = yield self.merchant.end_session(call_id)
        self.assertEqual(end["by"], "me")
        self.assertGreater(end["charged"], 0)
        self.assertEqual((end["receipt"].payer, end["receipt"].payee, end["receipt"].amount),
                         (CONSUMER, MERCHANT, end["charged"]))
        yield self.mpay.eventually(lambda: self.consumer.session_ends)
        told = self.consumer.session_ends[0]
        self.assertEqual((told["by"], told["charged"]), ("peer", end["charged"]))
        self.assertEqual(told["receipt"].amount, end["charged"])
        self.assertEqual((yield self.balance(MERCHANT)).balance, end["charged"])
        self.assertEqual((yield self.balance(CONSUMER)).available, 10_000 - end["charged"])
        yield self.assertSettled()
        merchant_flow = self.merchant_wire.flow()
        start = merchant_flow.index((">", "RECEIVE"))
        self.assertEqual([m for m in merchant_flow[start:] if m != ("<", 180)],
                         [(">", "RECEIVE"), ("<", 200), (">", "ACK"), (">", "BYE"), ("<", 200)])

    @defer.inlineCallbacks
    def test_session_ended_by_the_consumer(self):
        yield self.topUp(10_000)
        yield self.open(rate=7)
        [call_id] = self.consumer.sessions
        end = yield self.consumer.end_session(call_id)
        yield self.mpay.eventually(lambda: self.merchant.session_ends)
        told = self.merchant.session_ends[0]
        self.assertEqual((told["by"], told["charged"]), ("peer", end["charged"]))
        self.assertEqual(told["receipt"].amount, end["charged"])
        self.assertEqual(self.merchant.sessions, {})
        self.assertEqual((yield self.balance(MERCHANT)).balance, end["charged"])
        yield self.assertSettled()

    @defer.inlineCallbacks
    def test_timer_c_ends_the_session_and_charges_exactly_what_was_available(self):
        yield self.topUp(30)
        yield self.open(rate=40)          # 30 units at 40/s: out of money in 0.75 s
        yield self.mpay.eventually(lambda: self.merchant.session_ends and self.consumer.session_ends)
        for device in (self.merchant, self.consumer):
            end = device.session_ends[0]
            self.assertEqual((end["by"], end["charged"]), ("peer", 30))
            self.assertIn("Credit Exhausted", end["reason"])
        self.assertEqual(self.merchant.session_ends[0]["receipt"].amount, 30)
        self.assertEqual((yield self.balance(CONSUMER)).balance, 0)
        self.assertEqual((yield self.balance(MERCHANT)).balance, 30)
        yield self.assertSettled()

    @defer.inlineCallbacks
    def test_two_sessions_at_different_rates_end_at_the_same_exhaustion_time(self):
        other, _ = yield self.mpay.ready(OTHER_MERCHANT)
        yield self.topUp(90)
        yield self.open(self.merchant, rate=20)
        yield self.open(other, rate=40)
        yield self.mpay.eventually(lambda: self.merchant.session_ends and other.session_ends)
        first, second = self.merchant.session_ends[0], other.session_ends[0]
        self.assertEqual(self.charges.sessions.stats["exhausted"], 2)
        self.assertEqual(first["charged"] + second["charged"], 90, "exactly what was available")
        self.assertIn("Credit Exhausted", first["reason"])
        self.assertIn("Credit Exhausted", second["reason"])
        # One Timer C ended both, each paying its share of rate x elapsed: the
        # second, at twice the rate, paid more although it started a moment later.
        self.assertGreater(second["charged"], first["charged"])
        yield self.mpay.eventually(lambda: len(self.consumer.session_ends) == 2)
        self.assertEqual((yield self.balance(CONSUMER)).balance, 0)
        yield self.assertSettled()

    @defer.inlineCallbacks
    def test_a_transfer_during_a_session_cannot_spend_the_held_funds(self):
        payee, _ = yield self.mpay.ready(PAYEE)
        yield self.topUp(1_000)
        call_id = yield self.open(rate=1)
        transfer = yield self.consumer.transfer(PAYEE, 500).addErrback(lambda f: f.value)
        self.assertIn("402", str(transfer))
        self.assertEqual((yield self.balance(PAYEE)).balance, 0)
        end = yield self.merchant.end_session(call_id)
        response, _ = yield self.consumer.transfer(PAYEE, 500)
        self.assertEqual(response.status, 200, "released once the session ended")
        self.assertEqual((yield self.balance(CONSUMER)).balance, 500 - end["charged"])
        yield self.assertSettled()

    @defer.inlineCallbacks
    def test_checkpoints_record_what_a_running_session_owes(self):
        yield self.topUp(10_000)
        call_id = yield self.open(rate=100)
        yield self.mpay.eventually(lambda: self.charges.sessions.stats["checkpoints"] >= 2)
        [session] = yield self.ledger.open_sessions()
        self.assertGreater(session.checkpointed_amount, 0)
        end = yield self.merchant.end_session(call_id)
        self.assertGreaterEqual(end["charged"], session.checkpointed_amount)
        yield self.assertSettled()

    @defer.inlineCallbacks
    def test_a_session_without_money_is_refused_402_and_the_consumer_dialog_closed(self):
        response = yield self.merchant.charge(CONSUMER, rate=5)
        self.assertEqual((response.status, response.reason), (402, "Insufficient Credit"))
        yield self.mpay.eventually(lambda: self.consumer.session_ends)
        self.assertIn("Refused", self.consumer.session_ends[0]["reason"])
        self.assertEqual(self.merchant.sessions, {})
        yield self.assertSettled()

    @defer.inlineCallbacks
    def test_bye_for_no_session_is_481_and_a_stranger_cannot_end_one(self):
        yield self.topUp(100)
        call_id = yield self.open(rate=1)
        stranger, _ = yield self.mpay.ready(PAYEE)
        stranger.sessions[call_id] = self.merchant.sessions[call_id]
        refused = yield stranger.end_session(call_id).addErrback(lambda f: f.value)
        self.assertIn("403", str(refused))
        self.merchant.sessions["nope"] = self.merchant.sessions[call_id].__class__(
            **{**self.merchant.sessions[call_id].to_json(), "call_id": "nope"})
        missing = yield self.merchant.end_session("nope").addErrback(lambda f: f.value)
        self.assertIn("481", str(missing))
        yield self.merchant.end_session(call_id)
        yield self.assertSettled()

    @defer.inlineCallbacks
    def test_anonymous_session_by_otcn_never_shows_the_consumer(self):
        yield self.topUp(1_000)
        grant = yield self.consumer.request_otcn()
        response = yield self.merchant.charge(grant["otcn"], rate=3)
        self.assertEqual(response.status, 200)
        self.assertIn("anonymous", response.headers.get("P-Asserted-Identity"))
        [call_id] = self.merchant.sessions
        end = yield self.merchant.end_session(call_id)
        self.assertEqual(end["receipt"].payer, "anonymous")
        for direction, data in self.merchant_wire.raw:
            if direction == "<":
                self.assertNotIn(CONSUMER[1:].encode(), data, "the consumer's number reached the merchant")
        yield self.assertSettled()

    @defer.inlineCallbacks
    def test_a_capped_otcn_is_refused_for_a_timed_session(self):
        yield self.topUp(1_000)
        grant = yield self.consumer.request_otcn(cap=100)
        response = yield self.merchant.charge(grant["otcn"], rate=3)
        self.assertEqual((response.status, response.reason), (403, "Capped OTCN Is For Fixed Amounts"))
        self.assertIsNone(response.headers.get(RECEIPT_HEADER))
        self.assertEqual((yield self.balance(CONSUMER)).held, 0)


class ChargedByTimeOverTCPTests(ChargedByTimeTests):
    transport = "TCP"


class ChargedByTimeOverTLSTests(ChargedByTimeTests):
    transport = "TLS"

"""Fig 4-4 walked event by event, and the arithmetic of charged-by-time sessions."""

from hypothesis import given, strategies as st
from twisted.trial import unittest

from mpay.payment.charging import (
    CHARGE_TIMER_A_S, ByeBoth, CancelConsumer, CancelTimer, Charge, ChargeRequest, ChargeState,
    Done, ForwardBye, OpenSession, RelayAck, SessionStarted, Settle, StartTimer, ToMerchant,
    charge_for, describe,
)
from mpay.payment.charged_by_time import ConsumerSessions, share

MERCHANT, CONSUMER = "+886223334444", "+886912345678"


def event(amount=500, **kw):
    return ChargeRequest(MERCHANT, CONSUMER, amount=amount, **kw)


def timed(rate=3, **kw):
    return ChargeRequest(MERCHANT, CONSUMER, rate=rate, **kw)


class EventChargingTests(unittest.TestCase):
    def test_event_charging_confirmed(self):
        charge = event()
        self.assertEqual(charge.start(), [StartTimer("A", CHARGE_TIMER_A_S)])
        self.assertEqual(charge.consumer_answered(180, "Ringing"), [ToMerchant(180, "Ringing")])
        self.assertEqual(charge.consumer_answered(200), [CancelTimer("A"), Charge(500)])
        self.assertEqual(charge.charged(True), [ToMerchant(200, "OK")])
        self.assertEqual(charge.state, ChargeState.WAIT_ACK)
        self.assertEqual(charge.merchant_ack(), [RelayAck(), Done("charged")])
        self.assertEqual(charge.state, ChargeState.TERMINATE)
        self.assertEqual(charge.history, [ChargeState.WAIT_CONFIRM, ChargeState.WAIT_ACK,
                                          ChargeState.COMPLETE])

    def test_event_charging_declined(self):
        charge = event()
        charge.start()
        self.assertEqual(charge.consumer_answered(603), [CancelTimer("A"), ToMerchant(603, "Decline"),
                                                         Done("declined 603")])

    def test_event_charging_unanswered_is_408(self):
        charge = event()
        charge.start()
        self.assertEqual(charge.timer("A"), [CancelConsumer(), ToMerchant(408, "Consumer Did Not Answer"),
                                             Done("unanswered")])
        self.assertEqual(charge.consumer_answered(200), [], "a late yes changes nothing")

    def test_short_balance_after_the_yes_is_402(self):
        charge = event()
        charge.start()
        charge.consumer_answered(200)
        self.assertEqual(charge.charged(False, 402, "Insufficient Credit"),
                         [ToMerchant(402, "Insufficient Credit"), Done("Insufficient Credit")])

    def test_anonymous_charge_never_describes_the_consumer(self):
        self.assertEqual(describe(event(anonymous=True))["consumer"], "anonymous")


class ChargedByTimeTests(unittest.TestCase):
    def open_session(self, charge):
        charge.start()
        self.assertEqual(charge.consumer_answered(200), [CancelTimer("A"), OpenSession(charge.rate)])
        charge.charged(True)
        self.assertEqual(charge.merchant_ack(), [RelayAck(), SessionStarted()])
        self.assertEqual(charge.state, ChargeState.WAIT_BYE)

    def test_session_ended_by_the_consumer(self):
        charge = timed()
        self.open_session(charge)
        self.assertEqual(charge.bye("consumer"), [Settle(exhausted=False), ForwardBye("merchant"),
                                                  Done("ended by consumer")])
        self.assertEqual(charge.state, ChargeState.TERMINATE)
        self.assertEqual(charge.bye("consumer"), [], "a second BYE is not settled twice")
        self.assertEqual(charge.bye("merchant"), [], "nor a BYE that crossed it")

    def test_session_ended_by_the_merchant(self):
        charge = timed()
        self.open_session(charge)
        self.assertEqual(charge.bye("merchant"), [Settle(exhausted=False), ForwardBye("consumer"),
                                                  Done("ended by merchant")])

    def test_timer_c_ends_it_towards_both_sides(self):
        charge = timed()
        self.open_session(charge)
        self.assertEqual(charge.timer("C"), [Settle(exhausted=True), ByeBoth(), Done("exhausted")])
        self.assertEqual(charge.bye("consumer"), [])

    def test_a_session_the_merchant_never_acknowledged_ends_unpaid(self):
        charge = timed()
        charge.start()
        charge.consumer_answered(200)
        charge.charged(True)
        self.assertEqual(charge.timer("ACK"), [Settle(exhausted=False), ByeBoth(), Done("no ACK")])

    def test_an_event_charge_whose_ack_is_lost_is_still_charged(self):
        charge = event()
        charge.start()
        charge.consumer_answered(200)
        charge.charged(True)
        self.assertEqual(charge.timer("ACK"), [Done("charged")])

    def test_stale_events_change_nothing(self):
        charge = timed()
        charge.start()
        self.assertEqual(charge.merchant_ack(), [])
        self.assertEqual(charge.bye("merchant"), [])
        self.assertEqual(charge.timer("C"), [])
        self.assertEqual(charge.state, ChargeState.WAIT_CONFIRM)

    def test_amount_and_rate_exclude_each_other(self):
        self.assertRaises(AssertionError, ChargeRequest, MERCHANT, CONSUMER, amount=1, rate=1)


class SessionArithmeticTests(unittest.TestCase):
    def test_charge_rounds_a_started_unit_up(self):
        self.assertEqual(charge_for(3, 10.0), 30)
        self.assertEqual(charge_for(3, 10.01), 31)
        self.assertEqual(charge_for(1, 0.1 + 0.2), 1)
        self.assertEqual(charge_for(10, 0.3), 3, "float noise is not a started unit")

    def test_two_sessions_share_one_exhaustion_time(self):
        sessions = ConsumerSessions(CONSUMER, unspent=1000)
        sessions.start("a", 3, now=0.0)
        sessions.start("b", 7, now=0.0)
        self.assertEqual(sessions.exhaustion_delay_s(0.0), 100.0)
        self.assertEqual(sessions.exhaust(100.0), {"a": 300, "b": 700})
        self.assertEqual(sessions.unspent, 0)

    def test_timer_c_is_recomputed_when_a_session_starts_or_ends(self):
        sessions = ConsumerSessions(CONSUMER, unspent=1000)
        self.assertIsNone(sessions.exhaustion_delay_s(0.0))
        sessions.start("a", 10, now=0.0)
        self.assertEqual(sessions.exhaustion_delay_s(0.0), 100.0)
        sessions.start("b", 10, now=20.0)           # 200 used by a: 800 left for 20/s
        self.assertEqual(sessions.exhaustion_delay_s(20.0), 40.0)
        self.assertEqual(sessions.end("a", 30.0), 300)
        self.assertEqual(sessions.unspent, 700)      # b has used 100 of it
        self.assertEqual(sessions.exhaustion_delay_s(30.0), 60.0)

    def test_a_bye_is_charged_rate_times_elapsed_rounded_up_within_the_hold(self):
        sessions = ConsumerSessions(CONSUMER, unspent=100)
        sessions.start("a", 3, now=0.0)
        self.assertEqual(sessions.end("a", 10.2), 31)
        sessions.start("b", 3, now=0.0)
        self.assertEqual(sessions.end("b", 1000.0), 69, "never more than the hold has left")
        self.assertEqual(sessions.end("never-started", 5.0), 0)

    def test_checkpoints_owe_what_was_used_within_the_hold(self):
        sessions = ConsumerSessions(CONSUMER, unspent=50)
        sessions.start("a", 2, now=0.0)
        sessions.start("b", 3, now=0.0)
        self.assertEqual(sessions.checkpoint(4.5), {"a": 9, "b": 14})
        self.assertEqual(sessions.checkpoint(20.0), {"a": 20, "b": 30})
        self.assertEqual(sum(sessions.checkpoint(10.1).values()), 50, "rounding up stays within")

    @given(st.integers(0, 10**6), st.dictionaries(st.integers(0, 9), st.floats(0, 10**6, allow_nan=False),
                                                  min_size=1, max_size=6))
    def test_sharing_hands_out_exactly_the_total_in_proportion(self, total, weights):
        charges = share(total, weights)
        self.assertEqual(sum(charges.values()), total if sum(weights.values()) > 0 else 0)
        whole = sum(weights.values())
        for key, weight in weights.items():
            self.assertGreaterEqual(charges[key], 0)
            if whole > 0:
                self.assertLessEqual(abs(charges[key] - total * weight / whole), 1.0 + 1e-6)

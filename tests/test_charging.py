"""Fig 4-4 walked event by event, and the arithmetic of charged-by-time sessions."""

from hypothesis import given, strategies as st
from twisted.trial import unittest

from mpay.payment.charging import (
    CHARGE_TIMER_A_S, ByeBoth, CancelConsumer, CancelTimer, Charge, ChargeRequest, ChargeState,
    Done, ForwardBye, OpenSession, RelayAck, SessionStarted, Settle, StartTimer, ToMerchant,
    charge_for, describe, exhaustion_delay_s, split_exhausted,
)

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
        self.assertEqual(charge.bye("consumer"), [ForwardBye("merchant")])
        self.assertEqual(charge.state, ChargeState.WAIT_BYE, "unchanged until the 200")
        self.assertEqual(charge.bye("consumer"), [], "a second BYE is not forwarded twice")
        self.assertEqual(charge.bye_answered(), [CancelTimer("C"), Settle(exhausted=False),
                                                 Done("ended by consumer")])

    def test_session_ended_by_the_merchant(self):
        charge = timed()
        self.open_session(charge)
        self.assertEqual(charge.bye("merchant"), [ForwardBye("consumer")])
        self.assertEqual(charge.bye_answered()[-1], Done("ended by merchant"))

    def test_timer_c_ends_it_towards_both_sides(self):
        charge = timed()
        self.open_session(charge)
        self.assertEqual(charge.timer("C"), [ByeBoth(), Settle(exhausted=True), Done("exhausted")])
        self.assertEqual(charge.bye("consumer"), [])
        self.assertEqual(charge.bye_answered(), [])

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
        delay = exhaustion_delay_s(1000, [3, 7])
        self.assertEqual(delay, 100.0)
        self.assertEqual(split_exhausted(1000, [(3, delay), (7, delay)]), [300, 700])

    @given(st.integers(0, 10**6), st.lists(st.tuples(st.integers(1, 10**4),
                                                      st.floats(0, 10**4, allow_nan=False)),
                                            min_size=1, max_size=6))
    def test_exhausted_sessions_never_charge_more_than_was_available(self, available, sessions):
        charges = split_exhausted(available, sessions)
        owed = [charge_for(rate, elapsed) for rate, elapsed in sessions]
        self.assertEqual(sum(charges), min(available, sum(owed)))
        self.assertTrue(all(0 <= c <= o for c, o in zip(charges, owed)))

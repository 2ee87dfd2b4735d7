"""The AS enrolment state machine (Fig 4-2), walked event by event."""

from twisted.trial import unittest

from mpay.auth.enrolment import (
    ENROL_TIMER_A_S, ENROL_TIMER_C_S, ENROL_TIMER_D_S, ENROL_TIMER_F_S,
    CancelTimer, Claim, Enrolled, Enrolment, EnrolmentState, Finished, KeyAgreement,
    KeyAgreementRefused, Respond,
    SendRefer, StartTimer,
)

NUMBER = "+886912345678"
LINE = "tel:+886223456789"
KEYS = KeyAgreement(as_public=b"P" * 32, as_nonce=b"N" * 16, signature=b"S" * 64, k=b"K" * 32)


def new_enrolment():
    calls = []

    def agree(claim):
        calls.append(claim)
        return KEYS

    claim = Claim(NUMBER, dmd_public=b"D" * 32, dmd_nonce=b"n" * 16, device_key=b"E" * 32)
    return Enrolment(claim, "line1", LINE, agree), calls


class EnrolmentFlowTests(unittest.TestCase):
    def walk_to_wait_notify(self, enrolment):
        self.assertEqual(enrolment.start("reg"), [
            Respond("reg", 401, "Caller-ID Verification Required", challenge=LINE),
            StartTimer("A", ENROL_TIMER_A_S)])
        self.assertEqual(enrolment.state, EnrolmentState.REGISTER_UNAUTH)
        self.assertEqual(enrolment.timer("A"), [SendRefer(LINE), StartTimer("C", ENROL_TIMER_C_S)])
        self.assertEqual(enrolment.state, EnrolmentState.REFER_AS)
        self.assertEqual(enrolment.refer_answered(202), [CancelTimer("C"), StartTimer("D", ENROL_TIMER_D_S)])
        self.assertEqual(enrolment.state, EnrolmentState.WAIT_NOTIFY)

    def test_enrolment_completes_when_caller_id_matches(self):
        enrolment, calls = new_enrolment()
        self.walk_to_wait_notify(enrolment)
        self.assertEqual(enrolment.caller_id(NUMBER, withheld=False), [])
        self.assertEqual(enrolment.notify("notify"), [
            CancelTimer("D"), Enrolled(NUMBER, KEYS.k, b"E" * 32),
            Respond("notify", 200, "OK", keys=KEYS), StartTimer("F", ENROL_TIMER_F_S)])
        self.assertEqual(enrolment.state, EnrolmentState.AUTH_COMPLETE)
        self.assertEqual(len(calls), 1)
        self.assertEqual(enrolment.timer("F"), [Finished("enrolled", EnrolmentState.AUTH_COMPLETE)])
        self.assertEqual(enrolment.state, EnrolmentState.TERMINATE)

    def test_notify_before_the_modem_report_is_answered_when_the_call_is_seen(self):
        enrolment, _ = new_enrolment()
        self.walk_to_wait_notify(enrolment)
        self.assertEqual(enrolment.notify("notify"), [])
        effects = enrolment.caller_id(NUMBER, withheld=False)
        self.assertIn(Respond("notify", 200, "OK", keys=KEYS), effects)

    def test_repeated_register_and_notify_give_one_enrolment_one_k(self):
        enrolment, calls = new_enrolment()
        self.walk_to_wait_notify(enrolment)
        self.assertEqual(enrolment.register("reg2"),
                         [Respond("reg2", 401, "Caller-ID Verification Required", challenge=LINE)])
        enrolment.caller_id(NUMBER, withheld=False)
        enrolment.notify("notify1")
        self.assertEqual(enrolment.notify("notify2"), [Respond("notify2", 200, "OK", keys=KEYS)])
        self.assertEqual(enrolment.register("reg3"), [Respond("reg3", 200, "OK", keys=KEYS)])
        self.assertEqual(len(calls), 1, "one key agreement")

    def test_caller_id_differs_from_the_claim(self):
        enrolment, calls = new_enrolment()
        self.walk_to_wait_notify(enrolment)
        enrolment.caller_id("+886987654321", withheld=False)
        self.assertEqual(enrolment.notify("notify"), [], "another caller may still come")
        effects = enrolment.timer("D")
        self.assertEqual(effects, [Respond("notify", 403, "Caller ID Mismatch"),
                                   Finished("Caller ID Mismatch", EnrolmentState.WAIT_NOTIFY)])
        self.assertEqual(calls, [], "no key agreement for a mismatch")

    def test_withheld_caller_id(self):
        enrolment, _ = new_enrolment()
        self.walk_to_wait_notify(enrolment)
        enrolment.caller_id(None, withheld=True)
        enrolment.notify("notify")
        self.assertEqual(enrolment.timer("D")[0], Respond("notify", 403, "Caller ID Withheld"))

    def test_notify_after_timer_d(self):
        enrolment, _ = new_enrolment()
        self.walk_to_wait_notify(enrolment)
        self.assertEqual(enrolment.timer("D"), [Finished("Caller ID Not Seen", EnrolmentState.WAIT_NOTIFY)])
        enrolment.caller_id(NUMBER, withheld=False)
        self.assertEqual(enrolment.notify("late"), [Respond("late", 481, "Call/Transaction Does Not Exist")])
        self.assertIsNone(enrolment.result)

    def test_no_refer_answer_by_timer_c(self):
        enrolment, _ = new_enrolment()
        enrolment.start("reg")
        enrolment.timer("A")
        self.assertEqual(enrolment.timer("C"), [Finished("REFER Unanswered", EnrolmentState.REFER_AS)])
        self.assertEqual(enrolment.state, EnrolmentState.TERMINATE)

    def test_refer_refused_or_timed_out_by_the_transaction(self):
        enrolment, _ = new_enrolment()
        enrolment.start("reg")
        enrolment.timer("A")
        self.assertEqual(enrolment.refer_answered(603)[-1], Finished("REFER Refused", EnrolmentState.REFER_AS))
        other, _ = new_enrolment()
        other.start("reg")
        other.timer("A")
        self.assertEqual(other.refer_timed_out()[-1], Finished("REFER Unanswered", EnrolmentState.REFER_AS))

    def test_notify_implies_a_lost_202(self):
        enrolment, _ = new_enrolment()
        enrolment.start("reg")
        enrolment.timer("A")
        enrolment.caller_id(NUMBER, withheld=False)
        effects = enrolment.notify("notify")
        self.assertIn(Respond("notify", 200, "OK", keys=KEYS), effects)
        self.assertEqual(enrolment.state, EnrolmentState.AUTH_COMPLETE)

    def test_stale_timers_are_ignored(self):
        enrolment, _ = new_enrolment()
        self.walk_to_wait_notify(enrolment)
        self.assertEqual(enrolment.timer("A"), [])
        self.assertEqual(enrolment.timer("C"), [])
        self.assertEqual(enrolment.state, EnrolmentState.WAIT_NOTIFY)

    def test_sightings_are_bounded(self):
        enrolment, _ = new_enrolment()
        self.walk_to_wait_notify(enrolment)
        for i in range(100):
            enrolment.caller_id(f"+88698765{i:04d}", withheld=False)
        self.assertEqual(len(enrolment.sightings), 16)
        enrolment.caller_id(NUMBER, withheld=False)
        self.assertIn(Respond("n", 200, "OK", keys=KEYS), enrolment.notify("n"),
                      "a genuine call is never crowded out")

    def test_unusable_key_share_is_refused_after_the_call(self):
        claim = Claim(NUMBER, dmd_public=b"\x00" * 32, dmd_nonce=b"n" * 16, device_key=b"E" * 32)

        def agree(claim):
            raise KeyAgreementRefused("low-order point")

        enrolment = Enrolment(claim, "line1", LINE, agree)
        self.walk_to_wait_notify(enrolment)
        enrolment.caller_id(NUMBER, withheld=False)
        self.assertEqual(enrolment.notify("n"), [
            CancelTimer("D"), Respond("n", 403, "Key Agreement Failed"),
            Finished("Key Agreement Failed", EnrolmentState.WAIT_NOTIFY)])
        self.assertIsNone(enrolment.result)

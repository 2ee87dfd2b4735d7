"""RFC 3261 section 17 transactions, walked message by message on a task.Clock."""

import gc

from twisted.trial import unittest

from mpay.sip.message import Response, make_response, parse
from mpay.sip.timing import State, TimerSettings
from mpay.sip.transaction import UNANSWERED_SWEEP_S, TransactionLayer

from tests.support import ClockWheel, Wire, make_request

PEER = ("198.51.100.7", 5061)


class RecordingTU:
    def __init__(self, answer=None):
        self.requests = []
        self.acks = []
        self.answer = answer

    def request_received(self, txn, request):
        self.requests.append((txn, request))
        if self.answer is not None:
            txn.respond_with(self.answer)

    def ack_received(self, request, addr):
        self.acks.append(request)


class ServerTransactionTests(unittest.TestCase):
    def setUp(self):
        self.time = ClockWheel(self)
        self.wire = Wire()
        self.tu = RecordingTU()
        self.layer = TransactionLayer(self.time.wheel, self.wire, self.tu)

    def test_non_invite_retransmission_is_answered_from_the_transaction(self):
        request = make_request("OPTIONS")
        self.layer.receive_request(request, PEER)
        (txn, _), = self.tu.requests
        txn.respond_with(200)
        self.layer.receive_request(make_request("OPTIONS"), PEER)
        self.layer.receive_request(make_request("OPTIONS"), PEER)
        self.assertEqual(len(self.tu.requests), 1, "processed once")
        self.assertEqual(len(self.wire.sent), 3)
        self.assertEqual({data for data, _ in self.wire.sent}, {self.wire.sent[0][0]}, "same bytes")
        self.assertEqual(self.layer.stats["retransmissions_absorbed"], 2)
        self.assertEqual((txn.request, txn.last_response, txn.on_cancel), (None, None, None),
                         "Completed keeps only the response's bytes for Timer J")

    def test_retransmission_while_trying_sends_nothing(self):
        self.layer.receive_request(make_request("MESSAGE"), PEER)
        self.layer.receive_request(make_request("MESSAGE"), PEER)
        self.assertEqual(self.wire.sent, [])
        (txn, _), = self.tu.requests
        txn.respond_with(202)
        self.assertEqual(self.wire.statuses(), [202])

    def test_provisional_is_resent_in_proceeding(self):
        self.layer.receive_request(make_request("MESSAGE"), PEER)
        (txn, _), = self.tu.requests
        txn.respond_with(180)
        self.layer.receive_request(make_request("MESSAGE"), PEER)
        self.assertEqual(self.wire.statuses(), [180, 180])
        self.assertEqual(txn.state, State.PROCEEDING)

    def test_a_request_the_tu_never_answers_is_ended_after_64_t1_never_before(self):
        self.layer.receive_request(make_request("MESSAGE"), PEER)
        (txn, _), = self.tu.requests
        self.time.advance(1.5)                     # after the first sweep
        self.layer.receive_request(make_request("MESSAGE", branch="z9hG4bK-later"), PEER)
        (_, (later, _)) = self.tu.requests
        self.time.advance(30.4)                    # 31.9 s: the first is not yet 64 x T1 old
        self.assertEqual((txn.state, later.state), (State.TRYING, State.TRYING))
        self.time.advance(1.1)                     # 33.0 s: its sweep has come
        self.assertEqual((txn.state, later.state), (State.TERMINATED, State.TRYING))
        self.assertIsNone(txn.respond_with(200), "a late answer is not sent")
        self.assertEqual(self.layer.stats["late_responses"], 1)
        self.time.advance(1.0)                     # 34.0 s: the later one's (32.5 s old)
        self.assertEqual(later.state, State.TERMINATED)
        self.assertEqual((self.layer.server, self.wire.sent), ({}, []))
        self.assertEqual(len(self.time.wheel), 0, "no sweep left once none is unanswered")

    def test_answered_requests_leave_no_bound_behind(self):
        for n in range(3):
            self.layer.receive_request(make_request("OPTIONS", branch=f"z9hG4bK-{n}"), PEER)
            self.tu.requests[-1][0].respond_with(200)
        self.time.advance(40.0)
        self.assertEqual(self.layer.stats["late_responses"], 0)
        self.assertEqual((self.layer.server, len(self.layer.completed)), ({}, 0))

    def test_timer_j_forgets_the_transaction_after_64_t1(self):
        self.layer.receive_request(make_request("OPTIONS"), PEER)
        self.tu.requests[0][0].respond_with(200)
        self.assertEqual((len(self.layer.server), len(self.layer.completed)), (0, 1),
                         "answered: kept as data, not as the transaction object")
        self.assertEqual(self.layer.counts()["server_non_invite"], 1)
        self.time.advance(31.9)
        self.layer.receive_request(make_request("OPTIONS"), PEER)
        self.assertEqual(len(self.tu.requests), 1, "absorbed until Timer J runs out")
        self.time.advance(0.2)
        self.assertEqual(len(self.layer.completed), 0)
        self.assertEqual(self.layer.counts()["server_non_invite"], 0)
        # Past Timer J the same request is new again; the ledger's idempotency key covers that.
        self.layer.receive_request(make_request("OPTIONS"), PEER)
        self.assertEqual(len(self.tu.requests), 2)

    def test_tu_that_never_answers_does_not_leak_the_transaction(self):
        self.layer.receive_request(make_request("MESSAGE"), PEER)
        self.time.advance(32.0 + UNANSWERED_SWEEP_S + 0.1)   # 64 x T1, then its sweep
        self.assertEqual(self.layer.server, {})

    def test_same_branch_other_sent_by_is_another_transaction(self):
        self.layer.receive_request(make_request("OPTIONS"), PEER)
        self.layer.receive_request(make_request("OPTIONS", via_host="203.0.113.9:5060"), PEER)
        self.assertEqual(len(self.tu.requests), 2)

    def test_rfc2543_request_without_magic_cookie_is_still_matched(self):
        self.layer.receive_request(make_request("OPTIONS", branch="old1"), PEER)
        self.tu.requests[0][0].respond_with(200)
        self.layer.receive_request(make_request("OPTIONS", branch="old1"), PEER)
        self.assertEqual(len(self.tu.requests), 1)
        self.assertEqual(self.wire.statuses(), [200, 200])

    def test_responses_of_one_transaction_share_one_to_tag(self):
        self.layer.receive_request(make_request("MESSAGE"), PEER)
        txn = self.tu.requests[0][0]
        txn.respond_with(180)
        txn.respond_with(200)
        tags = {m.headers.get("To").split("tag=")[1] for m in self.wire.messages()}
        self.assertEqual(len(tags), 1)

    def test_second_final_response_is_refused(self):
        self.layer.receive_request(make_request("MESSAGE"), PEER)
        txn = self.tu.requests[0][0]
        txn.respond_with(200)
        txn.respond_with(500)
        self.assertEqual(self.wire.statuses(), [200])
        self.assertEqual(self.layer.stats["late_responses"], 1)

    def test_completed_transactions_hold_nothing_the_collector_walks(self):
        for n in range(50):
            peer = tuple(list(PEER))       # a new address each time, as a socket gives
            self.layer.receive_request(make_request("MESSAGE", branch=f"z9hG4bK-c{n}"), peer)
        for txn, _ in self.tu.requests:
            txn.respond_with(200)
        self.tu.requests.clear()
        # Not even once: the young collection walks each object it tracks at least once,
        # and 32 s of them was most of what it walked on a loaded PS.
        kept = self.layer.completed._values
        self.assertEqual(len(kept), 50)
        self.assertEqual([entry for entry in kept.items() if gc.is_tracked(entry[0])
                          or gc.is_tracked(entry[1])], [])
        self.assertEqual([entry for entry in self.layer._by_branch.items()
                          if gc.is_tracked(entry[0]) or gc.is_tracked(entry[1])], [])

    def test_a_copy_of_an_answered_request_gets_the_response_where_it_came_from(self):
        self.layer.receive_request(make_request("MESSAGE"), PEER)
        self.tu.requests[0][0].respond_with(200)
        moved = (PEER[0], PEER[1] + 1)     # the same Via, from a rebound NAT port (rport)
        self.layer.receive_request(make_request("MESSAGE"), moved)
        self.assertEqual([(parse(data).status, addr) for data, addr in self.wire.sent],
                         [(200, PEER), (200, moved)])
        self.assertEqual(len(self.tu.requests), 1, "the TU saw it once")

    def test_cancel_of_an_answered_request_is_200_and_changes_nothing(self):
        self.layer.receive_request(make_request("MESSAGE"), PEER)
        self.tu.requests[0][0].respond_with(200)
        self.layer.receive_request(make_request("CANCEL"), PEER)
        self.assertEqual([(m.status, m.cseq[1]) for m in self.wire.messages()],
                         [(200, "MESSAGE"), (200, "CANCEL")])
        self.time.advance(33)
        self.layer.receive_request(make_request("CANCEL", branch="z9hG4bK-test-1", call_id="c2"),
                                   PEER)
        self.assertEqual(self.wire.statuses()[-1], 481, "past Timer J nothing matches")

    def test_full_table_counts_completed_transactions(self):
        layer = TransactionLayer(self.time.wheel, self.wire, self.tu, max_transactions=1)
        layer.receive_request(make_request("MESSAGE", branch="z9hG4bK-a"), PEER)
        self.tu.requests[0][0].respond_with(200)
        layer.receive_request(make_request("MESSAGE", branch="z9hG4bK-b"), PEER)
        self.assertEqual(len(self.tu.requests), 1)
        self.assertEqual(self.wire.statuses(), [200, 503])
        self.time.advance(32.1)
        layer.receive_request(make_request("MESSAGE", branch="z9hG4bK-b"), PEER)
        self.assertEqual(len(self.tu.requests), 2, "room again once Timer J ran out")

    def test_full_table_answers_503_with_retry_after(self):
        layer = TransactionLayer(self.time.wheel, self.wire, self.tu, max_transactions=1)
        layer.receive_request(make_request("MESSAGE", branch="z9hG4bK-a"), PEER)
        layer.receive_request(make_request("MESSAGE", branch="z9hG4bK-b"), PEER)
        self.assertEqual(len(self.tu.requests), 1)
        (refusal,) = self.wire.messages()
        self.assertEqual(refusal.status, 503)
        self.assertEqual(refusal.headers.get("Retry-After"), "5")


class InviteServerTransactionTests(unittest.TestCase):
    def setUp(self):
        self.time = ClockWheel(self)
        self.wire = Wire()
        self.tu = RecordingTU()
        self.layer = TransactionLayer(self.time.wheel, self.wire, self.tu)

    def invite(self):
        self.layer.receive_request(make_request("INVITE"), PEER)
        return self.tu.requests[-1][0]

    def ack(self, branch="z9hG4bK-test-1"):
        self.layer.receive_request(make_request("ACK", branch=branch), PEER)

    def test_100_trying_at_once(self):
        self.invite()
        self.assertEqual(self.wire.statuses(), [100])

    def test_error_final_retransmitted_by_timer_g_until_ack(self):
        txn = self.invite()
        self.wire.clear()
        txn.respond_with(486)
        # Timer G: T1, 2T1, 4T1, then capped at T2 = 4 s.
        self.time.advance(0.5)
        self.time.advance(1.0)
        self.time.advance(2.0)
        self.time.advance(4.0)
        self.assertEqual(self.wire.statuses(), [486] * 5)
        self.ack()
        self.assertEqual(txn.state, State.CONFIRMED)
        self.time.advance(8.0)
        self.assertEqual(self.wire.statuses(), [486] * 5, "ACK stopped Timer G")
        self.assertEqual(txn.state, State.TERMINATED, "Timer I (T4) ended it")
        self.assertEqual(self.tu.acks, [], "the ACK of a non-2xx belongs to the transaction")

    def test_timer_h_gives_up_without_ack(self):
        txn = self.invite()
        txn.respond_with(603)
        self.time.advance(32.1)
        self.assertEqual(txn.state, State.TERMINATED)
        self.assertEqual(self.layer.stats["ack_timeouts"], 1)
        self.assertEqual(self.layer.server, {})

    def test_2xx_retransmitted_until_the_ack_of_its_own_transaction(self):
        txn = self.invite()
        self.wire.clear()
        txn.respond_with(200)
        self.time.advance(1.5)
        self.assertEqual(self.wire.statuses(), [200, 200, 200])
        self.layer.receive_request(make_request("INVITE"), PEER)
        self.assertEqual(len(self.tu.requests), 1, "INVITE retransmission absorbed in Accepted")
        self.ack(branch="z9hG4bK-ack-of-2xx")
        self.assertEqual(len(self.tu.acks), 1)
        count = len(self.wire.sent)
        self.time.advance(10)
        self.assertEqual(len(self.wire.sent), count, "the ACK stopped the 2xx retransmission")
        self.time.advance(30)
        self.assertEqual(txn.state, State.TERMINATED, "Timer L")

    def test_cancel_of_a_pending_invite(self):
        txn = self.invite()
        self.layer.receive_request(make_request("CANCEL"), PEER)
        statuses = [(m.cseq[1], m.status) for m in self.wire.messages()]
        self.assertEqual(statuses, [("INVITE", 100), ("CANCEL", 200), ("INVITE", 487)])
        self.assertTrue(txn.final)
        self.assertEqual(len(self.tu.requests), 1, "CANCEL is the layer's, not the TU's")

    def test_cancel_without_a_transaction_is_481(self):
        self.layer.receive_request(make_request("CANCEL", branch="z9hG4bK-none"), PEER)
        self.assertEqual(self.wire.statuses(), [481])

    def test_cancel_after_the_final_changes_nothing(self):
        txn = self.invite()
        txn.respond_with(200)
        self.wire.clear()
        self.layer.receive_request(make_request("CANCEL"), PEER)
        self.assertEqual(self.wire.statuses(), [200])
        self.assertEqual(self.wire.messages()[0].cseq[1], "CANCEL")


class ClientTransactionTests(unittest.TestCase):
    def setUp(self):
        self.time = ClockWheel(self)
        self.wire = Wire()
        self.layer = TransactionLayer(self.time.wheel, self.wire, RecordingTU(),
                                      TimerSettings(0.5, 4.0, 5.0))
        self.responses = []
        self.timeouts = []

    def send(self, method="REFER"):
        request = make_request(method, branch="z9hG4bK-client-1")
        return self.layer.request(request, PEER, self.responses.append,
                                  lambda: self.timeouts.append(True))

    def reply(self, request, status):
        return parse(make_response(request, status, to_tag="peer").to_bytes())

    def test_timer_e_doubles_to_t2_and_timer_f_times_out_once(self):
        self.send()
        sent_at = []
        for tick in range(400):
            before = len(self.wire.sent)
            self.time.advance(0.1)
            if len(self.wire.sent) > before:
                sent_at.append(round((tick + 1) * 0.1, 1))
        self.assertEqual(sent_at[:6], [0.5, 1.5, 3.5, 7.5, 11.5, 15.5])
        self.assertEqual(self.timeouts, [True])
        self.assertEqual(self.layer.client, {})
        self.assertEqual(self.responses, [])

    def test_timer_f_fires_at_64_t1_with_no_retransmission_after_it(self):
        """Timers E and F are one timer, the last wait cut short: F is due at 32 s, not
        at the next E (35.5 s), and not a tick before 32 s."""
        self.send()
        sent_at, ended_at = [], None
        for tick in range(1, 400):
            before = len(self.wire.sent)
            self.time.advance(0.1)
            if len(self.wire.sent) > before:
                sent_at.append(round(tick * 0.1, 1))
            if self.timeouts and ended_at is None:
                ended_at = round(tick * 0.1, 1)
        self.assertEqual(sent_at, [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5])
        self.assertEqual((ended_at, self.timeouts), (32.0, [True]))
        self.assertEqual(len(self.time.wheel), 0, "no timer of the transaction is left")

    def test_final_response_stops_retransmission_and_is_delivered_once(self):
        txn = self.send()
        request = txn.request
        response = self.reply(request, 202)
        self.layer.receive_response(response, PEER)
        self.assertIsNone(txn.request, "a completed transaction lets go of its request")
        self.layer.receive_response(self.reply(request, 202), PEER)
        self.assertEqual(self.layer.stats["retransmissions_absorbed"], 1)
        self.time.advance(40)
        self.assertEqual(len(self.wire.sent), 1)
        self.assertEqual([r.status for r in self.responses], [202])
        self.assertEqual(self.timeouts, [])
        self.assertEqual(self.layer.client, {})
        self.assertEqual(len(self.layer.client_completed), 0, "Timer K ended it")

    def test_timer_k_absorbs_copies_for_t4_then_they_are_strays(self):
        txn = self.send()
        request = txn.request
        self.layer.receive_response(self.reply(request, 200), PEER)
        self.assertEqual((self.layer.client, len(self.layer.client_completed)), ({}, 1))
        self.assertEqual(self.layer.counts()["client_non_invite"], 1)
        self.time.advance(4.9)
        self.layer.receive_response(self.reply(request, 200), PEER)
        self.assertEqual(self.layer.stats["retransmissions_absorbed"], 1)
        self.time.advance(0.2)
        self.layer.receive_response(self.reply(request, 200), PEER)
        self.assertEqual(self.layer.stats["stray_responses"], 1)
        self.assertEqual([r.status for r in self.responses], [200], "delivered once")

    def test_provisional_moves_to_t2_interval(self):
        txn = self.send("MESSAGE")
        self.layer.receive_response(self.reply(txn.request, 180), PEER)
        self.time.advance(0.5)
        self.assertEqual(len(self.wire.sent), 2, "still retransmitting in Proceeding")
        self.time.advance(3.9)
        self.assertEqual(len(self.wire.sent), 2)
        self.time.advance(0.2)
        self.assertEqual(len(self.wire.sent), 3, "at T2 intervals")

    def test_invite_error_is_acked_within_the_transaction(self):
        txn = self.send("INVITE")
        request = txn.request
        self.layer.receive_response(self.reply(request, 486), PEER)
        self.layer.receive_response(self.reply(request, 486), PEER)
        sent = self.wire.messages()
        self.assertEqual([m.method for m in sent], ["INVITE", "ACK", "ACK"])
        ack = sent[1]
        self.assertEqual(ack.top_via.branch, "z9hG4bK-client-1")
        self.assertEqual(ack.cseq, (1, "ACK"))
        self.assertIn("tag=peer", ack.headers.get("To"))
        self.assertEqual([r.status for r in self.responses], [486])

    def test_stray_response_is_counted_and_dropped(self):
        self.layer.receive_response(self.reply(make_request("REFER", branch="z9hG4bK-x"), 200), PEER)
        self.assertEqual(self.layer.stats["stray_responses"], 1)
        self.assertIsInstance(self.reply(make_request(), 200), Response)


class BareCookieBranchTests(unittest.TestCase):
    """RFC 4475 "badbranch": a branch of only the magic cookie identifies no transaction."""

    def test_bare_cookie_falls_back_to_rfc2543_matching(self):
        time = ClockWheel(self)
        wire, tu = Wire(), RecordingTU(answer=200)
        layer = TransactionLayer(time.wheel, wire, tu)
        layer.receive_request(make_request("OPTIONS", branch="z9hG4bK", call_id="a@h"), PEER)
        layer.receive_request(make_request("OPTIONS", branch="z9hG4bK", call_id="b@h"), PEER)
        layer.receive_request(make_request("OPTIONS", branch="z9hG4bK", call_id="a@h"), PEER)
        self.assertEqual(len(tu.requests), 2, "two calls are two transactions; the repeat is absorbed")


class InviteStyleClientTests(unittest.TestCase):
    """RECEIVE runs as an INVITE transaction: a person may answer after Timer B."""

    def test_provisional_suspends_timer_b_for_receive(self):
        time = ClockWheel(self)
        wire, responses, timeouts = Wire(), [], []
        layer = TransactionLayer(time.wheel, wire, RecordingTU())
        request = make_request("RECEIVE", branch="z9hG4bK-receive")
        txn = layer.request(request, PEER, responses.append, lambda: timeouts.append(True))
        self.assertTrue(txn.invite)
        layer.receive_response(parse(make_response(request, 180, to_tag="p").to_bytes()), PEER)
        time.advance(40)
        self.assertEqual(timeouts, [], "Proceeding does not time out at Timer B")
        layer.receive_response(parse(make_response(request, 200, to_tag="p").to_bytes()), PEER)
        self.assertEqual([r.status for r in responses], [180, 200])

    def test_unanswered_receive_times_out_at_timer_b(self):
        time = ClockWheel(self)
        timeouts = []
        layer = TransactionLayer(time.wheel, Wire(), RecordingTU())
        layer.request(make_request("RECEIVE", branch="z9hG4bK-r2"), PEER, lambda r: None,
                      lambda: timeouts.append(True))
        time.advance(32.1)
        self.assertEqual(timeouts, [True])

"""Credit transfer over real UDP, one test per outcome (issue 5, DESIGN section 6)."""

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mpay import e164
from mpay.payment.receipt import SIGNATURE_HEADER
from mpay.payment.transfer import ANONYMOUS, ANONYMOUS_URI
from mpay.sim.device import DeviceError

from mpay.sip.stream import address_of
from tests.flow import MpayFixture

PAYER = "+886912345678"
PAYEE = "+886987654321"
STRANGER = "+886911222333"      # a valid number that never enrolled
TOP_UP = 1_000


class TransferTests(unittest.TestCase):
    settings: tuple = ("ps.transfer_timer_a_s=1", "as.timer_f_s=0.5")
    transport = "UDP"

    @defer.inlineCallbacks
    def setUp(self):
        self.mpay = MpayFixture(self, *self.settings, transport=self.transport)
        yield self.mpay.start()
        self.ledger = self.mpay.top.ledger
        self.payer, self.payer_wire = yield self.mpay.ready(PAYER)
        self.payee, self.payee_wire = yield self.mpay.ready(PAYEE)
        yield self.ledger.cash_in(PAYER, TOP_UP, f"topup-{PAYER}")
        self.addCleanup(self.assertNoTransferLeft)     # runs before the fixture stops

    def assertNoTransferLeft(self):
        """A transfer answered (200, 202, a refusal, a 503) is forgotten: the manhole's
        list of live transfers holds only those in flight."""
        self.assertEqual(self.mpay.ps_core.transfer.active, {})

    @defer.inlineCallbacks
    def test_devices_are_bound_over_the_transport_they_use(self):
        binding = yield self.mpay.ps_core.registrar.locations.lookup(PAYEE)
        self.assertEqual(binding.transport, self.transport)
        flows = self.mpay.top.endpoints["ps"].flows
        self.assertEqual({flow.transport for flow in flows.values()},
                         set() if self.transport == "UDP" else {self.transport})
        self.assertEqual(len(flows), 0 if self.transport == "UDP" else 2)   # payer and payee

    @defer.inlineCallbacks
    def balances(self):
        payer = yield self.ledger.balance(PAYER)
        payee = yield self.ledger.balance(PAYEE)
        return payer.balance, payee.balance

    def queued(self):
        """The journal ids of the notices queued for the payee, in the ledger."""
        waiting = self.ledger.queued_notices(PAYEE)
        return waiting.addCallback(lambda notices: [n.journal_id for n in notices])

    @defer.inlineCallbacks
    def refused(self, attempt, expected):
        try:
            yield attempt
        except DeviceError as exc:
            self.assertIn(expected, str(exc))
        else:
            self.fail(f"expected {expected}")
        self.assertEqual((yield self.balances()), (TOP_UP, 0), "no money moved")

    def keep_sent(self):
        """Record the payer's requests as sent to the PS: (the list, send_request)."""
        sent = []
        original = self.payer.authenticate

        def keep(request):
            sent.append(original(request))
            return sent[-1]

        self.payer.authenticate = keep
        return sent, self.payer.endpoint.send_request

    def resend(self, request, send):
        """The lost-response case: the same payer, Call-ID and CSeq in a new transaction
        (new branch), with a fresh authenticator (the old one would rightly be a replay)."""
        return send(self.payer.resend(request), self.payer.ps_addr)

    @defer.inlineCallbacks
    def test_credit_transfer_confirmed_gets_200_with_signed_receipt(self):
        response, receipt = yield self.payer.transfer(PAYEE, 300)
        self.assertEqual((response.status, response.reason), (200, "OK"))
        self.assertEqual((receipt.payer, receipt.payee, receipt.amount, receipt.currency),
                         (PAYER, PAYEE, 300, "TWD"))
        self.assertEqual((yield self.balances()), (700, 300))
        (notice,) = self.payee.notices
        self.assertEqual((notice["from"], notice["amount"]), (PAYER, 300))
        (entry,) = [e for e in (yield self.ledger.statement(PAYER)) if e.kind == "transfer"]
        self.assertEqual(entry.id, receipt.journal_id)
        self.assertEqual(len(entry.payer_signature), 64, "the payer's signature is kept")
        audit = yield self.ledger.audit()
        self.assertTrue(audit.ok, audit)

    def test_credit_transfer_unknown_payee_gets_404(self):
        return self.refused(self.payer.transfer(STRANGER, 100), "404 Unknown Payee")

    @defer.inlineCallbacks
    def test_a_fault_in_the_ps_is_a_503_that_moves_nothing(self):
        def broken(number):
            raise RuntimeError("a bug")

        self.patch(self.mpay.ps_core.transfer.device_keys, "cached_record", broken)
        yield self.refused(self.payer.transfer(PAYEE, 100), "503 Ledger Unavailable")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_credit_transfer_short_balance_gets_402(self):
        return self.refused(self.payer.transfer(PAYEE, TOP_UP + 1), "402 Insufficient Credit")

    @defer.inlineCallbacks
    def test_credit_transfer_payee_offline_gets_202_then_notice_on_register(self):
        yield self.payee.register(expires_s=0)
        response, receipt = yield self.payer.transfer(PAYEE, 250)
        self.assertEqual((response.status, response.reason), (202, "Payee Offline, Notice Queued"))
        self.assertEqual(receipt.amount, 250, "the money moved: the receipt says so")
        self.assertEqual((yield self.balances()), (750, 250))
        self.assertEqual(self.payee.notices, [])
        yield self.payee.register()
        yield self.mpay.eventually(lambda: len(self.payee.notices) == 1)
        self.assertEqual(self.payee.notices[0]["amount"], 250)

    @defer.inlineCallbacks
    def test_credit_transfer_queued_notice_survives_a_ps_restart(self):
        """202, the PS stops, a new one starts on the same ledger: the payee is still told."""
        yield self.payee.register(expires_s=0)
        response, receipt = yield self.payer.transfer(PAYEE, 250)
        self.assertEqual((response.status, response.reason), (202, "Payee Offline, Notice Queued"))
        yield self.mpay.restart()
        self.ledger = self.mpay.top.ledger
        self.assertEqual((yield self.queued()), [receipt.journal_id])
        yield self.payee.register()
        yield self.mpay.eventually(lambda: len(self.payee.notices) == 1)
        (notice,) = self.payee.notices          # its receipt verified with the pinned PS key
        self.assertEqual((notice["journal_id"], notice["from"], notice["amount"]),
                         (receipt.journal_id, PAYER, 250))
        self.assertEqual(notice["from_header"], e164.sip_uri(PAYER, self.mpay.config["server"]["domain"]))
        yield self.mpay.eventually(lambda: self.queued().addCallback(lambda ids: ids == []))
        self.assertEqual((yield self.balances()), (750, 250))

    @defer.inlineCallbacks
    def test_queued_notice_stays_queued_until_the_payee_answers_2xx(self):
        yield self.payee.register(expires_s=0)
        _, receipt = yield self.payer.transfer(PAYEE, 40)
        on_notice = self.payee.handlers["MESSAGE"]
        refused = []

        def busy(txn, request):
            refused.append(request)
            txn.respond_with(486, "Busy Here")

        self.payee.handlers["MESSAGE"] = busy
        yield self.payee.register()
        yield self.mpay.eventually(lambda: refused)
        self.assertEqual((yield self.queued()), [receipt.journal_id], "not answered 2xx: kept")
        self.payee.handlers["MESSAGE"] = on_notice
        yield self.payee.register()
        yield self.mpay.eventually(lambda: len(self.payee.notices) == 1)
        self.assertEqual(self.payee.notices[0]["journal_id"], receipt.journal_id)
        yield self.mpay.eventually(lambda: self.queued().addCallback(lambda ids: ids == []))

    @defer.inlineCallbacks
    def test_credit_transfer_payee_silent_until_timer_a_gets_202(self):
        self.payee.handlers["MESSAGE"] = lambda txn, request: None   # online, never confirms
        response, _ = yield self.payer.transfer(PAYEE, 100)
        self.assertEqual(response.status, 202)
        self.assertEqual((yield self.balances()), (900, 100))

    @defer.inlineCallbacks
    def test_notice_confirmed_after_timer_a_leaves_the_queue(self):
        on_notice, held = self.payee.handlers["MESSAGE"], []
        self.payee.handlers["MESSAGE"] = lambda txn, request: held.append((txn, request))
        response, receipt = yield self.payer.transfer(PAYEE, 100)
        self.assertEqual(response.status, 202)
        self.assertEqual((yield self.queued()), [receipt.journal_id])
        on_notice(*held[0])                     # the payee answers 200, late
        yield self.mpay.eventually(lambda: self.queued().addCallback(lambda ids: ids == []))
        self.assertEqual(self.payee.notices[0]["journal_id"], receipt.journal_id)

    @defer.inlineCallbacks
    def test_concealed_payer_is_never_shown_to_the_payee(self):
        response, receipt = yield self.payer.transfer(PAYEE, 120, conceal=True)
        self.assertEqual(response.status, 200)
        self.assertEqual(receipt.payer, PAYER, "the payer's own receipt names the payer")
        (notice,) = self.payee.notices
        self.assertEqual(notice["from"], ANONYMOUS)
        self.assertEqual(notice["from_header"], ANONYMOUS_URI)
        received = [data for direction, data in self.payee_wire.raw if direction == "<"]
        self.assertTrue(received)
        for data in received:
            self.assertNotIn(PAYER[1:].encode(), data, "the payer's number crossed to the payee")

    @defer.inlineCallbacks
    def test_credit_transfers_committed_together_share_one_receipt_signature(self):
        """Receipts asked in one turn are signed as one tree (v2); the payer's device and
        the payee's each check theirs against the pinned PS key, the concealed payer's
        copy for the payee included."""
        signer = self.mpay.ps_core.transfer.receipt_signer
        turn = task.Clock()           # the signer's next turn comes when the test says
        signer.reactor = turn
        paid = [self.payer.transfer(PAYEE, 10), self.payer.transfer(PAYEE, 20, conceal=True),
                self.payer.transfer(PAYEE, 30)]
        # (the signer is compiled: its methods cannot be wrapped, so its queue is watched)
        yield self.mpay.eventually(lambda: sum(len(b) for b, _, _ in signer._asked) == 4)
        turn.advance(0)
        answers = yield defer.gatherResults(paid)
        self.assertEqual((signer.groups, signer.receipts), (1, 4))
        for response, receipt in answers:
            self.assertEqual((response.status, receipt.payer), (200, PAYER))
            self.assertTrue(response.headers.get("Mpay-Receipt").startswith("v2 "))
            self.assertIn("/4; path=", response.headers.get("Mpay-Receipt"))
        self.assertEqual(sorted((n["from"], n["amount"]) for n in self.payee.notices),
                         [(PAYER, 10), (PAYER, 30), (ANONYMOUS, 20)])
        self.assertEqual((yield self.balances()), (TOP_UP - 60, 60))

    @defer.inlineCallbacks
    def test_retransmitted_request_debits_once(self):
        write = self.payer.endpoint.write

        def three_times(data, addr):
            for _ in range(3):
                write(data, addr)

        self.payer.endpoint.write = three_times
        response, receipt = yield self.payer.transfer(PAYEE, 200)
        self.assertEqual(response.status, 200)
        self.assertEqual((yield self.balances()), (800, 200))
        self.assertEqual(len(self.payee.notices), 1)

    @defer.inlineCallbacks
    def test_request_resent_after_its_transaction_ended_replays_the_receipt(self):
        sent, original = self.keep_sent()
        _, first = yield self.payer.transfer(PAYEE, 50)
        again = yield self.resend(sent[-1], original)
        self.assertEqual(again.status, 200)
        self.assertEqual((yield self.balances()), (950, 50), "one debit")
        self.assertEqual(len(self.payee.notices), 1, "the payee is not told twice")
        self.assertIsNotNone(first)

    @defer.inlineCallbacks
    def test_bad_signature_gets_403_and_no_movement(self):
        original = self.payer.authenticate

        def forge(request):
            request.headers.set(SIGNATURE_HEADER, "ed25519 " + "A" * 86)
            return original(request)

        self.payer.authenticate = forge
        checks = self.mpay.ps_core.transfer.signatures
        for _ in range(400):                  # the PS's signature process is ready soon
            if checks._link is not None and checks._link.ready:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        yield self.refused(self.payer.transfer(PAYEE, 100), "403 Payer Signature Invalid")
        self.assertEqual(checks.inline, 0, "refused by the signature process, not the PS")
        self.assertGreaterEqual(checks.in_child, 1)

    @defer.inlineCallbacks
    def test_a_payer_enrolled_anew_is_not_refused_for_its_new_key(self):
        yield self.payer.transfer(PAYEE, 10)           # the PS now has the old key cached
        again, _ = self.mpay.device(PAYER)              # a new phone: new keys, same number
        yield task.deferLater(reactor, 1.0, lambda: None)   # the first enrolment's Timer F
        yield again.enroll()
        yield again.get_ticket()
        response, receipt = yield again.transfer(PAYEE, 20)
        self.assertEqual((response.status, receipt.amount), (200, 20))
        keys = self.mpay.ps_core.transfer.device_keys
        self.assertEqual(keys.misses, 2, "the cached old key failed, the new one was read")

    @defer.inlineCallbacks
    def test_bad_amounts_get_400(self):
        for amount in (0, -5, 1.5, "10", True, 10**13):
            yield self.refused(self.payer.transfer(PAYEE, amount), "400 Invalid Amount")

    @defer.inlineCallbacks
    def test_resent_request_with_the_payee_now_offline_gets_202_not_200(self):
        """After a crash the PS cannot know the payee heard: 200 would claim a confirmation."""
        sent, original = self.keep_sent()
        _, first = yield self.payer.transfer(PAYEE, 70)
        yield self.payee.register(expires_s=0)
        again = yield self.resend(sent[-1], original)
        self.assertEqual((again.status, again.reason), (202, "Payee Offline, Notice Queued"))
        self.assertIn(f"journal_id\": {first.journal_id}".encode(), again.body)
        self.assertEqual((yield self.balances()), (930, 70), "one debit")
        self.assertEqual((yield self.queued()), [first.journal_id], "the payee is told again")


class TransferOverTCPTests(TransferTests):
    transport = "TCP"


class TransferOverTLSTests(TransferTests):
    transport = "TLS"


class ReconnectTests(unittest.TestCase):
    """A device on a stream whose connection the PS loses registers again over a new one."""

    transport = "TCP"

    @defer.inlineCallbacks
    def test_a_payee_whose_connection_dropped_is_paid_over_its_new_one(self):
        mpay = MpayFixture(self, transport=self.transport)
        yield mpay.start()
        payer, _ = yield mpay.ready(PAYER)
        payee, _ = yield mpay.ready(PAYEE)
        payee.stay_registered()
        yield mpay.top.ledger.cash_in(PAYER, TOP_UP, f"topup-{PAYER}")
        locations = mpay.ps_core.registrar.locations
        before = yield locations.lookup(PAYEE)
        ps = mpay.top.endpoints["ps"]
        [payee_flow] = [flow for flow in ps.flows.values() if flow[1] == before.port]
        yield payee_flow.connection.close()          # the PS side drops it

        @defer.inlineCallbacks
        def bound_again():
            binding = yield locations.lookup(PAYEE)
            return binding.port != before.port and ps.live(address_of(binding)) is not None

        yield mpay.eventually(bound_again)
        response, receipt = yield payer.transfer(PAYEE, 100)
        self.assertEqual(response.status, 200, "delivered over the new connection")
        self.assertEqual([notice["amount"] for notice in payee.notices], [100])


class ReconnectOverTLSTests(ReconnectTests):
    transport = "TLS"


class RequireTLSTests(unittest.TestCase):
    """``ps.require_tls``: registering works over any transport, paying only over TLS."""

    @defer.inlineCallbacks
    def pay_over(self, transport):
        mpay = MpayFixture(self, "ps.require_tls=true", transport=transport)
        yield mpay.start()
        payer, _ = yield mpay.ready(PAYER)
        yield mpay.ready(PAYEE)
        yield mpay.top.ledger.cash_in(PAYER, TOP_UP, f"topup-{PAYER}")
        try:
            response, _ = yield payer.transfer(PAYEE, 100)
        except DeviceError as exc:
            response = str(exc)
        balance = yield mpay.top.ledger.balance(PAYER)
        return response, balance.balance

    @defer.inlineCallbacks
    def test_a_payment_in_clear_gets_403_and_moves_nothing(self):
        for transport in ("UDP", "TCP"):
            answer, balance = yield self.pay_over(transport)
            self.assertIn("403 TLS Required", answer)
            self.assertEqual(balance, TOP_UP)

    @defer.inlineCallbacks
    def test_a_payment_over_tls_goes_through(self):
        response, balance = yield self.pay_over("TLS")
        self.assertEqual(response.status, 200)
        self.assertEqual(balance, TOP_UP - 100)

"""The PS's fixed-shape JSON bodies are formatted by hand: they must be json.dumps's bytes."""

import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from mpay.payment import transfer
from mpay.payment.body import json_scalar
from mpay.payment import receipt_groups
from mpay.payment.receipt import Receipt, sign_body

KEY = Ed25519PrivateKey.generate()

FUZZ = settings(max_examples=300, deadline=None)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text())


class JSONScalarTests(unittest.TestCase):
    @FUZZ
    @given(SCALARS)
    def test_a_scalar_is_written_as_json_dumps_writes_it(self, value):
        self.assertEqual(json_scalar(value), json.dumps(value))

    def test_what_the_payment_server_writes(self):
        for value, written in ((1, "1"), (-5, "-5"), (1764600000.25, "1764600000.25"),
                               ("+886912000001", '"+886912000001"'), ("caf\u00e9\"", '"caf\\u00e9\\""'),
                               (None, "null"), (True, "true"), (float("nan"), "NaN")):
            self.assertEqual(json_scalar(value), written)


class BodyTests(unittest.TestCase):
    @FUZZ
    @given(st.integers(), st.text(), st.text(), st.integers(), st.text(), st.floats(), st.text())
    def test_the_receipt_is_canonical_json(self, journal_id, payer, payee, amount, currency,
                                           created, digest):
        receipt = Receipt(journal_id, payer, payee, amount, currency, created, digest)
        self.assertEqual(receipt.encode(), json.dumps(
            receipt._asdict(), sort_keys=True, separators=(",", ":")).encode())

    @FUZZ
    @given(st.integers(), SCALARS, st.integers(), st.text(), st.floats(), st.text())
    def test_the_payees_notice_is_json_dumps_of_its_fields(self, journal_id, payer, amount,
                                                          currency, created, receipt):
        fields = {"journal_id": journal_id, "from": payer, "amount": amount,
                  "currency": currency, "created": created, "receipt": receipt}
        self.assertEqual(transfer._NOTICE_JSON % tuple(map(json_scalar, fields.values())),
                         json.dumps(fields))

    @FUZZ
    @given(st.integers(min_value=1), st.text(), st.text(), st.integers(), st.text(),
           st.floats(allow_nan=False), st.booleans(), st.integers(min_value=1, max_value=16))
    def test_the_notice_as_sent_is_json_dumps_of_its_fields(self, journal_id, payer, payee,
                                                           amount, currency, created, conceal,
                                                           group):
        receipt = Receipt(journal_id, payer, payee, amount, currency, created, "ZGlnZXN0")
        bodies = [receipt.encode()] * group           # a turn's group, v1 when alone
        signed = receipt_groups.group_sign(KEY, bodies) if group > 1 else [
            sign_body(KEY, bodies[0])]
        notice = transfer.CreditTransfer.notice(receipt, conceal, signed[-1])
        self.assertEqual(notice, json.dumps({
            "journal_id": journal_id, "from": "anonymous" if conceal else payer,
            "amount": amount, "currency": currency, "created": created,
            "receipt": signed[-1]}).encode())

    @FUZZ
    @given(st.integers(), st.integers(), st.one_of(st.none(), st.integers()))
    def test_the_payers_result_is_json_dumps_of_its_fields(self, journal_id, amount, balance):
        fields = {"journal_id": journal_id, "amount": amount, "balance": balance}
        self.assertEqual(transfer._RESULT_JSON % tuple(map(json_scalar, fields.values())),
                         json.dumps(fields))

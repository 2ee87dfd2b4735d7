"""The PS's fixed-shape JSON bodies are formatted by hand: they must be json.dumps's bytes."""

import json

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from mpay.payment import transfer
from mpay.payment.body import json_scalar
from mpay.payment.receipt import Receipt

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
    @given(st.integers(), st.integers(), st.one_of(st.none(), st.integers()))
    def test_the_payers_result_is_json_dumps_of_its_fields(self, journal_id, amount, balance):
        fields = {"journal_id": journal_id, "amount": amount, "balance": balance}
        self.assertEqual(transfer._RESULT_JSON % tuple(map(json_scalar, fields.values())),
                         json.dumps(fields))

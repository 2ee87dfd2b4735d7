"""Numbers as account ids: normalisation table, refusals with reasons, URIs."""

import phonenumbers
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from mpay.e164 import (MAX_INPUT_CHARS, InvalidNumber, is_e164, normalise, number_from_uri,
                       sip_uri)

VALID = [
    # (typed, default region, E.164)
    ("0912345678", "TW", "+886912345678"),
    ("0912-345-678", "TW", "+886912345678"),
    ("0912 345 678", "TW", "+886912345678"),
    (" (02) 2345-6789 ", "TW", "+886223456789"),
    ("02-2345-6789", "TW", "+886223456789"),
    ("886912345678", "TW", "+886912345678"),
    ("+886 912 345 678", "TW", "+886912345678"),
    ("+886 912 345 678", "US", "+886912345678"),
    ("002 886 912 345 678", "TW", "+886912345678"),    # TW's own international prefix
    ("00886912345678", "TW", "+886912345678"),         # the ITU prefix most people type
    ("00 1 201 555 0123", "TW", "+12015550123"),
    ("０９１２３４５６７８", "TW", "+886912345678"),      # full-width digits
    ("(201) 555-0123", "US", "+12015550123"),
    ("201.555.0123", "US", "+12015550123"),
    ("1 201 555 0123", "US", "+12015550123"),
    ("+1 (201) 555-0123", "US", "+12015550123"),
    ("011 886 912 345 678", "US", "+886912345678"),
    ("+12015550123", "TW", "+12015550123"),
    ("+886912345678", "XX", "+886912345678"),          # region unused when + is given
]

INVALID = [
    # (typed, default region, reason)
    ("", "TW", "empty"),
    ("   ", "TW", "empty"),
    ("hello", "TW", "not a number"),
    ("+", "TW", "not a number"),
    ("12345", "TW", "too short"),
    ("911", "US", "too short"),
    ("091234567", "TW", "invalid for region TW"),
    ("09123456789", "TW", "invalid for region TW"),
    ("(555) 123-4567", "US", "invalid for region US"),
    ("+1 201 555 01234567", "TW", "too long"),
    ("+999 1234567", "TW", "unknown country code"),
    ("+49 2010 0000000000", "TW", "too long for E.164 (15 digits at most)"),
    ("0912345678 ext. 5", "TW", "extensions are not accepted"),
    ("0912345678", "XX", "unknown region XX: write the number with +country code"),
    ("1" * (MAX_INPUT_CHARS + 1), "TW", "too long to be a telephone number"),
]


class NormaliseTests(unittest.TestCase):

    def test_valid_numbers_become_e164(self):
        for typed, region, expected in VALID:
            with self.subTest(typed=typed, region=region):
                self.assertEqual(normalise(typed, region), expected)

    def test_invalid_numbers_are_refused_with_a_reason(self):
        for typed, region, reason in INVALID:
            with self.subTest(typed=typed, region=region):
                with self.assertRaises(InvalidNumber) as caught:
                    normalise(typed, region)
                self.assertEqual(caught.exception.reason, reason)
                self.assertEqual(str(caught.exception), reason)

    def test_invalid_number_is_a_value_error(self):
        self.assertRaises(ValueError, normalise, "hello", "TW")

    def test_refusal_is_repeatable(self):
        """Refusals are cached; the second one must still raise."""
        for _ in range(2):
            self.assertRaises(InvalidNumber, normalise, "12345", "TW")

    def test_not_a_string(self):
        self.assertRaises(InvalidNumber, normalise, 912345678, "TW")


REGIONS = st.sampled_from(["TW", "US", "GB", "DE", "JP", "XX"])
PHONE_ALPHABET = "0123456789+-() .x#*ext０１２"


class NormalisePropertyTests(unittest.TestCase):

    @settings(max_examples=300, deadline=None)
    @given(text=st.one_of(st.text(max_size=80), st.text(PHONE_ALPHABET, max_size=24)),
           region=REGIONS)
    def test_anything_gives_valid_e164_or_invalid_number(self, text, region):
        try:
            number = normalise(text, region)
        except InvalidNumber as exc:
            self.assertTrue(exc.reason)
            return
        self.assertTrue(is_e164(number), number)
        self.assertTrue(phonenumbers.is_valid_number(phonenumbers.parse(number)))
        self.assertEqual(normalise(number, region), number)   # idempotent

    @settings(max_examples=200, deadline=None)
    @given(text=st.text(max_size=40))
    def test_number_from_uri_never_raises_anything_else(self, text):
        for uri in (text, "sip:" + text, "tel:" + text):
            try:
                number = number_from_uri(uri)
            except InvalidNumber:
                continue
            self.assertTrue(is_e164(number))


class IsE164Tests(unittest.TestCase):

    def test_accepts_normalised_numbers(self):
        for text in ("+886912345678", "+12015550123", "+8001234567", "+123456789012345"):
            self.assertTrue(is_e164(text), text)

    def test_refuses_everything_else(self):
        for text in ("886912345678", "+0886912345678", "+12345", "+1234567890123456",
                     "+886 912345678", "+886912345678\n", "+８８６912345678", "", None, 886):
            self.assertFalse(is_e164(text), repr(text))


class URITests(unittest.TestCase):

    def test_sip_uri_of_an_account(self):
        self.assertEqual(sip_uri("+886912345678", "mpay.test"),
                         "sip:+886912345678@mpay.test;user=phone")

    def test_sip_uri_refuses_unnormalised_number_or_bad_domain(self):
        self.assertRaises(InvalidNumber, sip_uri, "0912345678", "mpay.test")
        for domain in ("", "a@b", "mpay.test;x=1"):
            self.assertRaises(ValueError, sip_uri, "+886912345678", domain)

    def test_number_from_uri_round_trips(self):
        self.assertEqual(number_from_uri(sip_uri("+886912345678", "mpay.test")),
                         "+886912345678")

    def test_number_from_uri_forms(self):
        for uri in ("sip:+886912345678@mpay.test;user=phone",
                    "sip:+886912345678@mpay.test",
                    "SIPS:+886912345678@192.0.2.1:5061;user=phone",
                    "<sip:+886912345678@mpay.test;user=phone>",
                    "tel:+886912345678",
                    "tel:+886-912-345-678",
                    "tel:+886912345678;isub=1"):
            with self.subTest(uri=uri):
                self.assertEqual(number_from_uri(uri), "+886912345678")

    def test_number_from_uri_refusals(self):
        for uri in ("sip:alice@mpay.test",               # not a number
                    "sip:mpay.test",                     # no user part
                    "sip:0912345678@mpay.test",          # national: ambiguous
                    "tel:0912345678;phone-context=+886",  # local tel: we do not guess
                    "sip:+886912345678:secret@mpay.test",
                    "sip:+88691234567@mpay.test",        # well formed but not a valid number
                    "http://mpay.test/+886912345678",
                    "+886912345678",
                    "sip:+886912345678@bad host"):
            with self.subTest(uri=uri):
                self.assertRaises(InvalidNumber, number_from_uri, uri)

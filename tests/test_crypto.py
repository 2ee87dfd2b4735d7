"""AEAD envelope, key rings and key files, signatures, and the enrolment key agreement."""

import os
import stat

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from mpay.auth import crypto, keyfiles, keyagreement as ka
from mpay.auth.crypto import (
    AeadKey, BadSignature, CryptoError, DecodeError, KeyRing, OpenFailed,
    UnknownKeyId,
)

FUZZ = settings(max_examples=300, deadline=None)
NUMBER = "+886912345678"
PURPOSE = b"mpay-test-v1"


class EnvelopeTests(unittest.TestCase):
    def setUp(self):
        self.key = AeadKey(crypto.generate_key())

    def test_round_trip_and_layout(self):
        sealed = self.key.seal(PURPOSE, b"hello", b"ad")
        self.assertEqual(len(sealed), crypto.ENVELOPE_OVERHEAD_BYTES + 5)
        self.assertEqual(sealed[0], crypto.ENVELOPE_VERSION)
        self.assertEqual(sealed[1:5], self.key.key_id)
        self.assertEqual(self.key.open(PURPOSE, sealed, b"ad"), b"hello")

    def test_random_nonce_makes_every_seal_different(self):
        self.assertNotEqual(self.key.seal(PURPOSE, b"x"), self.key.seal(PURPOSE, b"x"))

    def test_blob_of_one_purpose_is_not_accepted_as_another(self):
        sealed = self.key.seal(b"mpay-ticket-v1", b"x")
        self.assertRaises(OpenFailed, self.key.open, b"mpay-authenticator-v1", sealed)

    def test_associated_data_is_bound(self):
        sealed = self.key.seal(PURPOSE, b"x", b"+886912345678")
        self.assertRaises(OpenFailed, self.key.open, PURPOSE, sealed, b"+886912345679")

    def test_flipped_ciphertext_bit_fails(self):
        sealed = bytearray(self.key.seal(PURPOSE, b"payload"))
        sealed[-20] ^= 1
        self.assertRaises(OpenFailed, self.key.open, PURPOSE, bytes(sealed))

    def test_unknown_version_is_a_decode_error(self):
        sealed = self.key.seal(PURPOSE, b"x")
        self.assertRaises(DecodeError, self.key.open, PURPOSE, b"\x02" + sealed[1:])

    def test_short_envelope_is_a_decode_error(self):
        sealed = self.key.seal(PURPOSE, b"")
        self.assertRaises(DecodeError, self.key.open, PURPOSE, sealed[:-1])

    def test_key_id_is_derived_and_stable(self):
        secret = bytes(range(32))
        self.assertEqual(AeadKey(secret).key_id, crypto.derive_key_id(secret))
        self.assertEqual(len(AeadKey(secret).key_id), crypto.KEY_ID_BYTES)
        self.assertNotIn(secret.hex(), repr(AeadKey(secret)))

    def test_wrong_key_length_is_refused(self):
        self.assertRaises(ValueError, AeadKey, b"short")

    def test_key_refuses_beyond_its_seal_budget(self):
        self.key.seals = crypto.AEAD_MAX_SEALS_PER_KEY
        self.assertRaises(crypto.KeyExhausted, self.key.seal, PURPOSE, b"x")


class KeyRingTests(unittest.TestCase):
    def test_rotation_old_key_id_still_opens(self):
        old = crypto.generate_key()
        before = KeyRing([old])
        sealed_old = before.seal(PURPOSE, b"old")
        after = KeyRing([crypto.generate_key(), old])
        self.assertEqual(after.open(PURPOSE, sealed_old), b"old")
        sealed_new = after.seal(PURPOSE, b"new")
        self.assertEqual(sealed_new[1:5], after.current.key_id)
        self.assertNotEqual(after.current.key_id, crypto.derive_key_id(old))
        self.assertRaises(UnknownKeyId, before.open, PURPOSE, sealed_new)

    def test_retired_key_no_longer_opens(self):
        old, new = crypto.generate_key(), crypto.generate_key()
        sealed = KeyRing([old]).seal(PURPOSE, b"x")
        self.assertRaises(UnknownKeyId, KeyRing([new]).open, PURPOSE, sealed)

    def test_empty_and_duplicate_rings_are_refused(self):
        key = crypto.generate_key()
        self.assertRaises(ValueError, KeyRing, [])
        self.assertRaises(ValueError, KeyRing, [key, key])

    def test_device_key_at_rest_is_bound_to_its_number(self):
        master, k = KeyRing.generate(), crypto.generate_key()
        blob = crypto.seal_device_key(master, NUMBER, k)
        self.assertEqual(crypto.open_device_key(master, NUMBER, blob), k)
        self.assertRaises(OpenFailed, crypto.open_device_key, master, "+886912345679", blob)


class SignatureTests(unittest.TestCase):
    def setUp(self):
        self.key = crypto.generate_signing_key()

    def test_sign_verify(self):
        signature = crypto.sign(self.key, PURPOSE, b"message")
        crypto.verify_signature(self.key.public_key(), PURPOSE, b"message", signature)

    def test_signature_is_bound_to_purpose_and_message(self):
        signature = crypto.sign(self.key, PURPOSE, b"message")
        public = self.key.public_key()
        self.assertRaises(BadSignature, crypto.verify_signature, public, b"other-v1", b"message",
                          signature)
        self.assertRaises(BadSignature, crypto.verify_signature, public, PURPOSE, b"messagf",
                          signature)
        self.assertRaises(BadSignature, crypto.verify_signature, public, PURPOSE, b"message",
                          signature[:-1])

    @FUZZ
    @given(message=st.binary(max_size=300))
    def test_libsodium_and_openssl_agree(self, message):
        """Signing and checking are libsodium's; keys and the wire form must stay OpenSSL's."""
        signature = crypto.sign(self.key, PURPOSE, message)
        labelled = bytes((len(PURPOSE),)) + PURPOSE + message
        self.assertEqual(signature, self.key.sign(labelled))      # Ed25519 is deterministic
        self.key.public_key().verify(signature, labelled)
        crypto.verify_raw(crypto.public_key_raw(self.key.public_key()), PURPOSE, message,
                          self.key.sign(labelled))

    @FUZZ
    @given(bit=st.integers(min_value=0, max_value=8 * crypto.ED25519_SIGNATURE_BYTES - 1))
    def test_any_flipped_bit_is_refused(self, bit):
        signature = bytearray(crypto.sign(self.key, PURPOSE, b"message"))
        signature[bit // 8] ^= 1 << (bit % 8)
        self.assertRaises(BadSignature, crypto.verify_raw,
                          crypto.public_key_raw(self.key.public_key()), PURPOSE, b"message",
                          bytes(signature))

    def test_raw_key_of_the_wrong_size_or_small_order(self):
        signature = crypto.sign(self.key, PURPOSE, b"m")
        self.assertRaises(DecodeError, crypto.verify_raw, b"\x00" * 31, PURPOSE, b"m", signature)
        identity = b"\x01" + b"\x00" * 31          # the neutral point: every signature "fits"
        self.assertRaises(BadSignature, crypto.verify_raw, identity, PURPOSE, b"m",
                          b"\x01" + b"\x00" * 63)

    def test_public_key_text_form(self):
        text = crypto.public_key_to_text(self.key.public_key())
        self.assertEqual(len(text), 44)
        self.assertEqual(crypto.public_key_raw(crypto.public_key_from_text(text + "\n")),
                         crypto.public_key_raw(self.key.public_key()))
        for bad in ("", "not base64!", "AAAA"):
            self.assertRaises(DecodeError, crypto.public_key_from_text, bad)


class KeyFileTests(unittest.TestCase):
    def test_keyring_file_round_trip_with_mode_0600(self):
        path, ring = self.mktemp(), KeyRing([crypto.generate_key(), crypto.generate_key()])
        keyfiles.save_keyring(path, ring)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        loaded = keyfiles.load_keyring(path)
        self.assertEqual(loaded.key_ids(), ring.key_ids())
        self.assertEqual(loaded.current.key_id, ring.current.key_id)

    def test_keyring_file_from_openssl_rand_with_comments(self):
        line = "q83vASNFZ4mrze8BI0VniavN7wEjRWeJq83vASNFZ4k="   # openssl rand -base64 32
        ring = keyfiles.keyring_from_text(f"# K_PS\n\n{line}  # current\n")
        self.assertEqual(len(ring), 1)

    def test_group_readable_secret_file_is_refused(self):
        path = self.mktemp()
        keyfiles.save_keyring(path, KeyRing.generate())
        os.chmod(path, 0o640)
        self.assertRaises(keyfiles.KeyFileError, keyfiles.load_keyring, path)

    def test_malformed_keyring_files_name_the_line(self):
        for text in ("not base64\n", "AAAA\n", "", "# only a comment\n"):
            error = self.assertRaises(keyfiles.KeyFileError, keyfiles.keyring_from_text, text, "k_ps.keys")
            self.assertIn("k_ps.keys", str(error))

    def test_missing_key_file(self):
        self.assertRaises(keyfiles.KeyFileError, keyfiles.load_keyring, self.mktemp())

    def test_signing_key_file_is_pem_0600_and_public_key_file_is_text(self):
        key, path, public_path = crypto.generate_signing_key(), self.mktemp(), self.mktemp()
        keyfiles.save_signing_key(path, key)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path, "rb") as handle:
            self.assertTrue(handle.read().startswith(b"-----BEGIN PRIVATE KEY-----"))
        loaded = keyfiles.load_signing_key(path)
        keyfiles.save_public_key(public_path, loaded.public_key())
        public = keyfiles.load_public_key(public_path)
        crypto.verify_signature(public, PURPOSE, b"m", crypto.sign(key, PURPOSE, b"m"))

    def test_garbage_signing_key_file(self):
        path = self.mktemp()
        keyfiles.write_secret_file(path, b"garbage")
        self.assertRaises(keyfiles.KeyFileError, keyfiles.load_signing_key, path)


class Base64Tests(unittest.TestCase):
    def test_round_trip_without_padding(self):
        for size in range(10):
            text = crypto.encode_b64(bytes(range(size)))
            self.assertNotIn("=", text)
            self.assertEqual(crypto.decode_b64(text, 100), bytes(range(size)))

    def test_strictness(self):
        for bad in ("AB==", "A", "AB+/", "AB C", "AR", "\u00e9\u00e9\u00e9\u00e9", b"\xff\xff"):
            self.assertRaises(DecodeError, crypto.decode_b64, bad, 100)
        self.assertRaises(DecodeError, crypto.decode_b64, "A" * 104, 100)


def enrol(as_key, pinned, *, tamper=None):
    """Both halves of the key agreement; *tamper* may rewrite the AS's reply in flight."""
    dmd = ka.DmdKeyAgreement(NUMBER, "as.mpay.test", crypto.generate_signing_key().public_key())
    acceptance, k_as = ka.as_complete(as_key, "as.mpay.test", NUMBER, dmd.public, dmd.nonce,
                                      dmd.dmd_signing_public)
    if tamper is not None:
        acceptance = tamper(acceptance)
    return dmd, k_as, dmd.finish(acceptance, pinned)


class KeyAgreementTests(unittest.TestCase):
    def setUp(self):
        self.as_key = crypto.generate_signing_key()

    def test_enrolment_key_agreement_both_sides_derive_k(self):
        _, k_as, k_dmd = enrol(self.as_key, self.as_key.public_key())
        self.assertEqual(k_as, k_dmd)
        self.assertEqual(len(k_dmd), 32)

    def test_mitm_transcript_signed_by_another_key_aborts(self):
        mallory = crypto.generate_signing_key()
        self.assertRaises(ka.EnrolmentAborted, enrol, mallory, self.as_key.public_key())

    def test_mitm_substituting_its_own_share_aborts(self):
        def substitute(acceptance):
            mallory_share = ka.x25519_public(ka.X25519PrivateKey.generate())
            return ka.AsAcceptance(mallory_share, acceptance.as_nonce, acceptance.signature)
        self.assertRaises(ka.EnrolmentAborted, enrol, self.as_key, self.as_key.public_key(),
                          tamper=substitute)

    def test_tampered_as_nonce_aborts(self):
        def tamper(acceptance):
            return ka.AsAcceptance(acceptance.as_public, bytes(16), acceptance.signature)
        self.assertRaises(ka.EnrolmentAborted, enrol, self.as_key, self.as_key.public_key(),
                          tamper=tamper)

    def test_finish_is_one_shot(self):
        dmd, _, _ = enrol(self.as_key, self.as_key.public_key())
        acceptance = ka.AsAcceptance(bytes(32), bytes(16), bytes(64))
        self.assertRaises(ka.EnrolmentAborted, dmd.finish, acceptance, self.as_key.public_key())

    def test_degenerate_share_is_refused(self):
        private = ka.X25519PrivateKey.generate()
        self.assertRaises(ka.KeyAgreementFailed, ka.x25519_shared_secret, private, bytes(32))
        self.assertRaises(DecodeError, ka.x25519_shared_secret, private, bytes(31))

    def test_transcript_round_trip_and_every_field_changes_k(self):
        transcript = ka.EnrolmentTranscript(NUMBER, "as.mpay.test", b"\x01" * 32, b"\x02" * 32,
                                            b"\x03" * 16, b"\x04" * 16, b"\x05" * 32)
        self.assertEqual(ka.EnrolmentTranscript.decode(transcript.encode()), transcript)
        secret = b"\x07" * 32
        k = ka.derive_k(secret, transcript)
        variants = [("number", "+886912345679"), ("as_identity", "as2.mpay.test"),
                    ("dmd_public", b"\x11" * 32), ("as_public", b"\x12" * 32),
                    ("dmd_nonce", b"\x13" * 16), ("as_nonce", b"\x14" * 16),
                    ("dmd_signing_public", b"\x15" * 32)]
        for name, value in variants:
            changed = ka.EnrolmentTranscript(**{**transcript.__dict__, name: value})
            self.assertNotEqual(ka.derive_k(secret, changed), k, name)

    def test_known_answer_for_interoperable_dmds(self):
        transcript = ka.EnrolmentTranscript(NUMBER, "as.mpay.test", b"\x01" * 32, b"\x02" * 32,
                                            b"\x03" * 16, b"\x04" * 16, b"\x05" * 32)
        encoded = transcript.encode()
        self.assertEqual(len(encoded), 28 + 14 + 13 + 32 + 32 + 16 + 16 + 32)
        self.assertEqual(encoded[:29], ka.TRANSCRIPT_LABEL + b"\x0d")
        self.assertEqual(ka.derive_k(b"\x07" * 32, transcript).hex(), KAT_K)

    def test_invalid_transcript_fields(self):
        self.assertRaises(DecodeError, ka.EnrolmentTranscript, "0912345678", "as", b"\x01" * 32,
                          b"\x02" * 32, b"\x03" * 16, b"\x04" * 16, b"\x05" * 32)


KAT_K = "f4e4b90148ce6ee12db1af31eb7a0cc1438bd640a2cfc74e2781594ec3a61933"  # RFC 5869 by hand


class FuzzTests(unittest.TestCase):
    """Arbitrary input to every decoder raises the module's own errors, nothing else."""

    ring = KeyRing.generate()

    @FUZZ
    @given(st.one_of(st.text(max_size=200), st.binary(max_size=200),
                     st.text("AQgwEIMB-_+/=xyz09 ", max_size=12)))
    def test_decode_b64(self, text):
        """Canonical: whatever decodes is exactly what encode_b64 writes for it."""
        try:
            data = crypto.decode_b64(text, 150)
        except DecodeError:
            return
        self.assertEqual(crypto.encode_b64(data), text if isinstance(text, str) else text.decode())

    @FUZZ
    @given(st.binary(max_size=110))
    def test_encode_b64_decodes(self, data):
        self.assertEqual(crypto.decode_b64(crypto.encode_b64(data), 150), data)

    @FUZZ
    @given(st.binary(max_size=200))
    def test_envelope_open(self, data):
        for opener in (lambda: self.ring.open(PURPOSE, data),
                       lambda: self.ring.current.open(PURPOSE, data),
                       lambda: crypto.open_device_key(self.ring, NUMBER, data)):
            self.assertRaises(CryptoError, opener)

    @FUZZ
    @given(st.binary(max_size=300))
    def test_envelope_with_our_key_id(self, data):
        forged = bytes((crypto.ENVELOPE_VERSION,)) + self.ring.current.key_id + data
        self.assertRaises(CryptoError, self.ring.open, PURPOSE, forged)

    @FUZZ
    @given(st.binary(max_size=300))
    def test_transcript_decode(self, data):
        for candidate in (data, ka.TRANSCRIPT_LABEL + data):
            try:
                ka.EnrolmentTranscript.decode(candidate)
            except DecodeError:
                pass

    @FUZZ
    @given(st.one_of(st.text(max_size=100), st.binary(max_size=40)))
    def test_public_keys(self, value):
        try:
            if isinstance(value, str):
                crypto.public_key_from_text(value)
            else:
                crypto.public_key_from_raw(value)
        except DecodeError:
            pass

    @FUZZ
    @given(st.text(max_size=300))
    def test_keyring_text(self, text):
        try:
            keyfiles.keyring_from_text(text)
        except keyfiles.KeyFileError:
            pass

"""Tickets, session parts, authenticators and the PS's TicketVerifier, cause by cause."""

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from mpay.auth import crypto, tickets as t, verifier as v
from mpay.auth.crypto import CryptoError, DecodeError, KeyRing, OpenFailed

FUZZ = settings(max_examples=300, deadline=None)
NUMBER, OTHER_NUMBER = "+886912345678", "+886911111111"
DMD_IP, NAT_IP = "198.51.100.7", "203.0.113.9"
PS_ID = "ps.mpay.test"
T0 = 1_700_000_000.0    # issue time, Unix seconds


def digest_for(body=b"amount=100;payee=+886911111111", cseq=1):
    return t.request_digest("MESSAGE", "sip:+886911111111@mpay.test", "c1@198.51.100.7", cseq,
                            "MESSAGE", body)


class Fixture(unittest.TestCase):
    def setUp(self):
        self.k_ps = KeyRing.generate()
        self.issued = t.issue_ticket(self.k_ps, NUMBER, DMD_IP, PS_ID, T0)
        self.verifier = v.TicketVerifier(self.k_ps, PS_ID)
        self.digest = digest_for()

    def auth(self, now=T0 + 10, *, number=NUMBER, ip=DMD_IP, digest=None, nonce=None, key=None):
        return t.make_authenticator(key or self.issued.k_c_ps, number, ip,
                                    digest or self.digest, now, nonce)

    def verify(self, ticket=None, auth=None, *, source=DMD_IP, digest=None, now=T0 + 10,
               verifier=None):
        return (verifier or self.verifier).verify(
            self.issued.ticket if ticket is None else ticket,
            self.auth() if auth is None else auth, source, digest or self.digest, now)

    def assertRefused(self, status, reason, **kwargs):
        refusal = self.assertRaises(v.TicketRefused, self.verify, **kwargs)
        self.assertEqual((refusal.status, refusal.reason), (status, reason))
        return refusal


class FlowTests(Fixture):
    def test_ticket_flow_as_issues_dmd_opens_session_part_ps_verifies(self):
        k, request_nonce = crypto.generate_key(), b"\x42" * t.NONCE_BYTES
        # AS -> DMD: 200 with X-Mpay-Ticket and X-Mpay-Session.
        issued = t.issue_ticket(self.k_ps, NUMBER, DMD_IP, PS_ID, T0)
        session = t.seal_session_part(k, NUMBER, issued.k_c_ps, request_nonce, issued.expires,
                                      PS_ID)
        # DMD: opens its part with K, learns K_C,PS.
        part = t.open_session_part(k, NUMBER, session, request_nonce)
        self.assertEqual((part.k_c_ps, part.ps_id), (issued.k_c_ps, PS_ID))
        self.assertEqual(part.expires_ms, t.to_ms(T0 + t.TICKET_LIFETIME_S))
        # DMD -> PS: a request with the ticket and a fresh authenticator.
        authenticator = t.make_authenticator(part.k_c_ps, NUMBER, DMD_IP, self.digest, T0 + 60)
        verified = self.verifier.verify(issued.ticket, authenticator, DMD_IP, self.digest, T0 + 61)
        self.assertEqual(verified[:3], (NUMBER, issued.k_c_ps, T0 + t.TICKET_LIFETIME_S))
        self.assertEqual(len(verified.nonce), t.NONCE_BYTES)

    def test_session_part_refuses_another_number_key_or_request(self):
        k = crypto.generate_key()
        session = t.seal_session_part(k, NUMBER, self.issued.k_c_ps, b"\x01" * 16, T0, PS_ID)
        self.assertRaises(OpenFailed, t.open_session_part, k, OTHER_NUMBER, session, b"\x01" * 16)
        self.assertRaises(OpenFailed, t.open_session_part, k, NUMBER, session, b"\x02" * 16)
        self.assertRaises(CryptoError, t.open_session_part, crypto.generate_key(), NUMBER,
                          session, b"\x01" * 16)

    def test_ticket_request_proof_is_not_a_ps_authenticator(self):
        k = crypto.generate_key()
        proof = t.make_authenticator(k, NUMBER, DMD_IP, self.digest, T0,
                                     purpose=t.TICKET_REQUEST_PURPOSE)
        opened = t.open_authenticator(k, proof, purpose=t.TICKET_REQUEST_PURPOSE)
        self.assertEqual((opened.number, opened.digest), (NUMBER, self.digest))
        self.assertRaises(OpenFailed, t.open_authenticator, k, proof)

    def test_issue_refuses_values_that_do_not_fit(self):
        for number, ip, ps_id in (("0912345678", DMD_IP, PS_ID), (NUMBER, "999.1.1.1", PS_ID),
                                  (NUMBER, DMD_IP, ""), (NUMBER, DMD_IP, "p" * 256)):
            self.assertRaises(ValueError, t.issue_ticket, self.k_ps, number, ip, ps_id, T0)

    def test_wire_forms_are_header_safe_and_compact(self):
        for value in (self.issued.ticket, self.auth()):
            self.assertRegex(value, r"^[A-Za-z0-9_-]+$")
            self.assertLess(len(value), 256)

    def test_key_rotation_old_ticket_still_verifies(self):
        rotated = KeyRing([crypto.generate_key(), *self.k_ps.keys()])
        verifier = v.TicketVerifier(rotated, PS_ID)
        self.assertEqual(self.verify(verifier=verifier).number, NUMBER)
        fresh = t.issue_ticket(rotated, NUMBER, DMD_IP, PS_ID, T0)
        self.assertEqual(crypto.decode_b64(fresh.ticket, 999)[1:5], rotated.current.key_id)

    def test_ipv4_mapped_source_matches(self):
        self.assertEqual(self.verify(source="::ffff:" + DMD_IP).number, NUMBER)

    def test_nat_setting_skips_only_the_source_comparison(self):
        nat = v.TicketVerifier(self.k_ps, PS_ID, check_source_ip=False)
        self.assertEqual(self.verify(source=NAT_IP, verifier=nat).number, NUMBER)

    def test_skew_boundary_is_accepted_both_ways(self):
        for offset in (-t.CLOCK_SKEW_S, t.CLOCK_SKEW_S):
            self.verify(auth=self.auth(T0 + 1000 + offset), now=T0 + 1000)

    def test_same_nonce_from_another_number_is_not_a_replay(self):
        other = t.issue_ticket(self.k_ps, OTHER_NUMBER, DMD_IP, PS_ID, T0)
        nonce = b"\x09" * t.NONCE_BYTES
        self.verify(auth=self.auth(nonce=nonce))
        self.verify(ticket=other.ticket,
                    auth=self.auth(number=OTHER_NUMBER, key=other.k_c_ps, nonce=nonce))

    def test_refusal_reasons_are_distinct(self):
        reasons = [reason for _, reason in v.REFUSALS.values()]
        self.assertEqual(len(reasons), len(set(reasons)))


class RefusalTests(Fixture):
    def test_no_ticket_is_401(self):
        for missing in (None, "", b""):
            refusal = self.assertRaises(v.TicketRefused, self.verifier.verify, missing,
                                        self.auth(), DMD_IP, self.digest, T0 + 10)
            self.assertEqual((refusal.status, refusal.reason), (401, "Ticket Required"))

    def test_expired_ticket_is_401(self):
        expiry = T0 + t.TICKET_LIFETIME_S
        self.assertRefused(401, "Ticket Expired", auth=self.auth(expiry), now=expiry)
        self.assertRefused(401, "Ticket Expired", auth=self.auth(expiry + 5), now=expiry + 5)

    def test_forged_ticket_bytes(self):
        raw = bytearray(crypto.decode_b64(self.issued.ticket, 999))
        raw[30] ^= 0x01
        self.assertRefused(403, "Ticket Forged", ticket=crypto.encode_b64(bytes(raw)))

    def test_ticket_sealed_with_another_k_ps(self):
        other = t.issue_ticket(KeyRing.generate(), NUMBER, DMD_IP, PS_ID, T0)
        self.assertRefused(403, "Ticket Key Unknown", ticket=other.ticket,
                           auth=self.auth(key=other.k_c_ps))

    def test_ticket_of_another_k_ps_relabelled_with_our_key_id(self):
        other = t.issue_ticket(KeyRing.generate(), NUMBER, DMD_IP, PS_ID, T0)
        raw = crypto.decode_b64(other.ticket, 999)
        relabelled = raw[:1] + self.k_ps.current.key_id + raw[5:]
        self.assertRefused(403, "Ticket Forged", ticket=crypto.encode_b64(relabelled),
                           auth=self.auth(key=other.k_c_ps))

    def test_unknown_key_id_after_retirement(self):
        retired = v.TicketVerifier(KeyRing([crypto.generate_key()]), PS_ID)
        self.assertRefused(403, "Ticket Key Unknown", verifier=retired)

    def test_other_purpose_blob_as_ticket(self):
        plain = t.Authenticator(NUMBER, t.pack_ip(DMD_IP), t.to_ms(T0), b"\x00" * 16, self.digest)
        blob = self.k_ps.seal(t.AUTHENTICATOR_PURPOSE, plain.encode())
        self.assertRefused(403, "Ticket Forged", ticket=crypto.encode_b64(blob))

    def test_ticket_for_another_server(self):
        other = t.issue_ticket(self.k_ps, NUMBER, DMD_IP, "ps2.mpay.test", T0)
        self.assertRefused(403, "Ticket Not For This Server", ticket=other.ticket,
                           auth=self.auth(key=other.k_c_ps))

    def test_ticket_issued_in_the_future(self):
        later = t.issue_ticket(self.k_ps, NUMBER, DMD_IP, PS_ID, T0 + t.CLOCK_SKEW_S + 11)
        self.assertRefused(403, "Ticket Not Yet Valid", ticket=later.ticket,
                           auth=self.auth(key=later.k_c_ps))

    def test_missing_authenticator(self):
        refusal = self.assertRaises(v.TicketRefused, self.verifier.verify, self.issued.ticket,
                                    None, DMD_IP, self.digest, T0 + 10)
        self.assertEqual((refusal.status, refusal.reason), (403, "Authenticator Required"))

    def test_authenticator_sealed_with_another_session_key(self):
        self.assertRefused(403, "Authenticator Forged", auth=self.auth(key=crypto.generate_key()))

    def test_ids_mismatch(self):
        self.assertRefused(403, "Identity Mismatch", auth=self.auth(number=OTHER_NUMBER))

    def test_ticket_and_authenticator_addresses_differ(self):
        self.assertRefused(403, "Ticket Address Mismatch", auth=self.auth(ip=NAT_IP),
                           source=NAT_IP)

    def test_nat_setting_still_requires_ticket_ip_equal_authenticator_ip(self):
        nat = v.TicketVerifier(self.k_ps, PS_ID, check_source_ip=False)
        self.assertRefused(403, "Ticket Address Mismatch", auth=self.auth(ip=NAT_IP),
                           source=NAT_IP, verifier=nat)

    def test_source_ip_differs(self):
        self.assertRefused(403, "Source Address Mismatch", source=NAT_IP)
        self.assertRefused(403, "Source Address Mismatch", source="not an address")

    def test_timestamp_too_old(self):
        self.assertRefused(403, "Clock Skew Too Large", auth=self.auth(T0 + 1000),
                           now=T0 + 1000 + t.CLOCK_SKEW_S + 0.001)

    def test_timestamp_too_far_in_the_future(self):
        self.assertRefused(403, "Clock Skew Too Large",
                           auth=self.auth(T0 + 1000 + t.CLOCK_SKEW_S + 0.001), now=T0 + 1000)

    def test_authenticator_replayed(self):
        auth = self.auth()
        self.verify(auth=auth)
        self.assertRefused(403, "Authenticator Replayed", auth=auth, now=T0 + 11)

    def test_authenticator_moved_onto_another_request(self):
        captured = self.auth()
        larger = digest_for(b"amount=100000;payee=+886911111111")
        self.assertRefused(403, "Request Digest Mismatch", auth=captured, digest=larger)

    def test_garbage_and_truncated_base64_is_403_not_an_exception(self):
        ticket, auth = self.issued.ticket, self.auth()
        for bad in (ticket[:10], ticket + "!", "!!!!", ticket + "=", "A", "AB", "x" * 5000,
                    crypto.encode_b64(b"\x01"), ticket.encode() + b"\xff", "\u0663" * 4):
            self.assertRefused(403, "Ticket Malformed", ticket=bad)
        for bad in (auth[:10], "~", auth + "==", crypto.encode_b64(b"\x07" * 40)):
            self.assertRefused(403, "Authenticator Malformed", auth=bad)

    def test_truncated_ciphertext_is_forged(self):
        def truncated(text):
            return crypto.encode_b64(crypto.decode_b64(text, 999)[:-3])
        self.assertRefused(403, "Ticket Forged", ticket=truncated(self.issued.ticket))
        self.assertRefused(403, "Authenticator Forged", auth=truncated(self.auth()))

    def test_well_sealed_nonsense_plaintext_is_malformed(self):
        blob = self.k_ps.seal(t.TICKET_PURPOSE, b"\x00nonsense")
        self.assertRefused(403, "Ticket Malformed", ticket=crypto.encode_b64(blob))


class OpenedTicketTests(Fixture):
    """A ticket is opened once and kept; what it says is still checked every time."""

    def test_a_kept_ticket_verifies_each_fresh_authenticator(self):
        first = self.verify(auth=self.auth(T0 + 10), now=T0 + 10)
        again = self.verify(auth=self.auth(T0 + 20), now=T0 + 20)
        self.assertEqual(self.verifier.opened_tickets, 1)
        self.assertEqual(first[:3], again[:3])
        self.assertNotEqual(first.nonce, again.nonce)

    def test_a_kept_ticket_still_expires(self):
        self.verify()
        expiry = T0 + t.TICKET_LIFETIME_S
        self.assertRefused(401, "Ticket Expired", auth=self.auth(expiry), now=expiry)

    def test_a_kept_ticket_still_needs_its_own_authenticator(self):
        self.verify()
        other = t.issue_ticket(self.k_ps, NUMBER, DMD_IP, PS_ID, T0)
        self.assertRefused(403, "Authenticator Forged", auth=self.auth(key=other.k_c_ps))

    def test_a_new_key_ring_opens_kept_tickets_again(self):
        self.verify()
        self.verifier.k_ps = KeyRing([crypto.generate_key()])     # the old key retired
        self.assertRefused(403, "Ticket Key Unknown")
        self.assertEqual(self.verifier.opened_tickets, 0)

    def test_a_refused_ticket_is_not_kept(self):
        raw = bytearray(crypto.decode_b64(self.issued.ticket, 999))
        raw[30] ^= 0x01
        for _ in range(2):
            self.assertRefused(403, "Ticket Forged", ticket=crypto.encode_b64(bytes(raw)))
        self.assertRefused(403, "Ticket Malformed", ticket="!" * 40)
        self.assertEqual(self.verifier.opened_tickets, 0)

    def test_the_oldest_kept_ticket_gives_way_at_the_bound(self):
        verifier = v.TicketVerifier(self.k_ps, PS_ID, opened_tickets_max=2)
        issued = [t.issue_ticket(self.k_ps, NUMBER, DMD_IP, PS_ID, T0) for _ in range(3)]
        for n, ticket in enumerate(issued):
            self.verify(ticket=ticket.ticket, auth=self.auth(key=ticket.k_c_ps), verifier=verifier)
            self.assertEqual(verifier.opened_tickets, min(n + 1, 2))
        # The first was dropped, and opens again.
        self.verify(ticket=issued[0].ticket, auth=self.auth(key=issued[0].k_c_ps),
                    verifier=verifier)
        self.assertEqual(verifier.opened_tickets, 2)


class ReplayCacheTests(Fixture):
    def test_entries_expire_after_the_window(self):
        cache = v.ReplayCache(retention_s=600, max_entries=10)
        self.assertTrue(cache.add(b"a", 1000.0))
        self.assertFalse(cache.add(b"a", 1599.0))
        cache.expire(1600.0)
        self.assertEqual(len(cache), 1)
        cache.expire(1600.5)
        self.assertEqual(len(cache), 0)
        self.assertTrue(cache.add(b"a", 1600.5))

    def test_verifier_remembers_for_twice_the_skew(self):
        auth = self.auth(T0 + t.CLOCK_SKEW_S)       # stamped as far ahead as allowed
        self.verify(auth=auth, now=T0)
        self.assertRefused(403, "Authenticator Replayed", auth=auth, now=T0 + 2 * t.CLOCK_SKEW_S)
        self.verifier.replay_cache.expire(T0 + 2 * t.CLOCK_SKEW_S + v.REPLAY_SLACK_S + 1)
        self.assertEqual(len(self.verifier.replay_cache), 0)

    def test_full_cache_refuses_rather_than_forgets(self):
        cache = v.ReplayCache(retention_s=2 * t.CLOCK_SKEW_S, max_entries=2)
        verifier = v.TicketVerifier(self.k_ps, PS_ID, replay_cache=cache)
        first = self.auth()
        self.verify(auth=first, verifier=verifier)
        self.verify(verifier=verifier)
        refusal = self.assertRefused(503, "Replay Cache Full", verifier=verifier)
        self.assertEqual(refusal.retry_after_s, 2 * t.CLOCK_SKEW_S)
        self.assertRefused(403, "Authenticator Replayed", auth=first, verifier=verifier)
        later = T0 + 10 + 2 * t.CLOCK_SKEW_S + 0.5
        self.verify(auth=self.auth(later), now=later, verifier=verifier)

    def test_clock_stepping_back_keeps_entries(self):
        cache = v.ReplayCache(retention_s=10, max_entries=10)
        cache.add(b"a", 100.0)
        cache.add(b"b", 50.0)
        cache.expire(105.0)
        self.assertEqual(len(cache), 2)
        cache.expire(110.5)
        self.assertEqual(len(cache), 0)

    def test_one_bucket_per_second(self):
        cache = v.ReplayCache(retention_s=60, max_entries=10_000)
        for i in range(1000):
            cache.add(i.to_bytes(4, "big"), 100.0 + i / 100)
        self.assertEqual(len(cache._buckets), 11)


class RequestDigestTests(unittest.TestCase):
    ARGS = ("MESSAGE", "sip:+886911111111@mpay.test", "c1@h", 7, "MESSAGE", b"amount=1")

    def test_every_field_counts(self):
        base = t.request_digest(*self.ARGS)
        self.assertEqual(len(base), t.DIGEST_BYTES)
        for index, value in enumerate(("RECEIVE", "sip:x@y", "c2@h", 8, "INVITE", b"amount=2")):
            args = list(self.ARGS)
            args[index] = value
            self.assertNotEqual(t.request_digest(*args), base, index)

    def test_field_boundaries_are_unambiguous(self):
        self.assertNotEqual(t.request_digest("MESSAGE", "sip:ab", "c", 1, "M", b""),
                            t.request_digest("MESSAGE", "sip:a", "bc", 1, "M", b""))

    def test_known_answer(self):
        self.assertEqual(t.request_digest(*self.ARGS).hex(), KAT_DIGEST)

    def test_cseq_out_of_range(self):
        self.assertRaises(ValueError, t.request_digest, "M", "u", "c", 2**32, "M", b"")


KAT_DIGEST = "e0bce72c97b3a90c0ab50417a766b81e2b63b089be2e89ed68f3404dbcd2c35c"  # by hand


class FuzzTests(Fixture):
    """Arbitrary bytes into every opener and decoder: only the module's own errors."""

    @FUZZ
    @given(st.binary(max_size=200))
    def test_plaintext_decoders(self, data):
        for layout in (t.Ticket, t.SessionPart, t.Authenticator):
            try:
                layout.decode(data)
            except DecodeError:
                pass

    @FUZZ
    @given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
    def test_openers(self, value):
        k = self.issued.k_c_ps
        for opener in (lambda: t.open_ticket(self.k_ps, value),
                       lambda: t.open_authenticator(k, value),
                       lambda: t.open_session_part(k, NUMBER, value, b"\x00" * 16)):
            self.assertRaises(CryptoError, opener)

    @FUZZ
    @given(st.binary(max_size=200), st.binary(max_size=200))
    def test_verifier_with_well_sealed_nonsense(self, ticket_plain, auth_plain):
        ticket = crypto.encode_b64(self.k_ps.seal(t.TICKET_PURPOSE, ticket_plain))
        auth = crypto.encode_b64(crypto.AeadKey(self.issued.k_c_ps).seal(
            t.AUTHENTICATOR_PURPOSE, auth_plain))
        self.assertRaises(v.TicketRefused, self.verify, ticket=ticket)
        self.assertRaises(v.TicketRefused, self.verify, auth=auth)

    @FUZZ
    @given(st.one_of(st.none(), st.text(max_size=300), st.binary(max_size=300)),
           st.one_of(st.none(), st.text(max_size=300), st.binary(max_size=300)))
    def test_verifier_with_arbitrary_headers(self, ticket, auth):
        try:
            self.verifier.verify(ticket, auth, DMD_IP, self.digest, T0 + 10)
        except v.TicketRefused:
            pass

    @FUZZ
    @given(st.from_regex(r"\+[1-9][0-9]{6,14}", fullmatch=True), st.binary(min_size=4, max_size=4),
           st.text(min_size=1, max_size=60), st.integers(0, 2**62), st.integers(0, 2**62))
    def test_ticket_layout_round_trip(self, number, ip, ps_id, issued, length):
        ticket = t.Ticket(number, ip, ps_id, issued, issued + length, b"\x05" * 32)
        self.assertEqual(t.Ticket.decode(ticket.encode()), ticket)

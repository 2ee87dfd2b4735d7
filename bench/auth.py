"""How fast the PS checks a request's credentials (DESIGN section 4).

One verification = open the ticket (K_PS), open the authenticator (K_C,PS),
every check, and the replay-cache insert.  Printed beside it, measured in
the same run: the two opens alone, and a bare AES-256-GCM decrypt of a blob
of the same size, the floor no Python code can beat.  Design budget: each
well under 50 us in CPython.  Also the replay cache's memory per entry,
which sizes REPLAY_CACHE_MAX_ENTRIES.  And the payer signature's check and the
receipt's signature as the PS makes them (libsodium), against OpenSSL's
Ed25519 through ``cryptography`` on the same key and message.

Last line: ``auth: verify_per_s=X verify_us=Y``.
"""

from __future__ import annotations

import os
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from mpay.auth import crypto, tickets  # noqa: E402
from mpay.auth import verifier as gate  # noqa: E402

N = 20_000
ROUNDS = 5
NUMBER, IP, PS_ID = "+886912345678", "198.51.100.7", "ps.mpay.test"
NOW = 1_700_000_000.0
BUDGET_US = 50.0


def best_us(fn, items) -> float:
    """Best of ROUNDS passes, in microseconds per item (least disturbed by the machine)."""
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return best / len(items) * 1e6


def main() -> None:
    k_ps = crypto.KeyRing.generate()
    issued = tickets.issue_ticket(k_ps, NUMBER, IP, PS_ID, NOW)
    digest = tickets.request_digest("MESSAGE", "sip:+886911111111@mpay.test", "c1@h", 1,
                                    "MESSAGE", b"amount=100")
    auths = [tickets.make_authenticator(issued.k_c_ps, NUMBER, IP, digest, NOW + 1)
             for _ in range(N * ROUNDS)]

    # Each pass gets its own verifier and unseen nonces, or the replay cache refuses them.
    best = float("inf")
    for round_ in range(ROUNDS):
        verifier = gate.TicketVerifier(k_ps, PS_ID)
        verify = verifier.verify
        batch = auths[round_ * N:(round_ + 1) * N]
        start = time.perf_counter()
        for auth in batch:
            verify(issued.ticket, auth, IP, digest, NOW + 2)
        best = min(best, time.perf_counter() - start)
        assert len(verifier.replay_cache) == N, "every verification accepted and remembered"
    verify_us = best / N * 1e6

    ticket_us = best_us(lambda _: tickets.open_ticket(k_ps, issued.ticket), range(N))
    auth_us = best_us(lambda a: tickets.open_authenticator(issued.k_c_ps, a), auths[:N])

    plaintext_bytes = len(crypto.decode_b64(issued.ticket, 999)) - crypto.ENVELOPE_OVERHEAD_BYTES
    aead, nonce = AESGCM(crypto.generate_key()), os.urandom(crypto.AEAD_NONCE_BYTES)
    blob = aead.encrypt(nonce, bytes(plaintext_bytes), b"ad")
    baseline_us = best_us(lambda _: aead.decrypt(nonce, blob, b"ad"), range(N))

    signing = crypto.generate_signing_key()
    public = crypto.public_key_raw(signing.public_key())
    purpose, message = b"mpay-bench-v1", digest
    signature = crypto.sign(signing, purpose, message)
    labelled = bytes((len(purpose),)) + purpose + message
    openssl_public = signing.public_key()
    sodium_verify_us = best_us(
        lambda _: crypto.verify_raw(public, purpose, message, signature), range(N // 4))
    openssl_verify_us = best_us(lambda _: openssl_public.verify(signature, labelled),
                                range(N // 4))
    sodium_sign_us = best_us(lambda _: crypto.sign(signing, purpose, message), range(N // 4))
    openssl_sign_us = best_us(lambda _: signing.sign(labelled), range(N // 4))

    tracemalloc.start()
    cache = gate.TicketVerifier(k_ps, PS_ID).replay_cache
    before = tracemalloc.get_traced_memory()[0]
    for i in range(100_000):
        cache.add(os.urandom(tickets.NONCE_BYTES) + NUMBER.encode(), NOW + i / 100)
    per_entry = (tracemalloc.get_traced_memory()[0] - before) / len(cache)
    tracemalloc.stop()

    print(f"wire: ticket {len(issued.ticket)} chars, authenticator {len(auths[0])} chars")
    print(f"bare AES-256-GCM decrypt ({len(blob)} B): {baseline_us:6.2f} us  (1.00x)")
    print(f"ticket open:                  {ticket_us:6.2f} us  ({ticket_us / baseline_us:.2f}x)")
    print(f"authenticator open:           {auth_us:6.2f} us  ({auth_us / baseline_us:.2f}x)")
    print(f"full verify (+checks, cache): {verify_us:6.2f} us  ({verify_us / baseline_us:.2f}x)"
          f"  budget {BUDGET_US:.0f} us each")
    print(f"Ed25519 verify: {sodium_verify_us:6.1f} us libsodium, {openssl_verify_us:6.1f} us "
          f"OpenSSL ({sodium_verify_us / openssl_verify_us:.2f}x)")
    print(f"Ed25519 sign:   {sodium_sign_us:6.1f} us libsodium, {openssl_sign_us:6.1f} us "
          f"OpenSSL ({sodium_sign_us / openssl_sign_us:.2f}x)")
    cap = gate.REPLAY_CACHE_MAX_ENTRIES
    print(f"replay cache: {per_entry:.0f} B/entry; {cap} entries -> {per_entry * cap / 2**20:.0f}"
          f" MiB at most, full at {cap / cache.retention_s:.0f} verifications/s sustained")
    print(f"auth: verify_per_s={1e6 / verify_us:.0f} verify_us={verify_us:.2f}")


if __name__ == "__main__":
    main()

"""The PS's gate: ticket + authenticator checks and the replay cache (DESIGN section 4).

Sans-IO: the caller passes ``now`` (Unix seconds) and the packet's source
address, and gets ``Verified`` or ``TicketRefused`` carrying a SIP status and a
reason phrase unique to the cause.  The AS checks a ticket request's proof
(an authenticator sealed with the device's K) with the very same rules, so
the two can never drift apart.
"""

from __future__ import annotations

import hmac
import math
from collections import deque
from typing import NamedTuple

from mpay.auth.crypto import CryptoError, DecodeError, KeyRing, UnknownKeyId
from mpay.auth.tickets import (
    AUTHENTICATOR_PURPOSE, CLOCK_SKEW_S, MS_PER_S, TICKET_REQUEST_PURPOSE, Authenticator,
    Ticket, open_authenticator, open_ticket, pack_ip, to_ms,
)

REPLAY_CACHE_MAX_ENTRIES = 4_000_000
"""601 s of 6,600 requests a second (issue 7's bar is 3,000), ~104 bytes each."""
REPLAY_SLACK_S = 1      # beyond 2 x skew, absorbs rounding to milliseconds
OPENED_TICKETS_MAX = 65_536
"""Tickets kept opened, by their wire form (~0.5 kB each, 32 MiB at most).  A DMD shows
the same ticket on every request of its lifetime, and opening it (base64, AES-GCM, the
decode) was a twentieth of a credit transfer's work at the PS.  Only a ticket that
opened is kept, so a forgery never is; what a ticket says (expiry, PS) is checked on
every request all the same.  Past the bound the oldest is dropped (opened again)."""


class ReplayCacheFull(Exception):
    def __init__(self, retry_after_s: float):
        super().__init__(f"replay cache full; space in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


class ReplayCache:
    """Keys seen in the last ``retention_s``; bounded by ``max_entries``.

    The verifier keeps each accepted (number, nonce) for twice the skew: an
    authenticator stamped up to ``skew`` ahead stays acceptable until ``2 *
    skew`` after its first use.  When full, the cache refuses (503) rather
    than forgets: forgetting would silently reopen the replay window, a
    refusal is visible and heals when the oldest second of entries expires.

    A key is kept while ``now <= added + retention_s``.  Entries are filed in
    one-second buckets by expiry (a deque in insertion order), so expiry pops
    whole buckets from the front: amortised O(1) per entry, and about 8 bytes
    of bookkeeping beyond the key itself.  Expiry is rounded up to the second:
    an entry may live up to 1 s longer, never shorter.  A clock stepping
    backwards only makes entries live longer.
    """

    def __init__(self, retention_s: float, max_entries: int = REPLAY_CACHE_MAX_ENTRIES):
        assert retention_s > 0 and max_entries > 0
        self.retention_s = retention_s
        self.max_entries = max_entries
        self._seen: set[bytes] = set()
        self._buckets: deque[tuple[int, list[bytes]]] = deque()

    def __len__(self) -> int:
        return len(self._seen)

    def expire(self, now: float) -> None:
        buckets = self._buckets
        while buckets and buckets[0][0] < now:
            self._seen.difference_update(buckets.popleft()[1])

    def add(self, key: bytes, now: float) -> bool:
        """True if *key* is new (and now remembered), False if it was seen.

        Raises ReplayCacheFull when a new key finds no room.
        """
        self.expire(now)
        if key in self._seen:
            return False
        if len(self._seen) >= self.max_entries:
            raise ReplayCacheFull(max(0.0, self._buckets[0][0] - now))
        expires = math.ceil(now + self.retention_s)
        if self._buckets and self._buckets[-1][0] >= expires:
            self._buckets[-1][1].append(key)
        else:
            self._buckets.append((expires, [key]))
        self._seen.add(key)
        assert len(self._seen) <= self.max_entries
        return True


class TicketRefused(Exception):
    """Why a request's credentials were refused: a SIP status and reason phrase."""

    def __init__(self, status: int, reason: str, cause: str = "",
                 retry_after_s: float | None = None):
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.cause = cause                  # a REFUSALS key: a metrics label
        self.retry_after_s = retry_after_s


class Verified(NamedTuple):
    number: str
    k_c_ps: bytes
    expires: float
    nonce: bytes = b""     # the authenticator's: a renewed session part echoes it
    digest: bytes = b""    # of the request, as the authenticator named it: signed next


REFUSALS = {
    "ticket_missing": (401, "Ticket Required"),
    "ticket_expired": (401, "Ticket Expired"),
    "ticket_malformed": (403, "Ticket Malformed"),
    "ticket_key_unknown": (403, "Ticket Key Unknown"),
    "ticket_forged": (403, "Ticket Forged"),
    "ticket_other_server": (403, "Ticket Not For This Server"),
    "ticket_not_yet_valid": (403, "Ticket Not Yet Valid"),
    "authenticator_missing": (403, "Authenticator Required"),
    "authenticator_malformed": (403, "Authenticator Malformed"),
    "authenticator_forged": (403, "Authenticator Forged"),
    "identity_mismatch": (403, "Identity Mismatch"),
    "ticket_address_mismatch": (403, "Ticket Address Mismatch"),
    "source_address_mismatch": (403, "Source Address Mismatch"),
    "clock_skew": (403, "Clock Skew Too Large"),
    "digest_mismatch": (403, "Request Digest Mismatch"),
    "replayed": (403, "Authenticator Replayed"),
    "replay_cache_full": (503, "Replay Cache Full"),
}
assert len({reason for _, reason in REFUSALS.values()}) == len(REFUSALS), "reasons are distinct"


def _refuse(cause: str, retry_after_s: float | None = None) -> TicketRefused:
    return TicketRefused(*REFUSALS[cause], cause=cause, retry_after_s=retry_after_s)


class TicketVerifier:
    """The PS's check of ticket + authenticator, in the order of DESIGN section 4.

    *ps_id* is this PS's identity as the AS writes it into tickets (None: any).
    *check_source_ip* False (behind NAT) skips only the comparison with the
    packet's source; the ticket and authenticator must still name one address.
    """

    def __init__(self, k_ps: KeyRing, ps_id: str | None, *, check_source_ip: bool = True,
                 clock_skew_s: float = CLOCK_SKEW_S, replay_cache: ReplayCache | None = None,
                 opened_tickets_max: int = OPENED_TICKETS_MAX):
        assert clock_skew_s >= 0
        self._k_ps = k_ps
        self.ps_id = ps_id
        self.check_source_ip = check_source_ip
        self.clock_skew_ms = to_ms(clock_skew_s)
        if replay_cache is None:
            replay_cache = ReplayCache(2 * clock_skew_s + REPLAY_SLACK_S)
        self.replay_cache = replay_cache
        assert self.replay_cache.retention_s >= 2 * clock_skew_s, "replay window too short"
        assert opened_tickets_max > 0
        self.opened_tickets_max = opened_tickets_max
        self._opened: dict[str | bytes, Ticket] = {}

    @property
    def k_ps(self) -> KeyRing:
        return self._k_ps

    @k_ps.setter
    def k_ps(self, ring: KeyRing) -> None:
        """A new key ring (rotation): the tickets kept are opened again, under it."""
        self._k_ps = ring
        self._opened.clear()

    @property
    def opened_tickets(self) -> int:
        return len(self._opened)

    def verify(self, ticket_b64: str | bytes | None, authenticator_b64: str | bytes | None,
               source_ip: str, digest: bytes, now: float) -> Verified:
        """Verified, or raises TicketRefused; never any other exception for bad input."""
        now_ms = to_ms(now)
        ticket = self._open_ticket(ticket_b64)
        if self.ps_id is not None and ticket.ps_id != self.ps_id:
            raise _refuse("ticket_other_server")
        if now_ms >= ticket.expires_ms:
            raise _refuse("ticket_expired")
        if ticket.issued_ms > now_ms + self.clock_skew_ms:
            raise _refuse("ticket_not_yet_valid")
        auth = self._open_authenticator(ticket.k_c_ps, authenticator_b64, AUTHENTICATOR_PURPOSE)
        if auth.ip != ticket.ip:
            raise _refuse("ticket_address_mismatch")
        self._check(auth, ticket.number, source_ip, digest, now)
        return Verified(ticket.number, ticket.k_c_ps, ticket.expires_ms / MS_PER_S, auth.nonce,
                        digest)

    def verify_ticket_request(self, k: bytes, number: str, proof_b64: str | bytes | None,
                              source_ip: str, digest: bytes, now: float) -> Authenticator:
        """The AS's check of a ticket request: a proof sealed with the device's K.

        The same identity, address, skew, digest and replay rules as every PS
        request; the ticket's IP is the address the proof names.
        """
        auth = self._open_authenticator(k, proof_b64, TICKET_REQUEST_PURPOSE)
        self._check(auth, number, source_ip, digest, now)
        return auth

    def _check(self, auth: Authenticator, number: str, source_ip: str, digest: bytes,
               now: float) -> None:
        """Checks after opening, in the design's order; the replay cache is touched last."""
        if auth.number != number:
            raise _refuse("identity_mismatch")
        if self.check_source_ip and not self._same_address(source_ip, auth.ip):
            raise _refuse("source_address_mismatch")
        if abs(to_ms(now) - auth.timestamp_ms) > self.clock_skew_ms:
            raise _refuse("clock_skew")
        if not hmac.compare_digest(auth.digest, digest):
            raise _refuse("digest_mismatch")
        try:
            fresh = self.replay_cache.add(auth.nonce + number.encode("ascii"), now)
        except ReplayCacheFull as exc:
            raise _refuse("replay_cache_full", exc.retry_after_s) from None
        if not fresh:
            raise _refuse("replayed")

    def _open_ticket(self, ticket_b64: str | bytes | None) -> Ticket:
        if not ticket_b64:
            raise _refuse("ticket_missing")
        opened = self._opened
        ticket = opened.get(ticket_b64)
        if ticket is not None:
            return ticket
        try:
            ticket = open_ticket(self._k_ps, ticket_b64)
        except DecodeError:
            raise _refuse("ticket_malformed") from None
        except UnknownKeyId:
            raise _refuse("ticket_key_unknown") from None
        except CryptoError:
            raise _refuse("ticket_forged") from None
        if len(opened) >= self.opened_tickets_max:
            del opened[next(iter(opened))]
        opened[ticket_b64] = ticket
        return ticket

    @staticmethod
    def _open_authenticator(key: bytes, authenticator_b64: str | bytes | None,
                            purpose: bytes) -> Authenticator:
        if not authenticator_b64:
            raise _refuse("authenticator_missing")
        try:
            return open_authenticator(key, authenticator_b64, purpose)
        except DecodeError:
            raise _refuse("authenticator_malformed") from None
        except CryptoError:
            raise _refuse("authenticator_forged") from None

    @staticmethod
    def _same_address(source_ip: str, packed: bytes) -> bool:
        try:
            return pack_ip(source_ip) == packed
        except ValueError:
            return False

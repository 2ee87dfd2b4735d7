"""Notices for an offline payee, kept in the ledger database (DESIGN section 6).

After a transfer commits, the PS tells the payee; when the payee's device is
not registered, or stays silent through Timer A, the notice is queued here
and sent when the payee next registers.  In the database, a notice survives a
crash or restart of the PS, and every PS sharing the database can deliver it.

Delivery is at least once: a notice is deleted only after the payee's device
answered 2xx, so a crash between that answer and the delete, or two
REGISTERs close together, send it again; a device drops a journal id it has
seen.  One row per movement (``journal_id`` UNIQUE), so a re-sent transfer
that finds the payee offline again does not queue it twice.  Bounded per
payee, oldest dropped first: the journal is the authority, the notice a
courtesy.  Under PostgreSQL, processes queueing for one payee at the same
moment may leave it a row or two over the bound until its next notice.

Mixed into ``store.SQLStore``; the writes run inside its batches.
"""

from __future__ import annotations

from typing import NamedTuple

MAX_QUEUED_NOTICES_PER_PAYEE = 100
"""Notices kept for one payee; past it the oldest are dropped (and the drop logged)."""

MAX_NOTICE_BYTES = 4096
"""Largest notice body stored (a transfer notice with its signed receipt is ~400 bytes)."""

MAX_FROM_URI_CHARS = 256
"""Longest From URI stored with a notice."""

_NOTICE_COLUMNS = "journal_id, payee, from_uri, body, created"


class Notice(NamedTuple):
    """A queued notice: the MESSAGE to send again, and the movement it tells of."""

    journal_id: int
    payee: str
    from_uri: str       # the payer's SIP URI, or the anonymous URI of a concealed payer
    body: bytes
    created: float


class NoticeQueued(NamedTuple):
    """What ``queue_notice`` did: *new* is False if that movement was queued already;
    *dropped* are the journal ids of older notices removed to keep the bound."""

    new: bool
    dropped: tuple[int, ...] = ()


class NoticeOperations:
    """queue / discard, and the read that delivery needs."""

    def queue_notice(self, payee: str, journal_id: int, from_uri: str, body: bytes,
                     max_per_payee: int = MAX_QUEUED_NOTICES_PER_PAYEE) -> NoticeQueued:
        """Keep a notice of the movement *journal_id* for *payee* until it is delivered."""
        return self._one("queue_notice", payee, journal_id, from_uri, body, max_per_payee)

    def discard_notice(self, payee: str, journal_id: int) -> bool:
        """Forget a delivered notice; False if it was not queued."""
        return self._one("discard_notice", payee, journal_id)

    # -- operations (inside SQLStore.run_batch's transaction and savepoint) --

    def _op_queue_notice(self, payee: str, journal_id: int, from_uri: str, body: bytes,
                         max_per_payee: int) -> NoticeQueued:
        if type(journal_id) is not int or not isinstance(from_uri, str) \
                or not 0 < len(from_uri) <= MAX_FROM_URI_CHARS:
            raise ValueError("a notice needs a journal id and a From URI")
        if not isinstance(body, bytes) or not 0 < len(body) <= MAX_NOTICE_BYTES:
            raise ValueError(f"a notice body is 1 to {MAX_NOTICE_BYTES} bytes")
        if type(max_per_payee) is not int or max_per_payee < 1:
            raise ValueError("max_per_payee must be a positive int")
        row = self._x("SELECT credit FROM journal WHERE id = ?", (journal_id,)).fetchone()
        if row is None or row[0] != payee:
            raise ValueError(f"journal row {journal_id} is no movement to {payee}")
        queued = self._x("INSERT INTO notices (payee, journal_id, from_uri, body, created)"
                         " VALUES (?, ?, ?, ?, ?) ON CONFLICT (journal_id) DO NOTHING"
                         " RETURNING id",
                         (payee, journal_id, from_uri, body, self._clock())).fetchone()
        if queued is None:
            return NoticeQueued(False)
        dropped = self._x("DELETE FROM notices WHERE payee = ? AND id NOT IN (SELECT id FROM"
                          " notices WHERE payee = ? ORDER BY id DESC LIMIT ?) RETURNING journal_id",
                          (payee, payee, max_per_payee)).fetchall()
        return NoticeQueued(True, tuple(sorted(row[0] for row in dropped)))

    def _op_discard_notice(self, payee: str, journal_id: int) -> bool:
        row = self._x("DELETE FROM notices WHERE payee = ? AND journal_id = ? RETURNING id",
                      (payee, journal_id)).fetchone()
        return row is not None

    # -- reads ------------------------------------------------------------

    def queued_notices(self, payee: str,
                       limit: int = MAX_QUEUED_NOTICES_PER_PAYEE) -> list[Notice]:
        """The notices waiting for *payee*, oldest first (they stay queued until discarded)."""
        if type(limit) is not int or limit < 1:
            raise ValueError("limit must be a positive int")
        rows = self._x(f"SELECT {_NOTICE_COLUMNS} FROM notices WHERE payee = ? ORDER BY id"
                       " LIMIT ?", (payee, limit)).fetchall()
        return [Notice(row[0], row[1], row[2], bytes(row[3]), row[4]) for row in rows]

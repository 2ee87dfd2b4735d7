"""Payee notices that could not be delivered: kept until the payee next registers.

The money has moved when a notice is queued; the notice only tells the payee.
The queue is in the ledger database (``mpay/ledger/notices.py`` holds its
rules), so a notice outlives a crash or restart of the PS and any PS sharing
the database delivers it.  Delivery is at least once: a notice is forgotten
only after the payee's device answered 2xx, and a device drops a journal id
it has seen.  Bounded per payee (oldest dropped first, logged): a statement
from the ledger is the authority, the notice a courtesy.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mpay.ledger.notices import MAX_QUEUED_NOTICES_PER_PAYEE, NoticeQueued


class NoticeQueue:
    """The PS's view of the queue: Deferreds from the ledger's writer and readers."""

    log = Logger()

    def __init__(self, ledger: Any, max_per_payee: int = MAX_QUEUED_NOTICES_PER_PAYEE):
        self.ledger = ledger
        self.max_per_payee = max_per_payee

    def push(self, payee: str, journal_id: int, notice: tuple[str, bytes]) -> defer.Deferred:
        """Queue *notice*, (From URI, body), of the movement *journal_id*; fires once it is
        on disk, with False if that movement's notice was queued already."""
        from_uri, body = notice

        def queued(result: NoticeQueued) -> bool:
            if result.dropped:
                self.log.warn("notices for {payee}: queue full, {count} oldest dropped (journal"
                              " ids {dropped}; the ledger keeps them)", payee=payee,
                              count=len(result.dropped), dropped=list(result.dropped))
            return result.new

        return self.ledger.queue_notice(payee, journal_id, from_uri, body,
                                        self.max_per_payee).addCallback(queued)

    def discard(self, payee: str, journal_id: int) -> defer.Deferred:
        """Forget a notice the payee confirmed; fires with False if it was not queued."""
        return self.ledger.discard_notice(payee, journal_id)

    def waiting(self, payee: str) -> defer.Deferred:
        """Fires with the Notices queued for *payee*, oldest first; they stay queued."""
        return self.ledger.queued_notices(payee, self.max_per_payee)

"""Payee notices that could not be delivered: kept until the payee next registers.

The money has moved when a notice is queued; the notice only tells the payee.
Bounded per payee (oldest dropped first, logged): a statement from the ledger
is the authority, the notice a courtesy.  In memory, per PS process.
"""

from __future__ import annotations

from collections import deque

from twisted.logger import Logger

MAX_QUEUED_NOTICES_PER_PAYEE = 100


class NoticeQueue:
    log = Logger()

    def __init__(self, max_per_payee: int = MAX_QUEUED_NOTICES_PER_PAYEE):
        self.max_per_payee = max_per_payee
        self._queues: dict[str, deque[tuple[str, bytes]]] = {}

    def push(self, payee: str, notice: tuple[str, bytes]) -> None:
        """*notice* is (From URI, body): the From is anonymous for a concealed payer."""
        queue = self._queues.setdefault(payee, deque())
        if len(queue) >= self.max_per_payee:
            queue.popleft()
            self.log.warn("notices for {payee}: queue full, oldest dropped (the ledger keeps it)",
                          payee=payee)
        queue.append(notice)

    def discard(self, payee: str, notice: tuple[str, bytes]) -> None:
        queue = self._queues.get(payee)
        if queue is not None and notice in queue:
            queue.remove(notice)
            if not queue:
                del self._queues[payee]

    def take(self, payee: str) -> list[tuple[str, bytes]]:
        """Every queued notice of *payee*, oldest first; the queue forgets them."""
        queue = self._queues.pop(payee, None)
        return list(queue) if queue else []

    def __len__(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

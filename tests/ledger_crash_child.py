"""The child of the crash-consistency test: load a SQLite ledger until killed.

    python -m tests.ledger_crash_child PATH

It keeps IN_FLIGHT transfers queued on a real ``LedgerService`` and writes the
journal id of each committed one to stdout, one per line, only after its
Deferred fired (that is, after its group's COMMIT returned).  The parent kills
it with SIGKILL at an arbitrary moment and checks that every id it was told
about is in the journal.
"""

from __future__ import annotations

import functools
import os
import random
import sys

from twisted.internet import defer, task

from mpay.ledger.api import Outcome
from mpay.ledger.service import LedgerService
from mpay.ledger.sqlite import SQLiteStore

ACCOUNTS = 20
IN_FLIGHT = 256
FUNDS_MINOR = 1_000_000


def acknowledge(result) -> None:
    if result.outcome is Outcome.COMMITTED:
        os.write(sys.stdout.fileno(), b"%d\n" % result.journal_id)


@defer.inlineCallbacks
def main(reactor, path: str):
    service = LedgerService(functools.partial(SQLiteStore.open, path), reactor)
    service.startService()
    numbers = [f"+8869{index:08d}" for index in range(ACCOUNTS)]
    yield defer.gatherResults([service.open_account(number) for number in numbers])
    funded = yield defer.gatherResults([service.cash_in(number, FUNDS_MINOR, f"fund|{number}")
                                        for number in numbers])
    for result in funded:
        acknowledge(result)
    rng = random.Random(os.getpid())
    serial = iter(range(10**12))

    def send(_=None):
        payer, payee = rng.sample(numbers, 2)
        sent = service.transfer(payer, payee, rng.randint(1, 5000), f"crash|{next(serial)}")
        sent.addCallback(acknowledge)
        sent.addCallback(send)
        return sent

    for _ in range(IN_FLIGHT):
        send()
    yield defer.Deferred()  # until SIGKILL


if __name__ == "__main__":
    task.react(main, sys.argv[1:])

"""kill -9 the PS with 1,000 timed sessions running, restart it: each is settled at its last
checkpoint, both ends are told, the books balance (issue 6, DESIGN section 7).

Charged by time keeps the money side of a running session in the PS's memory
(its start, its rate, Timer C); only what each session owed at the last
checkpoint is on disk.  This test shows that this is enough for a crash:

The real ``twistd mpay`` runs as a child process (``tests/crashload.py``) with
checkpoints every CHECKPOINT_S; MERCHANTS and CONSUMERS are Sim-DMDs in the
test process.  SESSIONS timed sessions are opened, OPENERS at a time, each a
new RECEIVE with a rate from one merchant to one consumer, until every one of
them has a checkpoint above zero in the ledger file.  Then the server gets
SIGKILL: nothing settles, nothing says goodbye.  What the ledger file holds
at that moment (read after the process is reaped) is what the restart must
charge.  The server is restarted on the same ports and files; it settles
every open session at that checkpoint in one transaction and sends BYE, with
``Reason: ...cause=503`` and the charge, to the merchant and to the consumer,
at the addresses their dialogs recorded (the devices keep listening there).

Then every session is settled at exactly its checkpointed amount, with one
journal row; every merchant and every consumer got one BYE per session with
that charge and, as the charge is above zero, a receipt signed by the PS's
key that says who paid whom; no session or hold is open; each consumer's
balance plus what its merchants got is its top-up; and ``mpay-admin audit``
passes.  Rates and top-ups are such that no Timer C fires: a charge here is
the checkpoint's, never the hold's limit.
"""

from __future__ import annotations

import collections
import json
import time

from twisted.internet import defer, reactor
from twisted.logger import Logger
from twisted.trial import unittest

from mpay.payment.sessions import REASON_RESTART
from tests.crashload import ServerRuns, devices_for, eventually

MERCHANTS = tuple(f"+88622333{index:04d}" for index in range(1, 5))
CONSUMERS = tuple(f"+8869123{index:05d}" for index in range(1, 6))

SESSIONS = 1_000
"""Timed sessions running when the server is killed; each (merchant, consumer) pair has 50."""

OPENERS = 50
"""Sessions being opened at once (each opener waits for its 200 before the next RECEIVE)."""

MAX_RATE_MINOR_PER_S = 3
"""Session i runs at 1 + i % MAX_RATE_MINOR_PER_S minor units a second: low, and not all equal."""

CHECKPOINT_S = 0.5
"""The PS's checkpoint interval here (5 s by default): every session has one soon."""

TOP_UP_MINOR = 1_000_000
"""Each consumer's money: its 200 sessions, 400 units/s together, last over 40 min (no Timer C)."""

CHECKPOINT_WAIT_TRIES = 200
CHECKPOINT_POLL_S = 0.1
"""The ledger file is read this often, this many times, until every session has a checkpoint."""

BYE_WAIT_TRIES = 300
BYE_POLL_S = 0.1
"""After the restart, the devices are looked at this often, this many times, for every BYE."""

SESSION_ROWS = ("SELECT id, consumer, merchant, session_ref, status, checkpointed_amount,"
                " charged, journal_id, dialog FROM sessions ORDER BY id")

log = Logger()


class SessionRestartTests(unittest.TestCase):
    """The PS dies with sessions running; what they owed at the last checkpoint is what they pay."""

    timeout = 240   # seconds; a run takes well under one, a restart that never comes 30

    @defer.inlineCallbacks
    def setUp(self):
        self.servers = ServerRuns(self, reactor, settings=(f"ps.checkpoint_s={CHECKPOINT_S}",))
        yield self.servers.start()

    def sessions(self) -> list[tuple]:
        return self.servers.current.query(SESSION_ROWS)

    def checkpoints(self) -> tuple[int, float | None, float | None]:
        """Open sessions with a checkpoint above zero; the oldest and newest checkpoint time."""
        [row] = self.servers.current.query(
            "SELECT COUNT(*) FILTER (WHERE status = 'open' AND checkpointed_amount > 0),"
            " MIN(checkpointed), MAX(checkpointed) FROM sessions")
        return row

    @defer.inlineCallbacks
    def two_checkpoints(self):
        """Until every session has a checkpoint, and then a later one (the PS's clock).

        Fires with what the first round recorded: id -> amount.  The kill then
        comes after at least one more, so "the last checkpoint" is not the first.
        """
        yield eventually(reactor, lambda: self.checkpoints()[0] == SESSIONS,
                         CHECKPOINT_WAIT_TRIES, CHECKPOINT_POLL_S,
                         "a checkpoint above zero for every session")
        first = {row[0]: row[5] for row in self.sessions()}
        newest = self.checkpoints()[2]
        yield eventually(reactor, lambda: self.checkpoints()[1] > newest,
                         CHECKPOINT_WAIT_TRIES, CHECKPOINT_POLL_S,
                         "a second checkpoint for every session")
        return first

    @defer.inlineCallbacks
    def open_sessions(self, merchants, consumers) -> dict[str, tuple[str, str, int]]:
        """SESSIONS sessions, OPENERS at a time: merchant Call-ID -> (merchant, consumer, rate)."""
        opened: dict[str, tuple[str, str, int]] = {}
        jobs = iter(range(SESSIONS))

        @defer.inlineCallbacks
        def opener():
            for index in jobs:
                merchant = MERCHANTS[index % len(MERCHANTS)]
                consumer = CONSUMERS[index // len(MERCHANTS) % len(CONSUMERS)]
                rate = 1 + index % MAX_RATE_MINOR_PER_S
                response = yield merchants[merchant].charge(consumer, rate=rate)
                self.assertEqual(response.status, 200, f"session {index}: {response.reason}")
                opened[response.call_id] = (merchant, consumer, rate)

        yield defer.gatherResults([opener() for _ in range(OPENERS)], consumeErrors=True)
        return opened

    @defer.inlineCallbacks
    def test_kill_9_settles_every_session_at_its_last_checkpoint(self):
        started = time.monotonic()
        devices = devices_for(self, reactor, self.servers.current)
        merchants, consumers = {}, {}
        for number in MERCHANTS:
            merchants[number] = yield devices.ready(number)
        for number in CONSUMERS:
            consumers[number] = yield devices.ready(number)
            consumers[number].charge_policy = lambda asked: 200
            code, output = yield self.servers.admin("topup", number, str(TOP_UP_MINOR))
            self.assertEqual(code, 0, output)
        enrolled = time.monotonic()

        opened = yield self.open_sessions(merchants, consumers)
        self.assertEqual(len(opened), SESSIONS)
        first = yield self.two_checkpoints()
        yield self.servers.current.kill()
        killed = time.monotonic()

        at_kill = {row[0]: row for row in self.sessions()}
        self.assertEqual(len(at_kill), SESSIONS)
        consumer_call = {}   # merchant Call-ID -> the consumer's (the PS's RECEIVE to it)
        for id_, consumer, merchant, ref, status, checkpointed, _, _, dialog in at_kill.values():
            self.assertEqual(status, "open", "a session settled before the kill")
            self.assertGreater(checkpointed, 0)
            merchant_call = ref.split("|", 1)[1]
            self.assertEqual(opened[merchant_call][:2], (merchant, consumer))
            consumer_call[merchant_call] = json.loads(dialog)["consumer"]["call_id"]
            self.assertGreaterEqual(checkpointed, first[id_], "a checkpoint went down")
        self.assertGreater(sum(row[5] for row in at_kill.values()), sum(first.values()),
                           "the checkpoints moved on before the kill")
        for device in [*merchants.values(), *consumers.values()]:
            self.assertEqual(device.session_ends, [], "a session ended before the kill")

        yield self.servers.start()
        ends_due = 2 * SESSIONS
        yield eventually(reactor, lambda: sum(len(d.session_ends) for d in
                                              [*merchants.values(), *consumers.values()]) >= ends_due,
                         BYE_WAIT_TRIES, BYE_POLL_S, "a BYE to both sides of every session")
        restarted = time.monotonic()

        code, output = yield self.servers.admin("audit")
        self.assertEqual(code, 0, f"audit after the restart: {output}")

        journal = {row[0]: row[1:] for row in self.servers.current.query(
            "SELECT id, kind, debit, credit, amount, reference FROM journal")}
        charged_by = collections.Counter()   # consumer -> what it paid; merchant -> what it got
        ends = {number: {end["call_id"]: end for end in device.session_ends}
                for number, device in [*merchants.items(), *consumers.items()]}
        for row in self.sessions():
            id_, consumer, merchant, ref, status, checkpointed, charged, journal_id, _ = row
            expected = at_kill[id_][5]
            self.assertEqual((status, charged), ("settled", expected),
                             f"session {id_} is settled at its last checkpoint")
            self.assertEqual(journal[journal_id], ("session", consumer, merchant, expected, ref))
            charged_by[consumer] += expected
            charged_by[merchant] += expected
            merchant_call = ref.split("|", 1)[1]
            for number, call_id, payer in ((merchant, merchant_call, consumer),
                                           (consumer, consumer_call[merchant_call], consumer)):
                end = ends[number].get(call_id)
                self.assertIsNotNone(end, f"{number} got no BYE for session {id_}")
                self.assertEqual((end["by"], end["reason"], end["charged"]),
                                 ("peer", REASON_RESTART, expected))
                receipt = end["receipt"]   # verified with the PS's pinned key by the device
                self.assertEqual((receipt.journal_id, receipt.payer, receipt.payee,
                                  receipt.amount), (journal_id, payer, merchant, expected))
        for number, device in [*merchants.items(), *consumers.items()]:
            self.assertEqual(device.sessions, {}, f"{number} still has a session")
            self.assertEqual(len(device.session_ends), len(ends[number]), f"{number}: a BYE twice")

        self.assertEqual(self.servers.current.query(
            "SELECT COUNT(*) FROM holds WHERE status = 'active'"), [(0,)])
        balances = {number: (balance, held) for number, balance, held in
                    self.servers.current.query("SELECT number, balance, held FROM accounts")}
        for consumer in CONSUMERS:
            self.assertEqual(balances[consumer], (TOP_UP_MINOR - charged_by[consumer], 0))
        for merchant in MERCHANTS:
            self.assertEqual(balances[merchant], (charged_by[merchant], 0))
        users = sum(balances[number][0] for number in (*MERCHANTS, *CONSUMERS))
        self.assertEqual(users, len(CONSUMERS) * TOP_UP_MINOR, "money made or lost")

        log.info("session restart: {sessions} sessions charged {total} in all; enrolment"
                 " {enrol:.1f} s, opening to kill {run:.1f} s, restart to the last BYE"
                 " {restart:.1f} s; server logs in {logs}", sessions=SESSIONS,
                 total=sum(charged_by[c] for c in CONSUMERS), enrol=enrolled - started,
                 run=killed - enrolled, restart=restarted - killed, logs=self.servers.logs)

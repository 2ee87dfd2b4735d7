"""kill -9 the server under a load of transfers, restart it: nothing answered is lost (issue 5).

The real ``twistd mpay`` runs as a child process with every file in a temp
dir of its own; a payer and a payee (Sim-DMDs) live in the test process.
CALLERS callers send TRANSFERS small transfers from the payer, each waiting
for its answer before sending the next, so CALLERS are always in flight.  Once
KILL_AFTER_ANSWERED have been answered the server gets SIGKILL, is restarted
on the same ports and files, and the load goes on: the requests in flight
during the crash are retransmitted by their client transactions (RFC 3261
Timer E) and answered by the new process -- with the original receipt when
they had committed before the kill (the idempotency key is in the journal),
committed now otherwise.  The payee re-registers, since its location binding
died with the process; the payer's ticket stays valid (K_PS is in its key file).

Then ``mpay-admin audit`` passes, every transfer answered 200 or 202 is in the
journal with its payer, payee and amount, no request moved money twice, and
both balances are what the journal says.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import time

from twisted.internet import defer, reactor, task
from twisted.logger import Logger
from twisted.trial import unittest

from mpay.auth import wire
from mpay.auth.crypto import encode_b64
from mpay.sip.endpoint import SIPTimeout
from tests.crashload import ServerProcess, devices_for, free_udp_ports, run_admin

PAYER = "+886912345678"
PAYEE = "+886987654321"

TRANSFERS = 1_000
"""Transfers sent by the load, before, across and after the crash."""

CALLERS = 50
"""Transfers in flight at once (each caller waits for its answer before the next)."""

KILL_AFTER_ANSWERED = 300
"""Answers received before the server is killed."""

MAX_TRANSFER_MINOR = 7
"""Transfer i moves 1 + i % MAX_TRANSFER_MINOR minor units: a wrong amount shows."""

FINAL_TRANSFER_MINOR = 100
"""The one more transfer made after the load, on the restarted server."""

TOP_UP_MINOR = TRANSFERS * MAX_TRANSFER_MINOR + FINAL_TRANSFER_MINOR
"""Enough for every transfer: a refusal for want of credit would be a bug here."""

NOTICE_WAIT_TRIES = 100
"""Looks for a notice, sent after the PS answered the payee's REGISTER, before giving up."""

NOTICE_WAIT_S = 0.05
"""Pause between those looks."""

COMMITTED = (200, 202)
"""Both mean the money moved (202: payee offline, notice queued)."""

log = Logger()


def amount_of(index: int) -> int:
    return 1 + index % MAX_TRANSFER_MINOR


class CrashTests(unittest.TestCase):
    """The server's process dies mid-load; the books and the answers it gave must not."""

    timeout = 120   # seconds; a run takes a few, a restart that never comes 30 (READY_TIMEOUT_S)

    @defer.inlineCallbacks
    def setUp(self):
        # Short and private: the modem's UNIX socket path must stay under 108 bytes.
        self.dir = tempfile.mkdtemp(prefix="mpay-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.ports = free_udp_ports(2)
        # Server logs go to _trial_temp, which outlives the test, for a post-mortem.
        self.logs = os.path.abspath(self.mktemp())
        os.makedirs(self.logs)
        self.servers: list[ServerProcess] = []
        yield self.start_server()

    @defer.inlineCallbacks
    def start_server(self):
        """A new process on the same ports and files; stopped in cleanup even if the test fails."""
        logfile = os.path.join(self.logs, f"server-{len(self.servers) + 1}.log")
        server = ServerProcess(reactor, self.dir, *self.ports, logfile=logfile)
        self.servers.append(server)
        server.start()
        self.addCleanup(server.stop)
        yield server.wait_ready()
        return server

    def admin(self, *args: str) -> defer.Deferred:
        """``mpay-admin --db sqlite:LEDGER ARGS``: (exit status, its output)."""
        return run_admin(self.servers[-1].ledger_path, *args)

    def journal(self) -> tuple[list[tuple], dict[str, int]]:
        """Transfer rows (id, debit, credit, amount, reference, created) and balances, read-only."""
        connection = sqlite3.connect(f"file:{self.servers[-1].ledger_path}?mode=ro", uri=True)
        try:
            rows = connection.execute(
                "SELECT id, debit, credit, amount, reference, created FROM journal"
                " WHERE kind = 'transfer' ORDER BY id").fetchall()
            balances = dict(connection.execute(
                "SELECT number, balance FROM accounts WHERE number IN (?, ?)", (PAYER, PAYEE)))
        finally:
            connection.close()
        return rows, balances

    @staticmethod
    def record_requests(device) -> dict[str, tuple[int, str]]:
        """Call-ID -> (amount, digest) of every transfer *device* sends."""
        sent: dict[str, tuple[int, str]] = {}
        authenticate = device.authenticate

        def recording(request):
            request = authenticate(request)        # as it goes to the PS
            if request.method == "MESSAGE":
                amount = json.loads(request.body)["amount"]
                sent[request.call_id] = (amount, encode_b64(wire.digest_of(request)))
            return request

        device.authenticate = recording
        return sent

    @defer.inlineCallbacks
    def crash_and_restart(self, payee):
        """kill -9, reap, start again; the payee tells the new process where it is.

        Fires with the audit run at once on the recovered ledger, under the
        load that goes on meanwhile: (exit status, output).
        """
        yield self.servers[-1].kill()
        yield self.start_server()
        yield payee.register()
        return (yield self.admin("audit"))

    @defer.inlineCallbacks
    def test_kill_9_keeps_a_queued_notice(self):
        """202 "Notice Queued" is a promise on disk: the payee is told after a kill -9."""
        devices = devices_for(self, reactor, self.servers[0])
        payer = yield devices.ready(PAYER)
        payee = yield devices.ready(PAYEE)
        code, output = yield self.admin("topup", PAYER, str(FINAL_TRANSFER_MINOR))
        self.assertEqual(code, 0, output)
        yield payee.register(expires_s=0)
        response, receipt = yield payer.transfer(PAYEE, FINAL_TRANSFER_MINOR)
        self.assertEqual(response.status, 202)
        yield self.servers[-1].kill()
        yield self.start_server()
        yield payee.register()
        for _ in range(NOTICE_WAIT_TRIES):
            if payee.notices:
                break
            yield task.deferLater(reactor, NOTICE_WAIT_S, lambda: None)
        self.assertEqual([(n["journal_id"], n["amount"]) for n in payee.notices],
                         [(receipt.journal_id, FINAL_TRANSFER_MINOR)])

    @defer.inlineCallbacks
    def test_kill_9_under_transfer_load_loses_nothing_answered(self):
        devices = devices_for(self, reactor, self.servers[0])
        payer = yield devices.ready(PAYER)
        payee = yield devices.ready(PAYEE)
        code, output = yield self.admin("topup", PAYER, str(TOP_UP_MINOR))
        self.assertEqual(code, 0, output)

        sent = self.record_requests(payer)
        answered: dict[str, tuple[int, object]] = {}   # Call-ID -> (status, receipt)
        timed_out: list[int] = []
        crash: list[defer.Deferred] = []
        restart_failed: list[object] = []
        at_kill: dict[str, float] = {}

        def jobs():
            for index in range(TRANSFERS):
                if restart_failed:
                    return      # no server: do not wait out Timer F for every job left
                yield index

        queue = jobs()

        @defer.inlineCallbacks
        def caller():
            for index in queue:
                try:
                    response, receipt = yield payer.transfer(PAYEE, amount_of(index))
                except SIPTimeout:
                    timed_out.append(index)
                    continue
                answered[response.call_id] = (response.status, receipt)
                if len(answered) == KILL_AFTER_ANSWERED and not crash:
                    at_kill.update(answered=len(answered), time=time.time(),
                                   in_flight=len(sent) - len(answered) - len(timed_out))
                    crash.append(self.crash_and_restart(payee).addErrback(
                        lambda failure: restart_failed.append(failure) or failure))

        yield defer.gatherResults([caller() for _ in range(CALLERS)], consumeErrors=True)
        self.assertEqual(len(crash), 1, "the server was never killed")
        code, output = yield crash[0]
        self.assertEqual(code, 0, f"audit just after the restart: {output}")
        self.assertGreater(at_kill["in_flight"], 0, "nothing was in flight at the kill")

        # One more, on the restarted server, with the ticket issued before the crash.
        response, final = yield payer.transfer(PAYEE, FINAL_TRANSFER_MINOR)
        self.assertEqual(response.status, 200, "the re-registered payee confirms")
        self.assertIn(final.journal_id, [notice["journal_id"] for notice in payee.notices])
        answered[response.call_id] = (response.status, final)

        code, output = yield self.admin("audit")
        self.assertEqual(code, 0, f"audit after the load: {output}")

        rows, balances = self.journal()
        by_id = {row[0]: row for row in rows}
        for call_id, (status, receipt) in answered.items():
            amount, digest = sent[call_id]
            self.assertIn(status, COMMITTED)
            self.assertEqual((receipt.payer, receipt.payee, receipt.amount, receipt.digest),
                             (PAYER, PAYEE, amount, digest), "the receipt answers this request")
            self.assertIn(receipt.journal_id, by_id, f"answered {status}, not in the journal")
            self.assertEqual(by_id[receipt.journal_id][1:5], (PAYER, PAYEE, amount, call_id))
        references = [row[4] for row in rows]
        self.assertEqual(len(references), len(set(references)), "a request moved money twice")
        for _, debit, credit, amount, reference, _ in rows:
            self.assertIn(reference, sent, "money moved for a request never sent")
            self.assertEqual((debit, credit, amount), (PAYER, PAYEE, sent[reference][0]))
        moved = sum(row[3] for row in rows)
        self.assertEqual(balances, {PAYER: TOP_UP_MINOR - moved, PAYEE: moved})

        log.info("crash test: killed after {answered} answers with {in_flight} in flight;"
                 " {committed} committed before the kill; {total} transfer rows, {timed_out}"
                 " timed out; server logs in {logs}", answered=at_kill["answered"],
                 in_flight=at_kill["in_flight"], total=len(rows), timed_out=len(timed_out),
                 committed=sum(1 for row in rows if row[5] < at_kill["time"]), logs=self.logs)

"""``mpay-dmd`` as a person runs it: real processes against in-process servers (issue 6).

A consumer enrols and listens with ``--auto-confirm``; a merchant enrols,
charges a fixed amount, runs a timed session for a second, and runs one
detached and stops it from another process.  Each step is a separate
``mpay-dmd`` process reading an INI file, as in the README.
"""

from __future__ import annotations

import os
import re
import sys

from twisted.internet import defer, reactor, utils
from twisted.trial import unittest

from mpay.sip import tls
from tests.flow import MpayFixture
from tests.support import ProcessOutput

CONSUMER = "+886912345678"
MERCHANT = "+886223334444"
TOP_UP_MINOR = 5_000
LISTEN_S = 30.0
READY_TRIES = 200


class DmdCommandLineTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.mpay = MpayFixture(self)
        yield self.mpay.start()
        self.ini = os.path.join(self.mpay.dir, "mpay.ini")
        with open(self.ini, "w") as handle:
            streams = {role: {kind: self.mpay.address(role, kind.upper())[1]
                              for kind in ("tcp", "tls")} for role in ("as", "ps")}
            handle.write(f"""[as]
listen = udp:{self.mpay.address('as')[1]}:interface=127.0.0.1
listen_tcp = tcp:{streams['as']['tcp']}:interface=127.0.0.1
listen_tls = tls:{streams['as']['tls']}:interface=127.0.0.1
signing_key = {self.mpay.dir}/as.pem
[ps]
listen = udp:{self.mpay.address('ps')[1]}:interface=127.0.0.1
listen_tcp = tcp:{streams['ps']['tcp']}:interface=127.0.0.1
listen_tls = tls:{streams['ps']['tls']}:interface=127.0.0.1
signing_key = {self.mpay.dir}/ps.pem
[tls]
certificate = {self.mpay.dir}/tls.crt
[callerid]
sim_control = {self.mpay.dir}/modem.sock
""")

    def argv(self, number, *command):
        return ["-m", "mpay.cli.dmd", "--config", self.ini,
                "--state", os.path.join(self.mpay.dir, f"{number}.json"), *command]

    @defer.inlineCallbacks
    def dmd(self, number, *command, expect=0):
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable, self.argv(number, *command), env=os.environ, path=os.getcwd())
        text = (out + err).decode()
        self.assertEqual(code, expect, text)
        return text

    @defer.inlineCallbacks
    def listen(self, *options, **spawn):
        """The consumer's ``mpay-dmd listen`` as a child process, once it is listening."""
        listener = ProcessOutput()
        reactor.spawnProcess(listener, sys.executable,
                             [sys.executable, *self.argv(CONSUMER, "listen", CONSUMER, *options,
                                                         "--seconds", str(LISTEN_S))],
                             env=os.environ, path=os.getcwd(), **spawn)
        self.addCleanup(lambda: listener.ended if listener.ended.called else
                        (listener.transport.signalProcess("KILL"), listener.ended)[1])
        yield self.mpay.eventually(lambda: b"listening" in listener.output, tries=READY_TRIES)
        return listener

    @defer.inlineCallbacks
    def enrolled(self):
        for number in (CONSUMER, MERCHANT):
            yield self.dmd(number, "enroll", number)
            yield self.dmd(number, "ticket", number)
        yield self.mpay.top.ledger.cash_in(CONSUMER, TOP_UP_MINOR, "cli-topup")

    @defer.inlineCallbacks
    def test_merchant_charges_and_runs_sessions_against_a_listening_consumer(self):
        yield self.enrolled()
        listener = yield self.listen("--auto-confirm")

        charged = yield self.dmd(MERCHANT, "charge", MERCHANT, CONSUMER, "1200")
        self.assertIn("200 OK", charged)
        self.assertIn(f"1200 TWD from {CONSUMER} to {MERCHANT}", charged)

        session = yield self.dmd(MERCHANT, "session", "start", MERCHANT, CONSUMER, "100",
                                 "--seconds", "1")
        self.assertIn("session ended by this merchant: charged", session)
        first = int(re.search(r"charged (\d+)", session).group(1))
        self.assertGreaterEqual(first, 100)

        detached = yield self.dmd(MERCHANT, "session", "start", MERCHANT, CONSUMER, "10", "--detach")
        self.assertIn("session stop", detached)
        stopped = yield self.dmd(MERCHANT, "session", "stop", MERCHANT)
        self.assertIn("session ended by this merchant", stopped)
        second = int(re.search(r"charged (\d+)", stopped).group(1))
        again = yield self.dmd(MERCHANT, "session", "stop", MERCHANT, expect=1)
        self.assertIn("no detached session", again)

        merchant = yield self.mpay.top.ledger.balance(MERCHANT)
        self.assertEqual(merchant.balance, 1200 + first + second)
        yield self.mpay.eventually(lambda: listener.output.count(b"session ended") >= 2)
        self.assertIn(b"asks you to pay 1200 TWD: paying (--auto-confirm)", listener.output)
        self.assertIn(b"asks you to pay 100 TWD per second", listener.output)
        report = yield self.mpay.top.ledger.audit()
        self.assertTrue(report.ok, report.format())

    @defer.inlineCallbacks
    def test_a_consumer_without_a_terminal_declines(self):
        yield self.enrolled()
        listener = yield self.listen(childFDs={0: "w", 1: "r", 2: "r"})
        refused = yield self.dmd(MERCHANT, "charge", MERCHANT, CONSUMER, "300")
        self.assertIn("603 Decline", refused)
        self.assertIn(b"declined (no terminal to ask", listener.output)
        self.assertEqual((yield self.mpay.top.ledger.balance(CONSUMER)).balance, TOP_UP_MINOR)

    @defer.inlineCallbacks
    def test_the_person_at_the_terminal_confirms_one_charge_and_declines_another(self):
        yield self.enrolled()
        listener = yield self.listen(usePTY=True)   # stdin is a terminal: the person is asked

        @defer.inlineCallbacks
        def answer_when_asked(count, keys):
            yield self.mpay.eventually(lambda: listener.output.count(b"Pay? [y/N]") >= count)
            listener.transport.write(keys)

        answered = answer_when_asked(1, b"y\n")
        paid = yield self.dmd(MERCHANT, "charge", MERCHANT, CONSUMER, "700")
        yield answered
        self.assertIn("200 OK", paid)
        self.assertIn(f"{MERCHANT} asks you to pay 700 TWD. Pay? [y/N]".encode(), listener.output)

        answered = answer_when_asked(2, b"n\n")
        refused = yield self.dmd(MERCHANT, "charge", MERCHANT, CONSUMER, "300")
        yield answered
        self.assertIn("603 Decline", refused)
        self.assertEqual((yield self.mpay.top.ledger.balance(CONSUMER)).balance, TOP_UP_MINOR - 700)

    @defer.inlineCallbacks
    def test_enrol_and_pay_over_tcp_and_over_tls(self):
        for transport, payer in (("tcp", CONSUMER), ("tls", MERCHANT)):
            for step in ("enroll", "ticket", "register"):
                yield self.dmd(payer, "--transport", transport, step, payer)
            binding = yield self.mpay.ps_core.registrar.locations.lookup(payer)
            self.assertEqual(binding.transport, transport.upper())
            yield self.mpay.top.ledger.cash_in(payer, TOP_UP_MINOR, f"cli-topup-{transport}")
        paid = yield self.dmd(CONSUMER, "--transport", "tls", "transfer", CONSUMER, MERCHANT, "250")
        # The merchant registered over TLS but its connection closed with its process.
        self.assertIn("202 Payee Offline, Notice Queued", paid)
        self.assertIn(f"250 TWD from {CONSUMER} to {MERCHANT}", paid)
        self.assertEqual(self.mpay.top.endpoints["ps"].flows, {}, "every CLI connection closed")

    @defer.inlineCallbacks
    def test_a_certificate_not_trusted_is_refused(self):
        other = os.path.join(self.mpay.dir, "other")
        tls.make_self_signed(other + ".crt", other + ".key", ["127.0.0.1"])
        refused = yield self.dmd(CONSUMER, "--transport", "tls", "--tls-trust", other + ".crt",
                                 "enroll", CONSUMER, expect=1)
        self.assertIn("certificate verify failed", refused)

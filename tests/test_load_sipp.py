"""The SIPp generator (``mpay.load.sipp``): the scenario SIPp sends is the request a
Sim-DMD builds (the same digest, so the same authenticator and signature hold), its
log reads back, and a real SIPp carries a small sweep with the books kept.

`make test` installs SIPp (Debian sip-tester) as root, as on CI; where it cannot,
the sweep says so as a skip instead of pretending to have passed.
"""

import base64
import io
import os
import re
import sys

from twisted.internet import defer
from twisted.trial import unittest

from mpay.auth import wire
from mpay.load import sipp
from mpay.load.devices import LOOPBACK
from mpay.load.run import LoadSettings, check_schedule
from mpay.sim.device import Device, DeviceState
from mpay.sip.parser import parse

from tests.support import sweep_once

DOMAIN = "mpay.test"
PAYER, PAYEE = "+886910000007", "+886920000003"


class _Socket:
    sent_by = (LOOPBACK, 40001)


def payer() -> Device:
    state = DeviceState.new(PAYER)
    state.ticket = base64.urlsafe_b64encode(os.urandom(90)).decode().rstrip("=")
    state.k_c_ps = base64.b64encode(os.urandom(32)).decode()
    device = Device(state, domain=DOMAIN, as_addr=("127.0.0.1", 1), ps_addr=("127.0.0.1", 2),
                    as_identity="", pinned_as_key=None, ring=lambda number, line: None,
                    clock=lambda: 1.8e9)
    device.endpoint = _Socket()
    return device


def render(scenario: str, fields: sipp.CallFields, call_id: str) -> bytes:
    """The first message of *scenario* as SIPp would send it for one call."""
    text = re.search(r"<!\[CDATA\[\n(.*?)\n\]\]>", scenario, re.S).group(1)
    head, body = text.split("\n\n", 1)
    body = body.encode() + sipp.BODY_END
    values = {f"field{index}": str(value) for index, value in enumerate(fields)}
    values.update(call_id=call_id, transport="UDP", local_ip="127.0.0.1", local_port="5061",
                  branch="z9hG4bK-1-1-0", len=f"{len(body):5d}")
    head = re.sub(r"\[(\w+)\]", lambda match: values[match.group(1)], head)
    return head.replace("\n", "\r\n").encode() + b"\r\n\r\n" + body


class ScenarioTests(unittest.TestCase):
    def build(self, device: Device, call_number: int = 7):
        call_id = sipp.call_id("run1-0", call_number, LOOPBACK)
        request = device.transfer_request(PAYEE, 1, body_end=sipp.BODY_END, call_id=call_id)
        return request, call_id

    def test_what_sipp_sends_has_the_digest_the_device_signed(self):
        device = payer()
        request, call_id = self.build(device)
        fields = sipp.call_fields(request, PAYEE, PAYER, DOMAIN)
        sent = parse(render(sipp.uac_scenario(DOMAIN, b'{"amount": 1}\r\n'), fields, call_id))
        self.assertEqual(wire.digest_of(sent), wire.digest_of(request))
        self.assertEqual(sent.call_id, call_id)
        skipped = {"via", "content-length"}
        self.assertEqual([item for item in sent.headers._items if item[0] not in skipped],
                         [item for item in request.headers._items if item[0] not in skipped])
        self.assertEqual(sent.body, b'{"amount": 1}\r\n')

    def test_the_call_id_is_sipps_for_that_call_number(self):
        self.assertEqual(sipp.cid_format("run1-0", LOOPBACK).replace("%u", "12"),
                         sipp.call_id("run1-0", 12, LOOPBACK))

    def test_call_n_takes_line_n_minus_one(self):
        text = sipp.injection_file(["a;1", "b;2"])
        self.assertEqual(text.splitlines(), ["SEQUENTIAL", "a;1", "b;2"])

    def test_a_field_holding_the_separator_is_refused(self):
        fields = sipp.CallFields(PAYEE, PAYER, "tag;x", 1, "s", "t", "a")
        self.assertRaises(AssertionError, fields.line)

    def test_a_request_other_than_the_scenarios_is_refused(self):
        device = payer()
        request, _ = self.build(device)
        self.assertRaises(AssertionError, sipp.call_fields, request, "+886920000004", PAYER, DOMAIN)

    def test_every_status_the_scenario_waits_for_gets_a_log_line(self):
        scenario = sipp.uac_scenario(DOMAIN, b'{"amount": 1}\r\n')
        for status in sipp.FINAL_STATUSES:
            self.assertIn(f'<recv response="{status}" optional="true" next="s{status}"/>',
                          scenario)
            self.assertIn(f'<log message="[call_number] {status} ', scenario)
        self.assertIn('<log message="[call_number] 200 ', scenario)

    def test_the_payees_answer_echoes_the_notice(self):
        scenario = sipp.uas_scenario()
        for header in ("[last_Via:]", "[last_From:]", "[last_To:];tag=", "[last_Call-ID:]",
                       "[last_CSeq:]"):
            self.assertIn(header, scenario)


class LogTests(unittest.TestCase):
    def test_calls_read_back_with_times_status_and_journal_id(self):
        calls = sipp.read_calls([
            "1 200 1796308613.000000 256624.000000 1796308613.000000 258207.000000 12345\n",
            "2 503 1796308613.000000 999000.000000 1796308614.000000 1000.000000 -\n",
            "2026-12-03 14:36:47.149707 1796308607.149707: Aborting call on unexpected message\n",
            "3 200 x y z w 1\n",
            "4 200 1796308613.000000 0.000000 1796308613.000000 5000.000000 \n",
        ])
        self.assertEqual(sorted(calls), [1, 2, 4])
        self.assertEqual((calls[4].status, calls[4].journal_id), (200, None))
        self.assertEqual((calls[1].status, calls[1].journal_id), (200, 12345))
        self.assertAlmostEqual(calls[1].latency_s, 0.001583, places=6)
        self.assertAlmostEqual(calls[1].sent_s, 1796308613.256624, places=5)
        self.assertEqual((calls[2].status, calls[2].journal_id), (503, None))
        self.assertAlmostEqual(calls[2].latency_s, 0.002, places=6)

    def test_retransmissions_come_from_the_last_stat_line(self):
        stats = ("StartTime;Retransmissions(P);Retransmissions(C)\n"
                 "a;0;0\n"
                 "b;3;17\n")
        self.assertEqual(sipp.retransmissions(stats), 17)
        self.assertEqual(sipp.retransmissions(""), 0)


class ScheduleCheckTests(unittest.TestCase):
    def test_a_sipp_share_older_than_its_authenticators_may_be_is_refused(self):
        settings = LoadSettings(generator=sipp.SIPP)
        check_schedule(settings, [0.0, 100.0])
        self.assertRaises(RuntimeError, check_schedule, settings, [0.0, 1000.0])
        check_schedule(LoadSettings(), [0.0, 1000.0])    # the lean sender builds as it goes


class SippSweepTests(unittest.TestCase):
    """A sweep of one rate with SIPp as the payers and the payees, against the real server."""

    if sipp.binary() is None:
        skip = "SIPp is not installed (Debian package sip-tester; `make test` installs it as root)"

    timeout = 120

    @defer.inlineCallbacks
    def test_a_small_sweep_through_sipp_keeps_the_books(self):
        count = 200
        args, report, out = yield sweep_once(self, count, [
            "--rates", "6000", "--payers", "2", "--payees", "2", "--workers", "2",
            "--generator", "sipp"])
        self.assertEqual(report.stats.generator, "sipp")
        self.assertIn("sipp generator", out)
        self.assertGreater(report.stats.generator_cpu_pct, 0.0, "SIPp's CPU is counted")
        latencies = [report.stats.mean_ms, report.stats.p99_ms]
        self.assertTrue(all(0 < value < 2000 for value in latencies), latencies)


class CommandLineTests(unittest.TestCase):
    def test_sipp_takes_uniform_arrivals_only(self):
        from mpay.cli import load
        self.patch(sys, "stderr", io.StringIO())
        self.assertRaises(SystemExit, load.parse_args, ["--generator", "sipp", "--arrival",
                                                        "poisson"])

    def test_the_generator_yields_to_the_server_unless_told(self):
        from mpay.cli import load
        self.assertEqual(load.parse_args([]).nice, load.GENERATOR_NICE)
        self.assertGreater(load.GENERATOR_NICE, 0)
        self.assertEqual(load.parse_args(["--nice", "0"]).nice, 0)


class SenderTests(unittest.TestCase):
    """The sender's reading of SIPp's log: outcomes in schedule order, or no run at all."""

    if sipp.binary() is None:
        skip = "SIPp is not installed (Debian package sip-tester; `make test` installs it as root)"

    def simulator(self):
        from dataclasses import asdict

        from twisted.internet import task

        from mpay.load.sipp_sender import SippPayerSimulator
        plan = {"ps_addr": ["127.0.0.1", 5060], "domain": DOMAIN, "payees": [PAYEE],
                "amount_minor": 1, "timeout_s": 2.0, "rate_per_min": 600.0, "run_tag": "t-0",
                "payers": [asdict(payer().state)], "schedule": [[4, 0.0], [6, 0.1], [8, 0.2]]}
        simulator = SippPayerSimulator(task.Clock(), plan, lambda report: None)
        self.addCleanup(simulator.close)
        simulator.process = sipp.SippProcess()
        simulator.process.output += b"sipp: could not bind"
        return simulator

    def write_log(self, simulator, text: str) -> None:
        with open(os.path.join(simulator.directory, "calls.log"), "w") as log_file:
            log_file.write(text)

    def test_each_call_becomes_the_outcome_of_its_request(self):
        simulator = self.simulator()
        self.write_log(simulator, "1 200 100.000000 0.000000 100.000000 3000.000000 41\n"
                                  "3 503 100.000000 250000.000000 100.000000 255000.000000 -\n")
        simulator._ended(1)
        report = self.successResultOf(simulator.finished)
        outcomes = report["result"]
        self.assertEqual([outcome[0] for outcome in outcomes], [4, 6, 8])
        self.assertEqual([outcome[1] for outcome in outcomes], [200, None, 503])
        self.assertAlmostEqual(outcomes[0][2], 0.003)
        self.assertEqual(outcomes[0][4], 41)
        self.assertAlmostEqual(outcomes[2][3], 0.05, places=6)   # sent 50 ms behind its pace
        self.assertFalse(os.path.exists(simulator.directory), "its files are removed")

    def test_a_sipp_that_logged_nothing_is_a_run_not_made(self):
        simulator = self.simulator()
        simulator._ended(255)
        failure = self.failureResultOf(simulator.finished, RuntimeError)
        self.assertIn("sipp exited 255 and logged no call: sipp: could not bind",
                      failure.getErrorMessage())

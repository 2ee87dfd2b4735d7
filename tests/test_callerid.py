"""Caller-ID receiver: report parsing, the modem dialogue, and the real serial path on a pty."""

import os
import shutil
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, error, reactor, task
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mpay.auth import callerid
from mpay.auth.callerid import (BLOCK_SETTLE_S, COMMAND_TIMEOUT_S, MAX_BUFFER_BYTES,
                                MAX_LINE_BYTES,
                                CallerIDParser, CallerIDReceiverService, ModemProtocol)
from mpay.e164 import is_e164
from mpay.sim.modem import (ControlError, SimulatedModem, SimulatedModemService,
                            ring_via_control)

LINE = "+886223456789"
EVENT_TIMEOUT_S = 10


def feed_all(parser, lines):
    return [event for event in map(parser.feed, lines) if event is not None]


class ParserTests(unittest.TestCase):

    def setUp(self):
        self.parser = CallerIDParser(LINE, "TW")

    def test_full_report_ends_at_name(self):
        events = feed_all(self.parser, ["RING", "", "DATE = 0321", "TIME = 1405",
                                        "NMBR = 0912345678"])
        self.assertEqual(events, [])
        event = self.parser.feed("NAME = CHEN TA-MING")
        self.assertEqual((event.line_id, event.number_e164, event.raw_number, event.name,
                          event.date, event.time, event.withheld, event.unavailable,
                          event.reason),
                         (LINE, "+886912345678", "0912345678", "CHEN TA-MING", "0321", "1405",
                          False, False, None))
        self.assertFalse(self.parser.in_block)

    def test_name_before_number(self):
        events = feed_all(self.parser, ["RING", "DATE = 0321", "TIME = 1405",
                                        "NAME = CHEN", "NMBR = 0912345678"])
        self.assertEqual([(e.number_e164, e.name) for e in events], [("+886912345678", "CHEN")])

    def test_compact_fields_without_spaces(self):
        events = feed_all(self.parser, ["RING", "DATE=0321", "TIME=1405", "NMBR=0912345678",
                                        "NAME=CHEN"])
        self.assertEqual([(e.number_e164, e.date, e.time) for e in events],
                         [("+886912345678", "0321", "1405")])

    def test_number_only_report_ends_at_blank_line(self):
        events = feed_all(self.parser, ["RING", "", "DATE = 0321", "TIME = 1405",
                                        "NMBR = +886912345678", ""])
        self.assertEqual([e.number_e164 for e in events], ["+886912345678"])

    def test_number_only_report_ends_at_next_ring(self):
        events = feed_all(self.parser, ["RING", "DATE = 0321", "TIME = 1405",
                                        "NMBR = 0912345678", "RING"])
        self.assertEqual([e.number_e164 for e in events], ["+886912345678"])

    def test_number_only_report_ends_at_flush(self):
        self.assertEqual(feed_all(self.parser, ["RING", "NMBR = 0912345678"]), [])
        self.assertTrue(self.parser.in_block)
        self.assertEqual(self.parser.flush().number_e164, "+886912345678")
        self.assertIsNone(self.parser.flush())

    def test_blank_lines_between_fields_before_the_number(self):
        events = feed_all(self.parser, ["RING", "", "DATE = 0321", "", "TIME = 1405", "",
                                        "NMBR = 0912345678", "", "RING"])
        self.assertEqual([(e.number_e164, e.date, e.time) for e in events],
                         [("+886912345678", "0321", "1405")])

    def test_withheld(self):
        events = feed_all(self.parser, ["RING", "DATE = 0321", "TIME = 1405", "NMBR = P",
                                        "NAME = P"])
        self.assertEqual([(e.number_e164, e.withheld, e.unavailable, e.name, e.raw_number)
                          for e in events], [(None, True, False, None, "P")])
        self.assertIn("withheld", events[0].reason)

    def test_unavailable(self):
        events = feed_all(self.parser, ["RING", "DATE = 0321", "TIME = 1405", "NMBR = O", ""])
        self.assertEqual([(e.number_e164, e.withheld, e.unavailable) for e in events],
                         [(None, False, True)])
        self.assertIn("unavailable", events[0].reason)

    def test_invalid_number_gives_event_with_reason(self):
        events = feed_all(self.parser, ["RING", "NMBR = 12345", "NAME = X"])
        self.assertEqual([(e.number_e164, e.raw_number) for e in events], [(None, "12345")])
        self.assertIn("too short", events[0].reason)

    def test_partial_block_without_number(self):
        events = feed_all(self.parser, ["RING", "DATE = 0321", "TIME = 1405", "RING"])
        self.assertEqual([(e.number_e164, e.unavailable, e.date) for e in events],
                         [(None, True, "0321")])
        self.assertIn("without a number", events[0].reason)

    def test_malformed_date_and_time_are_dropped(self):
        event = feed_all(self.parser, ["DATE = 13", "TIME = noon", "NMBR = 0912345678",
                                       "NAME = A"])[0]
        self.assertEqual((event.number_e164, event.date, event.time),
                         ("+886912345678", None, None))

    def test_two_calls_in_a_row(self):
        events = feed_all(self.parser, [
            "RING", "DATE = 0321", "TIME = 1405", "NMBR = 0912345678", "NAME = A", "", "RING",
            "RING", "", "DATE = 0321", "TIME = 1406", "NMBR = 0987654321", "", "RING"])
        self.assertEqual([e.number_e164 for e in events], ["+886912345678", "+886987654321"])
        self.assertEqual((self.parser.rings, self.parser.events), (4, 2))

    def test_repeated_field_starts_the_next_block(self):
        events = feed_all(self.parser, ["NMBR = 0912345678", "NMBR = 0987654321"])
        self.assertEqual([e.number_e164 for e in events], ["+886912345678"])
        self.assertEqual(self.parser.flush().number_e164, "+886987654321")

    def test_garbage_is_counted_and_never_splits_a_report(self):
        lines = ["RING", "DATE = 0321", "\x00\ufffd\ufffd", "+++", "NMBR", "ZZZZ = 1",
                 "MESG = 060342", "TIME = 1405", "NMBR = 0912345678", "~~~", "NAME = CHEN"]
        events = feed_all(self.parser, lines)
        self.assertEqual([(e.number_e164, e.date, e.time) for e in events],
                         [("+886912345678", "0321", "1405")])
        self.assertEqual(self.parser.garbage_lines, 6)

    def test_modem_dialogue_gives_no_event(self):
        lines = ["ATZ", "", "OK", "AT+VCID=1", "", "OK", "ERROR", "", "NO CARRIER"]
        self.assertEqual(feed_all(self.parser, lines), [])
        self.assertEqual(self.parser.garbage_lines, 0)

    def test_dialable_directory_number_and_lower_case_keys(self):
        events = feed_all(self.parser, ["date = 0321", "ddn_nmbr = 0912345678", "name = A"])
        self.assertEqual([e.number_e164 for e in events], ["+886912345678"])

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.one_of(
        st.text(max_size=40),
        st.sampled_from(["RING", "", "OK", "NMBR = P", "NMBR = O", "NAME = X", "DATE = 0321",
                         "NMBR = 0912345678", "NMBR=+12015550123", "NMBR = 0"])), max_size=30))
    def test_any_lines_give_well_formed_events(self, lines):
        parser = CallerIDParser(LINE, "TW")
        events = feed_all(parser, lines)
        final = parser.flush()
        for event in events + ([final] if final else []):
            self.assertTrue(event.number_e164 is None or is_e164(event.number_e164))
            self.assertEqual(event.number_e164 is None, event.reason is not None)
        self.assertEqual(parser.events, len(events) + (1 if final else 0))


class ModemProtocolTests(unittest.TestCase):
    """The dialogue with the modem on a StringTransport, time on a task.Clock."""

    def setUp(self):
        self.clock = task.Clock()
        self.events = []
        self.parser = CallerIDParser(LINE, "TW")
        self.protocol = ModemProtocol(self.parser, self.events.append, ("ATZ", "AT+VCID=1"),
                                      clock=self.clock)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def sent(self):
        data = self.transport.value()
        self.transport.clear()
        return data

    def answer_init(self):
        self.protocol.dataReceived(b"ATZ\r\r\nOK\r\nAT+VCID=1\r\r\nOK\r\n")
        self.sent()

    def test_init_commands_are_sent_one_at_a_time(self):
        self.assertEqual(self.sent(), b"ATZ\r")
        self.protocol.dataReceived(b"ATZ\r\r\nOK\r\n")
        self.assertEqual(self.sent(), b"AT+VCID=1\r")
        self.protocol.dataReceived(b"AT+VCID=1\r\r\nOK\r\n")
        self.assertEqual(self.sent(), b"")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_refused_command_is_logged_and_init_goes_on(self):
        self.sent()
        self.protocol.dataReceived(b"\r\nERROR\r\n")
        self.assertEqual(self.sent(), b"AT+VCID=1\r")

    def test_silent_modem_times_out_and_init_goes_on(self):
        self.sent()
        self.clock.advance(COMMAND_TIMEOUT_S)
        self.assertEqual(self.sent(), b"AT+VCID=1\r")

    def test_call_is_hung_up_then_reported(self):
        self.answer_init()
        seen_at_callback = []
        self.protocol.on_caller_id = lambda event: seen_at_callback.append(
            (event.number_e164, self.transport.value()))
        self.protocol.dataReceived(b"\r\nRING\r\n\r\nDATE = 0321\r\nTIME = 1405\r\n"
                                   b"NMBR = 0912345678\r\nNAME = CHEN\r\n\r\n")
        self.assertEqual(seen_at_callback, [("+886912345678", b"ATH\r")])

    def test_number_only_report_is_delivered_after_quiet_time(self):
        self.answer_init()
        self.protocol.dataReceived(b"\r\nRING\r\n\r\nNMBR = 0912345678\r\n")
        self.assertEqual(self.events, [])
        self.clock.advance(BLOCK_SETTLE_S)
        self.assertEqual([e.number_e164 for e in self.events], ["+886912345678"])
        self.assertEqual(self.sent(), b"ATH\r")

    def test_bare_cr_line_ends_and_byte_by_byte_arrival(self):
        self.answer_init()
        for byte in b"RING\rNMBR = 0912345678\rNAME = A\r":
            self.protocol.dataReceived(bytes([byte]))
        self.assertEqual([e.number_e164 for e in self.events], ["+886912345678"])

    def test_overlong_line_is_noise_and_the_report_after_it_survives(self):
        self.answer_init()
        self.protocol.dataReceived(b"\xff" * (MAX_LINE_BYTES + 1) + b"\r\n\r\nRING\r\n"
                                   b"NMBR = 0912345678\r\nNAME = A\r\n")
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.parser.garbage_lines, 1)
        self.assertEqual([e.number_e164 for e in self.events], ["+886912345678"])

    def test_endless_noise_is_dropped_not_a_disconnect(self):
        self.answer_init()
        self.protocol.dataReceived(b"~" * (MAX_BUFFER_BYTES + 1))
        self.protocol.dataReceived(b"\r\nRING\r\nNMBR = 0912345678\r\nNAME = A\r\n")
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.parser.garbage_lines, 1)
        self.assertEqual([e.number_e164 for e in self.events], ["+886912345678"])

    def test_failing_consumer_does_not_stop_the_receiver(self):
        self.answer_init()
        self.protocol.on_caller_id = lambda event: 1 / 0
        self.protocol.dataReceived(b"NMBR = 0912345678\r\nNAME = A\r\n")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.protocol.on_caller_id = self.events.append
        self.protocol.dataReceived(b"NMBR = 0987654321\r\nNAME = B\r\n")
        self.assertEqual([e.number_e164 for e in self.events], ["+886987654321"])

    def test_connection_lost_cancels_timers_and_drops_half_report(self):
        self.protocol.dataReceived(b"RING\r\nNMBR = 0912345678\r\n")
        self.assertNotEqual(self.clock.getDelayedCalls(), [])
        self.protocol.connectionLost(error.ConnectionLost())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.events, [])
        self.assertFalse(self.parser.in_block)


def within(deferred):
    return deferred.addTimeout(EVENT_TIMEOUT_S, reactor)


class SerialPathTests(unittest.TestCase):
    """The real path: simulated modem on a pty, the service's SerialPort on the slave tty."""

    def setUp(self):
        self.modem = SimulatedModem(reactor)
        self.modem.start()
        self.addCleanup(self.modem.stop)
        self.events = []
        self.waiting = []

    def on_caller_id(self, event):
        self.events.append(event)
        if self.waiting:
            self.waiting.pop(0).callback(event)

    def next_event(self):
        waiter = defer.Deferred()
        self.waiting.append(waiter)
        return within(waiter)

    @defer.inlineCallbacks
    def start_receiver(self):
        receiver = CallerIDReceiverService(self.modem.slave_path, self.on_caller_id, LINE, "TW",
                                           ("ATZ", "AT+VCID=1"), baudrate=9600, reactor=reactor)
        receiver.startService()
        self.addCleanup(receiver.stopService)
        yield within(self.modem.wait_for_command("AT+VCID=1"))
        return receiver

    @defer.inlineCallbacks
    def test_enrolment_call_reaches_the_as_as_e164_and_is_hung_up(self):
        yield self.start_receiver()
        event = self.next_event()
        self.modem.ring("0912345678", name="CHEN")
        event = yield event
        self.assertEqual((event.line_id, event.number_e164, event.name),
                         (LINE, "+886912345678", "CHEN"))
        yield within(self.modem.wait_for_command("ATH"))
        self.assertEqual(list(self.modem.commands), ["ATZ", "AT+VCID=1", "ATH"])

    @defer.inlineCallbacks
    def test_withheld_call_is_reported_without_number(self):
        yield self.start_receiver()
        event = self.next_event()
        self.modem.ring(None, withheld=True)
        event = yield event
        self.assertEqual((event.number_e164, event.withheld), (None, True))
        yield within(self.modem.wait_for_command("ATH"))

    @defer.inlineCallbacks
    def test_two_calls_each_hung_up(self):
        yield self.start_receiver()
        for number in ("+886912345678", "0987654321"):
            event = self.next_event()
            self.modem.ring(number)
            yield event
        yield within(self.modem.wait_for_command("ATH", count=2))
        self.assertEqual([e.number_e164 for e in self.events],
                         ["+886912345678", "+886987654321"])

    @defer.inlineCallbacks
    def test_garbage_on_the_serial_line_gives_no_event_and_no_crash(self):
        receiver = yield self.start_receiver()
        self.modem.send_raw(b"\x00\xff\xfe+++\r\n\r\nNMBR\r\nZZ = 1\r" + b"~" * 1000 + b"\r\n")
        event = self.next_event()
        self.modem.ring("0912345678")
        event = yield event
        self.assertEqual([e.number_e164 for e in self.events], ["+886912345678"])
        self.assertGreater(receiver.parser.garbage_lines, 0)
        self.assertIsNotNone(receiver.port)

    @defer.inlineCallbacks
    def test_exchange_national_digits_become_e164(self):
        self.modem.national_region = "TW"
        yield self.start_receiver()
        event = self.next_event()
        self.modem.ring("+886912345678")
        event = yield event
        self.assertEqual((event.raw_number, event.number_e164), ("0912345678", "+886912345678"))

    @defer.inlineCallbacks
    def test_lost_device_is_reopened(self):
        """A udev-style symlink moves to a new modem; the receiver follows it."""
        directory = tempfile.mkdtemp(prefix="mpay-")
        self.addCleanup(shutil.rmtree, directory)
        link = os.path.join(directory, "ttyMODEM")
        os.symlink(self.modem.slave_path, link)
        receiver = CallerIDReceiverService(link, self.on_caller_id, LINE, "TW",
                                           reactor=reactor, reopen_delay_s=0.01)
        receiver.startService()
        self.addCleanup(receiver.stopService)
        yield within(self.modem.wait_for_command("AT+VCID=1"))
        replacement = SimulatedModem(reactor)
        replacement.start()
        self.addCleanup(replacement.stop)
        os.symlink(replacement.slave_path, link + ".new")
        os.replace(link + ".new", link)
        self.modem.stop()
        yield within(replacement.wait_for_command("AT+VCID=1"))
        event = self.next_event()
        replacement.ring("0912345678")
        self.assertEqual((yield event).number_e164, "+886912345678")

    @defer.inlineCallbacks
    def test_stop_closes_a_port_that_will_not_drain(self):
        self.patch(callerid, "CLOSE_TIMEOUT_S", 0.01)
        receiver = yield self.start_receiver()
        port = receiver.port
        port.loseConnection = lambda: None      # as if flow control held our bytes
        yield receiver.stopService()
        self.assertIsNone(receiver.port)
        self.assertTrue(port.disconnected)
        self.assertIsNone(port._serial.fd)

    def test_missing_device_is_retried_until_stopped(self):
        receiver = CallerIDReceiverService("/nonexistent/ttyMPAY", self.on_caller_id, LINE,
                                           "TW", reactor=reactor, reopen_delay_s=60)
        receiver.startService()
        self.assertIsNone(receiver.port)
        self.assertTrue(receiver._reopen.active())
        return receiver.stopService()   # cancels the retry: the reactor stays clean


class ControlSocketTests(unittest.TestCase):
    """``mpay-dmd enroll`` places its call through the simulator's control socket."""

    def setUp(self):
        # A short path: UNIX socket names are limited to about 100 bytes.
        directory = tempfile.mkdtemp(prefix="mpay-")
        self.addCleanup(shutil.rmtree, directory)
        self.path = directory + "/modem.sock"
        self.modem = SimulatedModem(reactor)
        self.simulator = SimulatedModemService(self.modem, self.path, reactor)
        self.addCleanup(self.simulator.stopService)
        return self.simulator.startService()

    @defer.inlineCallbacks
    def test_ring_via_control_places_the_call(self):
        got = defer.Deferred()
        receiver = CallerIDReceiverService(self.modem.slave_path, got.callback, LINE, "TW",
                                           reactor=reactor)
        receiver.startService()
        self.addCleanup(receiver.stopService)
        yield within(self.modem.wait_for_command("AT+VCID=1"))
        yield within(ring_via_control(self.path, "+886912345678", "CHEN", reactor=reactor))
        event = yield within(got)
        self.assertEqual((event.number_e164, event.name), ("+886912345678", "CHEN"))

    @defer.inlineCallbacks
    def test_bad_request_is_refused(self):
        with self.assertRaises(ControlError):
            yield within(ring_via_control(self.path, "", reactor=reactor))

    @defer.inlineCallbacks
    def test_nobody_listening(self):
        with self.assertRaises(error.ConnectError):
            yield within(ring_via_control(self.path + ".absent", "+886912345678",
                                          reactor=reactor))

import configparser
import os

from twisted.python import usage
from twisted.trial import unittest

from mpay import config

ETC_INI = os.path.join(os.path.dirname(__file__), "..", "etc", "mpay.ini")


class ConfigTests(unittest.TestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write(text)
        return path

    def test_shipped_file_documents_exactly_the_schema_with_its_defaults(self):
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(ETC_INI)
        shipped = {s: dict(parser.items(s)) for s in parser.sections()}
        schema = {s: {k: key.default for k, key in keys.items()} for s, keys in config.SCHEMA.items()}
        self.assertEqual(shipped, schema)

    def test_defaults_without_a_file(self):
        cfg = config.load()
        self.assertEqual(cfg["server"]["role"], "all")
        self.assertEqual(cfg["sip"]["t1_ms"], 500)
        self.assertEqual(cfg["ps"]["listen"], "udp:5060:interface=127.0.0.1")

    def test_default_bounds_hold_issue_7s_rate_sustained(self):
        # 3,000 transfers a second for as long as it lasts, with room for twice that:
        # each request's authenticator is remembered 2 x skew + 1 s, each answered
        # transaction kept 64 x T1 (Timer J).  A bound under that turns a steady load
        # into 503s after 32 s or a few minutes.
        cfg = config.load()
        rate_per_s = 3_000
        skew_s = cfg["tickets"]["clock_skew_s"]
        self.assertGreaterEqual(cfg["tickets"]["replay_cache_max_entries"],
                                2 * rate_per_s * (2 * skew_s + 1))
        timer_j_s = 64 * cfg["sip"]["t1_ms"] / 1000
        self.assertGreaterEqual(cfg["sip"]["max_transactions"], 2 * rate_per_s * timer_j_s)

    def test_file_then_overrides(self):
        path = self.write("[sip]\nt1_ms = 250\n[server]\nrole = ps\n")
        cfg = config.load(path, {"server.role": "as"})
        self.assertEqual(cfg["sip"]["t1_ms"], 250)
        self.assertEqual(cfg["server"]["role"], "as")

    def test_errors_name_section_key_and_reason(self):
        cases = [
            ("[sip]\nt1_ms = soon\n", "[sip] t1_ms"),
            ("[sip]\nt1_ms = -1\n", "positive"),
            ("[server]\nrole = bank\n", "one of as, ps, all"),
            ("[nope]\nx = 1\n", "[nope]: unknown section"),
            ("[sip]\nt9_ms = 1\n", "[sip] t9_ms: unknown key"),
            ("[ps]\nlisten = 5060\n", "[ps] listen"),
            ("[ps]\nlisten = udp:70000\n", "port out of range"),
            ("[server]\ndefault_region = Taiwan\n", "ISO 3166"),
            ("not an ini file", "config file"),
        ]
        for text, expected in cases:
            with self.assertRaises(config.ConfigError) as caught:
                config.load(self.write(text))
            self.assertIn(expected, str(caught.exception), text)

    def test_missing_file_is_a_clear_error(self):
        with self.assertRaises(config.ConfigError) as caught:
            config.load("/nonexistent/mpay.ini")
        self.assertIn("/nonexistent/mpay.ini", str(caught.exception))


class OptionsTests(unittest.TestCase):
    def test_command_line_overrides_the_file(self):
        import tap

        options = tap.Options()
        options.parseOptions(["--config", ETC_INI, "--role", "ps", "--ps-listen", "udp:0",
                              "--set", "sip.t1_ms=100"])
        self.assertEqual(options.config["server"]["role"], "ps")
        self.assertEqual(options.config["ps"]["listen"], "udp:0")
        self.assertEqual(options.config["sip"]["t1_ms"], 100)

    def test_bad_values_are_usage_errors(self):
        import tap

        for argv in (["--role", "bank"], ["--set", "sip.t1_ms"], ["--set", "nosuch.key=1"]):
            self.assertRaises(usage.UsageError, tap.Options().parseOptions, argv)

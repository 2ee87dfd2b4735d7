"""Interop with a SIP peer nobody here wrote: SIPp (Debian package sip-tester).

`make test` installs SIPp when it can (root with apt-get, as on CI); where it
cannot, this test says so as a skip instead of pretending to have passed.
"""

import os
import shutil

from twisted.internet import defer, utils
from twisted.trial import unittest

import tap
from mpay.auth.keyfiles import ensure_keyring

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "sipp", "run_sipp.sh")
SCENARIO = os.path.join(HERE, "sipp", "options_retransmit.xml")
CALLS = 50


class SIPpInteropTests(unittest.TestCase):
    if shutil.which("sipp") is None:
        skip = "SIPp is not installed (Debian package sip-tester; `make test` installs it as root)"

    @defer.inlineCallbacks
    def test_sipp_options_and_retransmission_processed_once(self):
        # A PS alone needs the K_PS file its AS was given (split roles share it).
        k_ps = os.path.abspath(self.mktemp())
        ensure_keyring(k_ps)
        options = tap.Options()
        options.parseOptions(["--role", "ps", "--ps-listen", "udp:0:interface=127.0.0.1",
                              "--metrics-listen", "", "--set", f"tickets.k_ps_keys={k_ps}"])
        top = tap.makeService(options)
        top.startService()
        self.addCleanup(top.stopService)
        target = f"127.0.0.1:{top.listeners['ps'].port}"

        out, err, status = yield utils.getProcessOutputAndValue(
            "/bin/sh", [SCRIPT, target, SCENARIO, str(CALLS)], env=os.environ)
        self.assertEqual(status, 0, (out + err).decode(errors="replace"))

        endpoint = top.endpoints["ps"]
        self.assertEqual(endpoint.requests["OPTIONS"], 2 * CALLS)
        self.assertEqual(endpoint.responses[("OPTIONS", 200)], CALLS, "each request processed once")
        self.assertEqual(endpoint.layer.stats["retransmissions_absorbed"], CALLS)

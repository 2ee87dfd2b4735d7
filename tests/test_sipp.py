"""Interop with a SIP peer nobody here wrote: SIPp (Debian package sip-tester).

`make test` installs SIPp when it can (root with apt-get, as on CI); where it
cannot, this test says so as a skip instead of pretending to have passed.
Debian bookworm's SIPp has no TLS: `make sipp` also builds Debian trixie's,
which has, in a root of its own (tests/sipp/build_tls_root.sh), and the TLS
test skips where that root is not there.
"""

import os
import shutil

from twisted.internet import defer, protocol, reactor, task, utils
from twisted.trial import unittest

import tap
from mpay.auth.keyfiles import ensure_keyring

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "sipp", "run_sipp.sh")
SCENARIO = os.path.join(HERE, "sipp", "options_retransmit.xml")
CALLS = 50
SIPP_TLS_ROOT = os.environ.get("SIPP_TLS_ROOT", "/var/cache/mpay/sipp-trixie")
FLOWS_CLOSE_S = 5.0       # how long SIPp's connection may take to be gone after it exits
OPTIONS_OVER_TLS = (b"OPTIONS sip:ps@127.0.0.1 SIP/2.0\r\n"
                    b"Via: SIP/2.0/TLS 127.0.0.1:5999;branch=z9hG4bK-openssl-1\r\n"
                    b"Max-Forwards: 70\r\nFrom: <sip:o@x>;tag=o1\r\nTo: <sip:ps@x>\r\n"
                    b"Call-ID: openssl-1@x\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")


class _OpenSSL(protocol.ProcessProtocol):
    """``openssl s_client``: writes one request, hangs up once the answer is in."""

    def __init__(self, request: bytes):
        self.request = request
        self.out = self.err = b""
        self.ended = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.request)

    def outReceived(self, data):
        self.out += data
        if b"\r\n\r\n" in self.out:
            self.transport.closeStdin()

    def errReceived(self, data):
        self.err += data

    def processEnded(self, reason):
        self.ended.callback(None)


class SIPpInteropTests(unittest.TestCase):
    if shutil.which("sipp") is None:
        skip = "SIPp is not installed (Debian package sip-tester; `make test` installs it as root)"

    @defer.inlineCallbacks
    def start_ps(self):
        """A PS alone, on UDP, TCP and TLS ports of its own."""
        # A PS alone needs the K_PS file its AS was given (split roles share it).
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        k_ps = os.path.join(directory, "k_ps.keys")
        ensure_keyring(k_ps)
        options = tap.Options()
        options.parseOptions(["--role", "ps", "--ps-listen", "udp:0:interface=127.0.0.1",
                              "--metrics-listen", "", "--set", f"tickets.k_ps_keys={k_ps}",
                              "--set", "ps.listen_tcp=tcp:0:interface=127.0.0.1",
                              "--set", "ps.listen_tls=tls:0:interface=127.0.0.1",
                              "--set", f"ps.signing_key={directory}/ps.pem",
                              "--set", f"tls.certificate={directory}/tls.crt",
                              "--set", f"tls.private_key={directory}/tls.key"])
        top = tap.makeService(options)
        top.startService()
        self.addCleanup(top.stopService)
        endpoint = top.endpoints["ps"]
        yield task.deferLater(reactor, 0, lambda: None)   # the stream listeners are up
        self.assertEqual(set(endpoint.stream_ports), {"TCP", "TLS"})
        return top, endpoint, directory

    @defer.inlineCallbacks
    def test_sipp_options_and_retransmission_processed_once(self):
        top, endpoint, _ = yield self.start_ps()
        yield self.sipp_run(f"127.0.0.1:{top.listeners['ps'].port}", "u1", endpoint)

    @defer.inlineCallbacks
    def test_sipp_over_tcp_options_and_repeat_processed_once(self):
        _, endpoint, _ = yield self.start_ps()
        lost = self.record_lost_flows(endpoint)
        yield self.sipp_run(f"127.0.0.1:{endpoint.stream_ports['TCP']}", "t1", endpoint)
        yield self.until_flows_gone(endpoint)
        self.assertEqual(lost, ["TCP"], "one connection, over TCP")

    @defer.inlineCallbacks
    def test_sipp_over_tls_options_and_repeat_processed_once(self):
        """SIPp over TLS (``-t l1``, one connection): each OPTIONS and its repeat gets one 200.

        The SIPp is Debian trixie's, chrooted (tests/sipp/build_tls_root.sh).  SIPp
        verifies nothing of the server by default; here it is given the PS's
        self-signed certificate (``-tls_ca``), so a PS presenting another would fail
        the handshake, but SIPp does not check the name or address in it: the
        ``openssl s_client`` test below does that.
        """
        sipp = os.path.join(SIPP_TLS_ROOT, "usr", "bin", "sipp")
        if not os.access(sipp, os.X_OK):
            raise unittest.SkipTest(f"SIPp with TLS is not built in {SIPP_TLS_ROOT} "
                                    "(`make sipp` as root builds it: tests/sipp/build_tls_root.sh)")
        if os.geteuid() != 0:
            raise unittest.SkipTest(f"SIPp with TLS runs chrooted into {SIPP_TLS_ROOT}: needs root")
        _, endpoint, directory = yield self.start_ps()
        lost = self.record_lost_flows(endpoint)
        yield self.sipp_run(f"127.0.0.1:{endpoint.stream_ports['TLS']}", "l1", endpoint,
                            env={"SIPP_TLS_ROOT": SIPP_TLS_ROOT,
                                 "SIPP_TLS_CA": f"{directory}/tls.crt"})
        yield self.until_flows_gone(endpoint)
        self.assertEqual(lost, ["TLS"], "one connection, over TLS")

    @defer.inlineCallbacks
    def test_openssl_client_gets_200_to_options_over_tls(self):
        """OpenSSL's own client, verifying the PS's certificate and its address."""
        _, endpoint, directory = yield self.start_ps()
        client = _OpenSSL(OPTIONS_OVER_TLS)
        reactor.spawnProcess(client, "openssl", [
            "openssl", "s_client", "-connect", f"127.0.0.1:{endpoint.stream_ports['TLS']}",
            "-CAfile", f"{directory}/tls.crt", "-verify_return_error", "-brief",
            "-verify_ip", "127.0.0.1"], env=os.environ)
        yield client.ended
        self.assertIn(b"SIP/2.0 200 OK", client.out, client.err)
        self.assertIn(b"CSeq: 1 OPTIONS", client.out)
        self.assertRegex(client.err.decode(), r"Protocol version: TLSv1\.[23]")
        self.assertIn("Verification: OK", client.err.decode())

    def record_lost_flows(self, endpoint):
        """The transport of each connection the endpoint sees closed, in order."""
        lost = []
        endpoint.flow_lost.append(lambda flow: lost.append(flow.transport))
        return lost

    @defer.inlineCallbacks
    def until_flows_gone(self, endpoint):
        """Once SIPp has exited, its connection goes too: wait for that, a bounded time."""
        for _ in range(int(FLOWS_CLOSE_S / 0.05)):
            if not endpoint.flows:
                return
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(endpoint.flows, {}, f"SIPp's connection open {FLOWS_CLOSE_S} s on")

    @defer.inlineCallbacks
    def sipp_run(self, target, mode, endpoint, env=None):
        out, err, status = yield utils.getProcessOutputAndValue(
            "/bin/sh", [SCRIPT, target, SCENARIO, str(CALLS), mode],
            env={**os.environ, **(env or {})})
        self.assertEqual(status, 0, (out + err).decode(errors="replace"))
        self.assertEqual(endpoint.requests["OPTIONS"], 2 * CALLS)
        self.assertEqual(endpoint.responses[("OPTIONS", 200)], CALLS, "each request processed once")
        self.assertEqual(endpoint.layer.stats["retransmissions_absorbed"], CALLS)

"""A running mpay (AS + PS, as twistd builds it) and Sim-DMDs, on loopback, for flow tests."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile

from twisted.internet import defer, reactor, task

import tap
from mpay.auth.keyfiles import load_public_key
from mpay.sim.device import Device, DeviceState
from mpay.sip.endpoint import SIPEndpoint
from mpay.sip.message import Request, parse
from mpay.sip import tls
from mpay.sip.stream import Flow, open_flow
from mpay.sip.transport import UDPListenerService
from mpay.timewheel import TimeWheel
from mpay.timewheel_service import TimeWheelService


class Recorder:
    """What a device sent and received, as ('>' or '<', method or status) pairs."""

    def __init__(self, endpoint: SIPEndpoint):
        self.seen: list[tuple[str, object]] = []
        self.raw: list[tuple[str, bytes]] = []
        write, receive = endpoint.write, endpoint.datagram_received

        def recording_write(data, addr):
            self.seen.append((">", self._label(data)))
            self.raw.append((">", data))
            write(data, addr)

        def recording_receive(data, addr):
            self.seen.append(("<", self._label(data)))
            self.raw.append(("<", data))
            receive(data, addr)

        endpoint.write = recording_write
        endpoint.datagram_received = recording_receive

    @staticmethod
    def _label(data: bytes):
        message = parse(data)
        return message.method if isinstance(message, Request) else message.status

    def flow(self) -> list[tuple[str, object]]:
        """The exchange without retransmissions or 100 Trying: one entry per message."""
        out: list[tuple[str, object]] = []
        for entry in self.seen:
            if entry[1] != 100 and (not out or out[-1] != entry):
                out.append(entry)
        return out


class MpayFixture:
    """Starts the servers with keys and the modem control socket in a temp dir.

    *transport* (UDP, TCP or TLS) is how the devices reach the servers: over
    a stream, each device connects when it first sends, and the servers
    reach it back over that connection.  The servers always listen on all
    three.
    """

    def __init__(self, testcase, *settings: str, transport: str = "UDP",
                 ps_listen: str = "udp:0:interface=127.0.0.1"):
        self.testcase = testcase
        self.transport = transport
        # Short and private: a UNIX socket path must stay under 108 bytes.
        self.dir = tempfile.mkdtemp(prefix="mpay-")
        testcase.addCleanup(shutil.rmtree, self.dir, True)
        args = ["--as-listen", "udp:0:interface=127.0.0.1", "--ps-listen", ps_listen,
                "--metrics-listen", ""]
        streams = [f"{role}.listen_{kind}={kind}:0:interface=127.0.0.1"
                   for role in ("as", "ps") for kind in ("tcp", "tls")]
        for setting in (f"as.signing_key={self.dir}/as.pem", f"as.master_keys={self.dir}/master.keys",
                        f"tickets.k_ps_keys={self.dir}/k_ps.keys",
                        f"callerid.sim_control={self.dir}/modem.sock",
                        f"ps.signing_key={self.dir}/ps.pem",
                        f"tls.certificate={self.dir}/tls.crt", f"tls.private_key={self.dir}/tls.key",
                        f"ledger.sqlite_path={self.dir}/ledger.sqlite3", *streams) + settings:
            args += ["--set", setting]
        self.args = args
        self._build()
        # The devices' own timers: they outlive a restart of the servers.
        self.device_timers = TimeWheelService(TimeWheel(tick_s=self.top.wheel.tick_s))
        self.device_timers.startService()
        testcase.addCleanup(self.device_timers.stopService)

    def _build(self, *listen: str) -> None:
        options = tap.Options()
        options.parseOptions(self.args + list(listen))
        self.config = options.config
        self.top = tap.makeService(options)
        self.as_core = self.top.cores["as"]
        self.ps_core = self.top.cores["ps"]
        self.modem = self.top.getServiceNamed("as").getServiceNamed("sim-modem").modem

    @defer.inlineCallbacks
    def start(self):
        top = self.top
        top.startService()
        self.testcase.addCleanup(lambda: top.stopService() if top.running else None)
        # The receiver must have switched caller-ID reports on before anyone calls.
        yield self.modem.wait_for_command("AT+VCID=1")

    @defer.inlineCallbacks
    def restart(self):
        """Stop the servers and start new ones on the same files (ledger, keys) and ports:
        what survives is what is on disk; the devices keep their state and addresses."""
        as_port, ps_port = self.address("as")[1], self.address("ps")[1]
        streams = [f"{role}.listen_{kind.lower()}={kind.lower()}:{port}:interface=127.0.0.1"
                   for role in ("as", "ps")
                   for kind, port in self.top.endpoints[role].stream_ports.items()]
        yield self.top.stopService()
        self._build("--as-listen", f"udp:{as_port}:interface=127.0.0.1",
                    "--ps-listen", f"udp:{ps_port}:interface=127.0.0.1",
                    *[arg for setting in streams for arg in ("--set", setting)])
        yield self.start()

    @defer.inlineCallbacks
    def ready(self, number: str):
        """A device enrolled, holding a ticket and registered at the PS: (device, recorder)."""
        device, recorder = self.device(number)
        yield device.enroll()
        yield device.get_ticket()
        yield device.register()
        return device, recorder

    @defer.inlineCallbacks
    def eventually(self, predicate, tries: int = 100, every_s: float = 0.05):
        """Wait (bounded) for something the servers do after answering; *predicate*
        may return a Deferred (e.g. a ledger query)."""
        for _ in range(tries):
            if (yield defer.maybeDeferred(predicate)):
                return
            yield task.deferLater(reactor, every_s, lambda: None)
        self.testcase.fail("condition never held")

    def address(self, role: str, transport: str = "UDP") -> tuple[str, int]:
        """Where *role* listens for *transport*: a UDP address, or a flow to connect to."""
        if transport == "UDP":
            return ("127.0.0.1", self.top.listeners[role].port)
        return Flow("127.0.0.1", self.top.endpoints[role].stream_ports[transport], transport)

    def source_of(self, device: Device, role: str) -> tuple[str, int]:
        """The device's address as the server *role* sees it (over UDP, its sent-by)."""
        if self.transport == "UDP":
            return device.endpoint.sent_by
        flow = device.endpoint.live(self.address(role, self.transport))
        local = flow.connection.transport.getHost()
        return (local.host, local.port)

    def tls_options(self):
        """A device's check of the servers' certificate: the development one, pinned."""
        return tls.client_options("127.0.0.1", os.path.join(self.dir, "tls.crt"))

    def ring(self, number: str, line: str) -> defer.Deferred:
        """The device "places the call": the simulated modem on that line rings."""
        self.modem.ring(number)
        return defer.succeed(None)

    def device(self, number: str, *, ring=None, pinned_as_key=None) -> tuple[Device, Recorder]:
        state = DeviceState.new(number)
        pinned = pinned_as_key or load_public_key(os.path.join(self.dir, "as.pub"))
        ps_key = load_public_key(os.path.join(self.dir, "ps.pub"))
        transport = self.transport
        device = Device(state, domain=self.config["server"]["domain"],
                        as_addr=self.address("as", transport), ps_addr=self.address("ps", transport),
                        as_identity=self.config["as"]["identity"],
                        pinned_as_key=pinned, ring=ring or self.ring, clock=reactor.seconds,
                        reactor=reactor, state_path=os.path.join(self.dir, f"{number}.json"),
                        pinned_ps_key=ps_key)
        endpoint = SIPEndpoint("dmd", device, self.device_timers)
        device.endpoint = endpoint
        listener = UDPListenerService("udp:0:interface=127.0.0.1", endpoint, reactor=reactor)
        listener.startService()
        self.testcase.addCleanup(listener.stopService)
        if transport != "UDP":
            options = self.tls_options() if transport == "TLS" else None
            endpoint.connector = lambda flow: open_flow(reactor, endpoint, flow.transport, flow,
                                                        options)
            self.testcase.addCleanup(endpoint.close_flows)
            self.testcase.addCleanup(setattr, device, "stopping", True)   # runs first
        return device, Recorder(endpoint)


def redis_prefix() -> str:
    return f"mpay-test-{secrets.token_hex(4)}:"

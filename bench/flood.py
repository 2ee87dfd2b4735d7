"""100,000 unauthenticated REGISTERs at the AS: memory stays bounded, a real device is served.

The real server runs as ``twistd mpay`` in a child process (embedded defaults
but for ``as.rate_limit_exempt`` emptied, so loopback is limited like any
address).  A flooder on 127.0.0.2 sends FLOOD enrolment claims, each for a
number of its own with a random key share, as fast as it can; meanwhile a
genuine device on 127.0.0.1 enrols, gets a ticket and registers.  The
baseline is the same device's enrolment before the flood, and the server's
RSS before it; the figures are the server's peak RSS (VmHWM), what the
flood was answered, and how much longer the genuine enrolment took.

    python bench/flood.py [--flood N]

Last line: ``flood: registers=... answered_401=... refused_503=... peak_rss_mb=...
baseline_rss_mb=... enrol_s=... baseline_enrol_s=...``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, protocol, task  # noqa: E402

from mpay.load.devices import SimDevices  # noqa: E402
from mpay.load.server import ServerProcess, free_udp_ports  # noqa: E402
from mpay.sim.device import DeviceError  # noqa: E402
from mpay.sip.transport import UDP_RCVBUF_BYTES, raise_receive_buffer  # noqa: E402
from tests.test_ratelimit import FLOODER, claim  # noqa: E402

FLOOD = 100_000
CHUNK = 500              # claims sent per reactor turn (the genuine device shares the reactor)


class _Counter(protocol.DatagramProtocol):
    def __init__(self):
        self.statuses: Counter = Counter()

    def datagramReceived(self, data, addr):
        head = data[:12]
        self.statuses[int(head[8:11]) if head.startswith(b"SIP/2.0 ") else "request"] += 1


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0])
    return fields


ENROL_TRIES = 20


@defer.inlineCallbacks
def enrol(reactor, devices: SimDevices, number: str):
    """Enrol, get a ticket, register, as a phone does: a 503 is tried again after a second.
    Fires with (seconds, attempts)."""
    started = time.perf_counter()
    device = devices.device(number)
    attempts = 0
    for step in (device.enroll, device.get_ticket, device.register):
        for _ in range(ENROL_TRIES):
            attempts += 1
            try:
                yield step()
                break
            except DeviceError as exc:   # a 503 created nothing: the same step again
                if " 503 " not in f" {exc} ":
                    raise
                yield task.deferLater(reactor, 1.0, lambda: None)
        else:
            raise DeviceError(f"{number}: still refused after {ENROL_TRIES} tries")
    return time.perf_counter() - started, attempts


@defer.inlineCallbacks
def main(reactor, argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood", type=int, default=FLOOD)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mpay-flood-") as directory:
        server = ServerProcess(reactor, directory, *free_udp_ports(2),
                               logfile=os.path.join(directory, "server.log"),
                               settings=("as.rate_limit_exempt=",))
        server.start()
        devices = None
        try:
            yield server.wait_ready()
            devices = SimDevices.for_server(reactor, server)
            baseline_s, _ = yield enrol(reactor, devices, "+886912000001")
            baseline = memory_kib(server.pid)
            counter = _Counter()
            port = reactor.listenUDP(0, counter, interface=FLOODER)
            raise_receive_buffer(port.socket, UDP_RCVBUF_BYTES)
            own = port.getHost().port

            @defer.inlineCallbacks
            def flood():
                for start in range(0, args.flood, CHUNK):
                    for index in range(start, min(start + CHUNK, args.flood)):
                        try:
                            port.write(claim(index, own), server.as_addr)
                        except OSError:
                            pass   # the local send buffer is full: that claim is lost
                    yield task.deferLater(reactor, 0, lambda: None)

            flooding = flood()
            enrol_s, attempts = yield enrol(reactor, devices, "+886912000002")
            yield flooding
            yield task.deferLater(reactor, 2.0, lambda: None)   # the last answers
            peak = memory_kib(server.pid)
            port.stopListening()
        finally:
            if devices is not None:
                yield devices.stop()
            yield server.stop()
    answered = counter.statuses
    print(f"{args.flood:,} claims from {FLOODER}: answered {dict(answered)}; the rest lost in"
          f" full socket buffers")
    print(f"server RSS {baseline['VmRSS'] / 1024:.0f} MB before, peak {peak['VmHWM'] / 1024:.0f}"
          f" MB; a genuine enrolment took {enrol_s:.2f} s ({attempts} tries) during the flood,"
          f" {baseline_s:.2f} s before it ({enrol_s / baseline_s:.1f}x)")
    print(f"flood: registers={args.flood} answered_401={answered[401]}"
          f" refused_503={answered[503]} peak_rss_mb={peak['VmHWM'] / 1024:.0f}"
          f" baseline_rss_mb={baseline['VmRSS'] / 1024:.0f} enrol_s={enrol_s:.2f}"
          f" baseline_enrol_s={baseline_s:.2f}")


if __name__ == "__main__":
    task.react(main, [sys.argv[1:]])

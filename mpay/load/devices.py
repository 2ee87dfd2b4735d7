"""Sim-DMDs enrolled against a server in another process.

The devices live in this process with their own time wheel (the server's
wheel is in the server's process and may die with it) and one UDP listener
each; the enrolment "call" goes through the server's simulated modem over
its control socket, exactly as ``mpay-dmd enroll`` places it.  A lean payee
(:meth:`SimDevices.answer_notices`) is one of them, enrolled and registered
the same way, whose notices are then answered on bytes (``mpay.load.lean``).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer

from mpay import config as mpay_config
from mpay.auth.keyfiles import load_public_key
from mpay.load.lean import NoticeAnswerer
from mpay.payment.transfer import NOTICE_CONTENT_TYPE
from mpay.sim.device import Device, DeviceState
from mpay.sim.modem import ring_via_control
from mpay.sip.endpoint import SIPEndpoint
from mpay.sip.transport import UDPListenerService
from mpay.timewheel import TimeWheel
from mpay.timewheel_service import TimeWheelService

DEVICE_TICK_S = 0.1
"""Resolution of the devices' own time wheel (retransmission timers)."""

LOOPBACK = "127.0.0.1"

TAG_KEY_BYTES = 16
"""The key a lean payee derives its To tags from (blake2s takes up to 32)."""


class NoRequests:
    """The core of an endpoint that serves no requests (a payer's; the payees' shared
    port while they register from it)."""

    handlers: dict = {}

    def ack_received(self, request: Any, addr: Any) -> None:
        """Nothing is INVITEd here."""


class SimDevices:
    """Devices for the servers at *as_addr* / *ps_addr*; :meth:`stop` closes them all.

    *ps_key_path* None: the devices do not check the PS's receipts (a load
    run's payees, whose checking would take CPU from a server on the same
    machine; a real phone spends its own).
    """

    def __init__(self, reactor, *, as_addr: tuple[str, int], ps_addr: tuple[str, int],
                 modem_control: str, as_key_path: str, ps_key_path: str | None):
        self.reactor = reactor
        self.as_addr = as_addr
        self.ps_addr = ps_addr
        self.modem_control = modem_control
        self.pinned_as_key = load_public_key(as_key_path)
        self.pinned_ps_key = load_public_key(ps_key_path) if ps_key_path else None
        self.config = mpay_config.load(None)
        self.timers = TimeWheelService(TimeWheel(tick_s=DEVICE_TICK_S), reactor=reactor)
        self.timers.startService()
        self._listeners: list[UDPListenerService] = []
        self._answerers: list[NoticeAnswerer] = []

    @classmethod
    def for_server(cls, reactor, server: Any, check_receipts: bool = True) -> "SimDevices":
        """Devices for a :class:`~mpay.load.server.ServerProcess` (keys from its directory)."""
        return cls(reactor, as_addr=server.as_addr, ps_addr=server.ps_addr,
                   modem_control=server.modem_control, as_key_path=server.path("as.pub"),
                   ps_key_path=server.path("ps.pub") if check_receipts else None)

    @property
    def domain(self) -> str:
        return self.config["server"]["domain"]

    def ring(self, number: str, line: str) -> defer.Deferred:
        return ring_via_control(self.modem_control, number, reactor=self.reactor)

    def device(self, number: str, state: DeviceState | None = None) -> Device:
        """A device listening on a port of its own (not yet enrolled unless *state* is)."""
        device = self.device_for(state or DeviceState.new(number), None)
        device.endpoint = SIPEndpoint("dmd", device, self.timers)
        listener = UDPListenerService(f"udp:0:interface={LOOPBACK}", device.endpoint,
                                      reactor=self.reactor)
        listener.startService()
        self._listeners.append(listener)
        return device

    @defer.inlineCallbacks
    def ready(self, number: str):
        """Enrolled, with a ticket, registered at the PS."""
        device = self.device(number)
        yield device.enroll()
        yield device.get_ticket()
        yield device.register()
        return device

    @defer.inlineCallbacks
    def register_together(self, devices: list[Device]):
        """Each of *devices* registered again, all from one new UDP port, which is then
        closed for another program to answer their notices on (SIPp): fires with the port.

        The registrar routes by where a REGISTER came from, so this is how one SIPp
        serves every payee; the devices' own listeners stay, and no longer get notices.
        """
        endpoint = SIPEndpoint("dmd", NoRequests(), self.timers)
        listener = UDPListenerService(f"udp:0:interface={LOOPBACK}", endpoint,
                                      reactor=self.reactor)
        listener.startService()
        try:
            port = endpoint.sent_by[1]
            for device in devices:
                yield self.device_for(device.state, endpoint).register()
        finally:
            yield listener.stopService()
        return port

    def device_for(self, state: DeviceState, endpoint: SIPEndpoint) -> Device:
        """A device of *state* on *endpoint* (another device's, or one shared)."""
        device = Device(state, domain=self.domain, as_addr=self.as_addr, ps_addr=self.ps_addr,
                        as_identity=self.config["as"]["identity"],
                        pinned_as_key=self.pinned_as_key, ring=self.ring,
                        clock=self.reactor.seconds, reactor=self.reactor,
                        pinned_ps_key=self.pinned_ps_key)
        device.endpoint = endpoint
        return device

    def answer_notices(self, device: Device) -> NoticeAnswerer:
        """From now on *device*'s notices get their 200 from bytes, not through its stack."""
        answerer = NoticeAnswerer(device.endpoint, NOTICE_CONTENT_TYPE,
                                  os.urandom(TAG_KEY_BYTES))
        answerer.install()
        self._answerers.append(answerer)
        return answerer

    @defer.inlineCallbacks
    def stop(self):
        """Every listener closed and the wheel stopped; idempotent."""
        answerers, self._answerers = self._answerers, []
        for answerer in answerers:
            answerer.uninstall()
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            yield listener.stopService()
        if self.timers.running:
            yield self.timers.stopService()

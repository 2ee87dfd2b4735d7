"""A faulty network between devices and a server: datagrams dropped, duplicated, delayed.

:class:`FaultPlan` decides each datagram's fate from a seeded random stream
(sans-IO: the same seed, the same fates in the same order), so a failing
run can be run again.  :class:`FaultyNetwork` is the UDP edge: it listens
where the devices think the server is, and gives each device a socket of
its own towards the server, so the server sees one source per device (as
behind a NAT) and its requests to a device (notices, charge requests, BYE)
come back through the same faults.  Reordering is delay: a datagram held
back is overtaken by the ones after it.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from twisted.internet import protocol

MAX_FAULT_DELAY_S = 0.2
"""Longest a datagram is held back (reordering); well under T1, as on a real path."""

MAX_DEVICES = 10_000
"""Devices one network serves (each has its own upstream socket)."""


class FaultPlan:
    """The fate of each datagram: dropped, or delivered once or twice, each copy after a delay."""

    def __init__(self, seed: int, *, drop: float = 0.05, duplicate: float = 0.05,
                 reorder: float = 0.05, max_delay_s: float = MAX_FAULT_DELAY_S):
        for name, p in (("drop", drop), ("duplicate", duplicate), ("reorder", reorder)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be a probability below 1, not {p!r}")
        self.rng = random.Random(seed)
        self.drop, self.duplicate, self.reorder = drop, duplicate, reorder
        self.max_delay_s = max_delay_s
        self.counts: Counter = Counter()

    def fates(self) -> list[float]:
        """Delays (seconds) of the copies to deliver; empty when the datagram is lost."""
        rng = self.rng
        self.counts["datagrams"] += 1
        if rng.random() < self.drop:
            self.counts["dropped"] += 1
            return []
        copies = 1
        if rng.random() < self.duplicate:
            self.counts["duplicated"] += 1
            copies = 2
        delays = []
        for _ in range(copies):
            if rng.random() < self.reorder:
                self.counts["delayed"] += 1
                delays.append(rng.uniform(0.0, self.max_delay_s))
            else:
                delays.append(0.0)
        return delays


class _Front(protocol.DatagramProtocol):
    def __init__(self, network: FaultyNetwork):
        self.network = network

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        self.network._from_device(data, addr)


class _Upstream(protocol.DatagramProtocol):
    """One device's socket towards the server."""

    def __init__(self, network: FaultyNetwork, device: tuple[str, int]):
        self.network = network
        self.device = device

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        self.network._from_server(data, self.device)


class FaultyNetwork:
    """Devices send to :attr:`address`; the server at *server* sees one socket per device."""

    def __init__(self, reactor: Any, server: tuple[str, int], plan: FaultPlan,
                 interface: str = "127.0.0.1"):
        self.reactor = reactor
        self.server = server
        self.plan = plan
        self.interface = interface
        self._front: Any = None
        self._upstreams: dict[tuple[str, int], Any] = {}
        self._pending: set[Any] = set()

    @property
    def address(self) -> tuple[str, int]:
        return (self.interface, self._front.getHost().port)

    def start(self) -> None:
        self._front = self.reactor.listenUDP(0, _Front(self), interface=self.interface)

    def stop(self):
        for call in list(self._pending):
            if call.active():
                call.cancel()
        self._pending.clear()
        ports = [self._front, *self._upstreams.values()]
        self._upstreams.clear()
        for port in ports:
            port.stopListening()

    def _later(self, delay: float, write, data: bytes, addr) -> None:
        if delay <= 0.0:
            write(data, addr)
            return
        call = self.reactor.callLater(delay, self._deliver, write, data, addr)
        self._pending.add(call)

    def _deliver(self, write, data: bytes, addr) -> None:
        self._pending = {call for call in self._pending if call.active()}
        write(data, addr)

    def _from_device(self, data: bytes, device: tuple[str, int]) -> None:
        upstream = self._upstreams.get(device)
        if upstream is None:
            if len(self._upstreams) >= MAX_DEVICES:
                return
            upstream = self._upstreams[device] = self.reactor.listenUDP(
                0, _Upstream(self, device), interface=self.interface)
        for delay in self.plan.fates():
            self._later(delay, upstream.write, data, self.server)

    def _from_server(self, data: bytes, device: tuple[str, int]) -> None:
        for delay in self.plan.fates():
            self._later(delay, self._front.write, data, device)

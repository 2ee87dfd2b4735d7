"""``twistd mpay --workers 2`` for real: two PS processes on one port, Redis + PostgreSQL (issue 8).

The kernel spreads the devices between the two processes (SO_REUSEPORT);
which device lands where is its choice, so the test makes enough of them
that both processes hold some (all on one has probability 2 ** -15) and
pays around a ring, so that some payer and its payee are held by different
processes.  Every transfer must be answered 200 (the payee confirmed,
through whichever process holds it), every one paid exactly once, and the
books must balance.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.internet import defer, reactor
from twisted.trial import unittest

from mpay import config as mpay_config
from mpay.ledger import LedgerService, store_opener
from mpay.load.backends import Backends
from mpay.load.server import ServerProcess, free_udp_ports
from mpay.ops.workers import child_command, worker_settings
from mpay.stores.location import Binding, connect_redis
from tests.crashload import devices_for
DEVICES = 16
FUNDS_MINOR = 1_000
AMOUNT_MINOR = 7


class WorkerSettingsTests(unittest.TestCase):
    def config(self, **overrides):
        base = {"location.backend": "redis", "ps.listen": "udp:5060:interface=127.0.0.1"}
        return mpay_config.load(None, {**base, **overrides})

    def test_each_worker_has_its_name_and_relay_and_knows_the_others(self):
        first, second, third = worker_settings(self.config(), 3)
        peers = "ps1=127.0.0.1:5160, ps2=127.0.0.1:5161, ps3=127.0.0.1:5162"
        adopted = first.pop("ps.adopt_sessions").split(", ")
        self.assertEqual(first, {"ps.instance_id": "ps1", "ps.reuse_port": "true", "ps.peers": peers,
                                 "ps.relay_listen": "udp:5160:interface=127.0.0.1"})
        # Worker 1 settles what one process or a larger set of workers left open.
        self.assertEqual(adopted[:3], ["ps", "ps4", "ps5"])
        self.assertNotIn("ps2", adopted)
        self.assertEqual((second["ps.instance_id"], second["server.role"], second["ps.listen_tcp"]),
                         ("ps2", "ps", ""))
        self.assertEqual(third["ps.relay_listen"], "udp:5162:interface=127.0.0.1")
        # The children's command lines load: every setting is a real key.
        command = child_command(None, {"ps.listen": "udp:5060:interface=127.0.0.1",
                                       "location.backend": "redis"}, third)
        sets = dict(arg.split("=", 1) for arg in command[command.index("mpay") + 1:][1::2])
        mpay_config.load(None, sets)

    def test_what_cannot_be_shared_is_refused_with_a_reason(self):
        for overrides, words in (({"location.backend": "memory"}, "backend = redis"),
                                 ({"ps.listen": "udp:0:interface=127.0.0.1"}, "fixed"),
                                 ({"server.role": "as"}, "role as")):
            with self.assertRaises(mpay_config.ConfigError) as caught:
                worker_settings(self.config(**overrides), 2)
            self.assertIn(words, str(caught.exception))
        self.assertRaises(mpay_config.ConfigError, worker_settings, self.config(), 1)


class TwoWorkerProcessesTests(unittest.TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def setUp(self):
        self.backends = Backends.named(("postgres", "redis"), label="workers")
        self.addCleanup(self.backends.cleanup)
        # Short: the modem's UNIX socket path must stay under 108 bytes.
        directory = tempfile.mkdtemp(prefix="mpay-")
        self.addCleanup(shutil.rmtree, directory, True)
        logs = os.path.abspath(self.mktemp())   # in _trial_temp, which outlives the test
        os.makedirs(logs)
        as_port, ps_port, relay_port = free_udp_ports(3)
        self.server = ServerProcess(reactor, directory, as_port, ps_port, workers=2,
                                    relay_port=relay_port, logfile=os.path.join(logs, "server.log"),
                                    settings=self.backends.settings())
        self.server.start()
        self.addCleanup(self.server.stop)
        yield self.server.wait_ready()      # both workers' relays bound too
        self.ledger = LedgerService(store_opener(dict(self.server.ledger.section)), reactor)
        self.ledger.startService()
        self.addCleanup(self.ledger.stopService)

    @defer.inlineCallbacks
    def test_a_ring_of_transfers_across_two_worker_processes(self):
        devices = devices_for(self, reactor, self.server)
        numbers = [f"+8869120007{index:02d}" for index in range(DEVICES)]
        payers = []
        for number in numbers:
            payers.append((yield devices.ready(number)))
            yield self.ledger.cash_in(number, FUNDS_MINOR, f"fund-{number}")
        answers = yield defer.gatherResults([
            payer.transfer(numbers[(index + 1) % DEVICES], AMOUNT_MINOR)
            for index, payer in enumerate(payers)])
        self.assertEqual([response.status for response, _ in answers], [200] * DEVICES)
        journal_ids = {receipt.journal_id for _, receipt in answers}
        self.assertEqual(len(journal_ids), DEVICES)
        for number in numbers:
            self.assertEqual((yield self.ledger.balance(number)).available, FUNDS_MINOR)
        report = yield self.ledger.audit()
        self.assertTrue(report.ok, report.format())
        # Both processes served: each binding names the worker its REGISTER reached.
        redis = yield connect_redis("127.0.0.1", 6379, pool_size=1)
        try:
            bindings = yield defer.gatherResults([
                redis.get(f"{self.backends.redis_prefix}loc:{number}") for number in numbers])
        finally:
            yield redis.disconnect()
        holders = {Binding.from_json(text).via for text in bindings}
        self.assertEqual(holders, {"ps1", "ps2"})

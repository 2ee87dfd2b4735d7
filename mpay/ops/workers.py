"""``--workers N``: N payment-server processes on one UDP port (issue 8, scale-out).

One twistd process is worker 1: it runs what its role says (by default the
AS too) and starts workers 2..N as child processes under Twisted's
:class:`~twisted.runner.procmon.ProcessMonitor`, which restarts any that
dies.  Every worker is a PS instance of its own name (``<instance_id>1`` ..
``<instance_id>N``, stable across restarts, so each settles its own timed
sessions when it comes back), binds the PS port with SO_REUSEPORT and has a
relay address of its own on loopback (``mpay/sip/peers.py``).  The workers
share what the configuration names: one Redis (required: the locations
must be shared) and one ledger (PostgreSQL; a SQLite file works on one
machine, with one writer at a time).

TCP and TLS listeners stay in worker 1: a device on a stream is held there
and reached by the others through the relay.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.runner.procmon import ProcessMonitor

from mpay.config import Config, ConfigError
from mpay.sip.transport import parse_udp_description

RELAY_PORT_OFFSET = 100
"""Without ``[ps] relay_listen``, worker k relays on the PS port + this + k - 1 (loopback)."""

MAX_WORKERS = 64


def worker_settings(cfg: Config, workers: int) -> list[dict[str, str]]:
    """The configuration overrides of each worker, worker 1 first."""
    if not 2 <= workers <= MAX_WORKERS:
        raise ConfigError(f"--workers must be 2..{MAX_WORKERS} (1 is one process, the default)")
    if cfg["location"]["backend"] != "redis":
        raise ConfigError("--workers needs [location] backend = redis: the workers share the "
                          "locations, OTCNs and the replay cache")
    if cfg["server"]["role"] == "as":
        raise ConfigError("--workers multiplies the PS; this process runs no PS (role as)")
    ps = cfg["ps"]
    port, interface = parse_udp_description(ps["listen"])
    if port == 0:
        raise ConfigError("--workers needs a fixed [ps] listen port: the workers share it")
    if ps["relay_listen"]:
        relay_base, relay_interface = parse_udp_description(ps["relay_listen"])
    else:
        relay_base, relay_interface = port + RELAY_PORT_OFFSET, "127.0.0.1"
    if relay_base == 0:
        raise ConfigError("--workers needs a fixed [ps] relay_listen port (worker k adds k - 1)")
    relay_host = relay_interface or "127.0.0.1"
    names = [f"{ps['instance_id'][:14]}{k}" for k in range(1, workers + 1)]
    peers = ", ".join(f"{name}={relay_host}:{relay_base + k}" for k, name in enumerate(names))
    # Worker 1 settles what the single process (its base name) and workers past N left open.
    retired = [ps["instance_id"]] + [f"{ps['instance_id'][:14]}{k}"
                                     for k in range(workers + 1, MAX_WORKERS + 1)]
    settings = []
    for k, name in enumerate(names):
        own = {"ps.instance_id": name, "ps.reuse_port": "true", "ps.peers": peers,
               "ps.relay_listen": f"udp:{relay_base + k}:interface={relay_host}"}
        if k == 0:
            own["ps.adopt_sessions"] = ", ".join(retired)
        if k:   # the children: a PS alone, nothing else bound to a port
            own.update({"server.role": "ps", "ps.listen_tcp": "", "ps.listen_tls": "",
                        "metrics.listen": "", "manhole.listen": ""})
        settings.append(own)
    return settings


def child_command(config_path: str | None, overrides: dict[str, str],
                  own: dict[str, str]) -> list[str]:
    """The twistd command line of one child worker (same interpreter, same options)."""
    args = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "--nodaemon", "--pidfile=", "--logfile=-", "mpay"]
    if config_path:
        args += ["--config", os.path.abspath(config_path)]
    for key, value in {**overrides, **own}.items():
        args += ["--set", f"{key}={value}"]
    return args


def workers_service(config_path: str | None, overrides: dict[str, str],
                    children: list[dict[str, str]], reactor: Any) -> ProcessMonitor:
    """The ProcessMonitor that runs (and restarts) workers 2..N."""
    monitor = ProcessMonitor(reactor=reactor)
    monitor.setName("workers")
    for own in children:
        monitor.addProcess(own["ps.instance_id"], child_command(config_path, overrides, own),
                           env=dict(os.environ), cwd=os.getcwd())
    return monitor

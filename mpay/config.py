"""The INI configuration: one schema of keys, defaults and checks.

The schema below is the single source of truth; ``etc/mpay.ini`` documents
the same keys for operators, and ``tests/test_config.py`` checks that the two
agree.  A wrong value is refused at start with the section, key and reason,
never discovered at the first payment.
"""

from __future__ import annotations

import configparser
import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Callable

ROLES = ("as", "ps", "all")

_LISTEN_RE = re.compile(r"^(udp|tcp|ssl|tls):\d{1,5}(:[^:]+=[^:]*)*$")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names it."""


def _role(value: str) -> str:
    if value not in ROLES:
        raise ValueError(f"must be one of {', '.join(ROLES)}")
    return value


def _listen(value: str) -> str:
    """An endpoint description such as udp:5060:interface=127.0.0.1."""
    if value and not _LISTEN_RE.match(value):
        raise ValueError("must look like udp:PORT[:interface=ADDR] or tcp:PORT[...]")
    if value and not 0 <= int(value.split(":")[1]) <= 65535:
        raise ValueError("port out of range 0..65535")
    return value


def _stream_listen(scheme: str) -> Callable[[str], str]:
    """``SCHEME:PORT[:interface=ADDR]`` for a stream listener, or empty (off)."""
    def check(value: str) -> str:
        if value and not value.startswith(scheme + ":"):
            raise ValueError(f"must look like {scheme}:PORT[:interface=ADDR], or be empty")
        return _listen(value)
    return check


def _addresses(value: str) -> list[str]:
    """A comma-separated list of IP addresses (possibly empty)."""
    addresses = [part.strip() for part in value.split(",") if part.strip()]
    for address in addresses:
        ipaddress.ip_address(address)   # ValueError names the bad one
    return addresses


def _names(value: str) -> list[str]:
    names = [part.strip() for part in value.split(",") if part.strip()]
    if not names:
        raise ValueError("must name at least one host name or address")
    return names


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be a positive integer")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("must be a positive number")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not 0 <= number < float("inf"):
        raise ValueError("must be 0 or a positive number")
    return number


def _currency(value: str) -> str:
    if not re.fullmatch(r"[A-Z]{3}", value):
        raise ValueError("must be an ISO 4217 code such as TWD")
    return value


def _otcn_lifetime(value: str) -> int:
    number = int(value)
    if not 0 < number <= 86_400:
        raise ValueError("must be 1..86400 seconds")
    return number


def _region(value: str) -> str:
    if not re.fullmatch(r"[A-Z]{2}", value):
        raise ValueError("must be an ISO 3166 alpha-2 region such as TW")
    return value


def _text(value: str) -> str:
    return value


def _instance(value: str) -> str:
    from mpay.sip.peers import INSTANCE_RE

    if not INSTANCE_RE.match(value):
        raise ValueError("must be 1 to 16 letters or digits (it rides in SIP branches and tags)")
    return value


def _instances(value: str) -> list[str]:
    """Comma-separated instance names (possibly none)."""
    names = [part.strip() for part in value.split(",") if part.strip()]
    for name in names:
        _instance(name)
    return names


def _relay_listen(value: str) -> str:
    if value and not value.startswith("udp:"):
        raise ValueError("must look like udp:PORT[:interface=ADDR], or be empty")
    return _listen(value)


def _peers(value: str) -> dict[str, tuple[str, int]]:
    from mpay.sip.peers import parse_peers

    return parse_peers(value)


def _bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise ValueError("must be true or false")


def _backend(*choices: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value
    return check


def _port(value: str) -> int:
    number = int(value)
    if not 0 < number <= 65535:
        raise ValueError("must be a port 1..65535")
    return number


def _lines(value: str) -> list[tuple[str, str]]:
    """``DEVICE=NUMBER, DEVICE=NUMBER``: the caller-ID receiver lines."""
    lines = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        device, sep, number = item.partition("=")
        if not sep or not device.strip() or not number.strip():
            raise ValueError(f"{item!r} is not DEVICE=NUMBER")
        lines.append((device.strip(), number.strip()))
    return lines


@dataclass(frozen=True)
class Key:
    default: str
    convert: Callable[[str], Any]


SCHEMA: dict[str, dict[str, Key]] = {
    "server": {
        "role": Key("all", _role),
        "domain": Key("mpay.test", _text),
        "default_region": Key("TW", _region),
        "gc_threshold": Key("10000", _non_negative_int),
    },
    "as": {
        "listen": Key("udp:5070:interface=127.0.0.1", _listen),
        "listen_tcp": Key("", _stream_listen("tcp")),
        "listen_tls": Key("", _stream_listen("tls")),
        "identity": Key("as.mpay.test", _text),
        "signing_key": Key("var/as_signing_key.pem", _text),
        "master_keys": Key("var/master.keys", _text),
        "timer_a_s": Key("0.5", _positive_float),
        "timer_c_s": Key("32", _positive_float),
        "timer_d_s": Key("60", _positive_float),
        "timer_f_s": Key("32", _positive_float),
        "register_rate_per_source_s": Key("10", _positive_float),
        "register_burst_per_source": Key("50", _positive_int),
        "rate_limit_exempt": Key("127.0.0.1, ::1", _addresses),
    },
    "ps": {
        "listen": Key("udp:5060:interface=127.0.0.1", _listen),
        "listen_tcp": Key("", _stream_listen("tcp")),
        "listen_tls": Key("", _stream_listen("tls")),
        "require_tls": Key("false", _bool),
        "signing_key": Key("var/ps_signing_key.pem", _text),
        "transfer_timer_a_s": Key("8", _positive_float),
        "charge_timer_a_s": Key("60", _positive_float),
        "checkpoint_s": Key("5", _positive_float),
        "instance_id": Key("ps", _instance),
        "reuse_port": Key("false", _bool),
        "signature_process": Key("true", _bool),
        "relay_listen": Key("", _relay_listen),
        "peers": Key("", _peers),
        "adopt_sessions": Key("", _instances),
    },
    "ledger": {
        "backend": Key("sqlite", _backend("sqlite", "postgres")),
        "sqlite_path": Key("var/ledger.sqlite3", _text),
        "postgres_dsn": Key("", _text),
        "postgres_schema": Key("public", _text),
        "currency": Key("TWD", _currency),
        "commit_delay_ms": Key("2", _non_negative_float),
        "writer_process": Key("true", _bool),
    },
    "tickets": {
        "k_ps_keys": Key("var/k_ps.keys", _text),
        "ps_id": Key("ps.mpay.test", _text),
        "lifetime_s": Key("28800", _positive_int),
        "clock_skew_s": Key("300", _positive_int),
        "check_source_ip": Key("true", _bool),
        "replay_cache_max_entries": Key("4000000", _positive_int),
    },
    "callerid": {
        "lines": Key("", _lines),
        "init": Key("ATZ AT+VCID=1", _text),
        "baudrate": Key("9600", _positive_int),
        "simulate": Key("true", _bool),
        "sim_line": Key("+886223456789", _text),
        "sim_control": Key("var/sim-modem.sock", _text),
    },
    "tls": {
        "certificate": Key("var/tls/server.crt", _text),
        "private_key": Key("var/tls/server.key", _text),
        "min_version": Key("1.2", _backend("1.2", "1.3")),
        "self_signed": Key("true", _bool),
        "names": Key("localhost, 127.0.0.1", _names),
    },
    "otcn": {"lifetime_s": Key("600", _otcn_lifetime)},
    "guard": {
        "limit": Key("5", _positive_int),
        "window_s": Key("600", _positive_int),
        "block_s": Key("600", _positive_int),
    },
    "location": {
        "backend": Key("memory", _backend("memory", "redis")),
        "redis_host": Key("127.0.0.1", _text),
        "redis_port": Key("6379", _port),
        "redis_db": Key("0", int),
        "redis_prefix": Key("mpay:", _text),
    },
    "sip": {
        "t1_ms": Key("500", _positive_int),
        "t2_ms": Key("4000", _positive_int),
        "t4_ms": Key("5000", _positive_int),
        "udp_rcvbuf_bytes": Key("1048576", _positive_int),
        "max_transactions": Key("400000", _positive_int),
        "shed_lag_ms": Key("250", _non_negative_int),
    },
    "timewheel": {"tick_ms": Key("100", _positive_int)},
    "metrics": {"listen": Key("tcp:9460:interface=127.0.0.1", _listen)},
    "manhole": {
        "listen": Key("", _listen),
        "host_key": Key("var/manhole_host_key", _text),
        "authorized_keys": Key("", _text),
        "passwords": Key("", _text),
    },
}


class Config:
    """Validated settings, read as ``config["sip"]["t1_ms"]``."""

    def __init__(self, values: dict[str, dict[str, Any]]):
        self._values = values

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self._values[section]

    def sections(self) -> list[str]:
        return list(self._values)


def load(path: str | None = None, overrides: dict[str, str] | None = None) -> Config:
    """Read *path* (or only the defaults), apply ``section.key`` overrides, validate."""
    parser = configparser.ConfigParser(interpolation=None)
    if path is not None:
        try:
            with open(path, encoding="utf-8") as handle:
                parser.read_file(handle)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except configparser.Error as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
    raw: dict[str, dict[str, str]] = {
        section: {name: key.default for name, key in keys.items()}
        for section, keys in SCHEMA.items()
    }
    for section in parser.sections():
        if section not in SCHEMA:
            raise ConfigError(f"[{section}]: unknown section")
        for name, value in parser.items(section):
            if name not in SCHEMA[section]:
                raise ConfigError(f"[{section}] {name}: unknown key")
            raw[section][name] = value.strip()
    for dotted, value in (overrides or {}).items():
        section, _, name = dotted.partition(".")
        if name not in SCHEMA.get(section, {}):
            raise ConfigError(f"{dotted}: unknown key (expected section.key)")
        raw[section][name] = value.strip()
    values: dict[str, dict[str, Any]] = {}
    for section, keys in SCHEMA.items():
        values[section] = {}
        for name, key in keys.items():
            try:
                values[section][name] = key.convert(raw[section][name])
            except ValueError as exc:
                raise ConfigError(f"[{section}] {name} = {raw[section][name]!r}: {exc}") from exc
    ps = values["ps"]
    if ps["peers"] and not ps["relay_listen"]:
        raise ConfigError("[ps] peers needs [ps] relay_listen: the peers relay to it")
    return Config(values)

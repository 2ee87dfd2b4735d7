"""The production backends for one run: a Redis key prefix and a PostgreSQL schema of its own.

A load or fault run against Redis and PostgreSQL must not meet another
run's data (the tests share the Redis on 127.0.0.1:6379 and the database
``test``), nor leave its own behind: each run draws a token, names its
Redis prefix (``mpay-load-<token>:``), its schema (``mpay_load_<token>``) and
the application name its ledger connections carry (``mpay-load-<token>``)
after it, and :meth:`Backends.cleanup` deletes the keys and drops the
schema afterwards.  The application name lets a run find the PostgreSQL
backends serving its server: to measure their CPU, or to end them (a
"restart" as the server sees one).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from twisted.internet import defer, threads

from mpay.load.books import is_postgres_url

REDIS = "redis"
POSTGRES = "postgres"
NAMES = (REDIS, POSTGRES)

DEFAULT_REDIS = ("127.0.0.1", 6379)
DEFAULT_POSTGRES_DSN = "postgresql://127.0.0.1:5432/test"

CLEANUP_SCAN_KEYS = 1_000
"""Keys asked for per SCAN while deleting a run's keys (SCAN's COUNT hint)."""

CONNECT_TIMEOUT_S = 10


def parse_names(text: str) -> tuple[str, ...]:
    """``redis,postgres`` (either, both; ``embedded`` or empty: neither) -> the names, checked."""
    names = tuple(sorted({part.strip() for part in text.split(",") if part.strip()} - {"embedded"}))
    unknown = [name for name in names if name not in NAMES]
    if unknown:
        raise ValueError(f"unknown backend {unknown[0]!r}: name {' and/or '.join(NAMES)}")
    return names


def _require_url(dsn: str) -> None:
    if not is_postgres_url(dsn):        # mpay-admin takes URLs only
        raise ValueError(f"the PostgreSQL DSN must be a postgresql:// URL, not {dsn!r}")


def with_application_name(dsn: str, application: str) -> str:
    """The PostgreSQL URL *dsn* with ``application_name`` set."""
    _require_url(dsn)
    parts = urlsplit(dsn)
    query = [(key, value) for key, value in parse_qsl(parts.query) if key != "application_name"]
    query.append(("application_name", application))
    return urlunsplit(parts._replace(query=urlencode(query)))


@dataclass(frozen=True)
class Backends:
    """Which production stores a run uses, and the names it owns in them.

    *redis* None: the memory location store; *postgres_dsn* None: SQLite.
    """

    redis: tuple[str, int] | None = None
    postgres_dsn: str | None = None
    label: str = "load"
    token: str = field(default_factory=lambda: secrets.token_hex(5))

    @classmethod
    def named(cls, names: tuple[str, ...], *, redis: tuple[str, int] = DEFAULT_REDIS,
              postgres_dsn: str = DEFAULT_POSTGRES_DSN, label: str = "load") -> "Backends":
        if POSTGRES in names:
            _require_url(postgres_dsn)
        return cls(redis if REDIS in names else None,
                   postgres_dsn if POSTGRES in names else None, label)

    @property
    def any(self) -> bool:
        return self.redis is not None or self.postgres_dsn is not None

    @property
    def redis_prefix(self) -> str:
        return f"mpay-{self.label}-{self.token}:"

    @property
    def postgres_schema(self) -> str:
        return f"mpay_{self.label}_{self.token}"

    @property
    def application_name(self) -> str:
        """What the server's PostgreSQL connections call themselves (pg_stat_activity)."""
        return f"mpay-{self.label}-{self.token}"

    @property
    def ledger_dsn(self) -> str:
        assert self.postgres_dsn is not None
        return with_application_name(self.postgres_dsn, self.application_name)

    def settings(self) -> tuple[str, ...]:
        """``SECTION.KEY=VALUE`` settings that put a server on these backends."""
        settings: list[str] = []
        if self.redis is not None:
            settings += ["location.backend=redis", f"location.redis_host={self.redis[0]}",
                         f"location.redis_port={self.redis[1]}",
                         f"location.redis_prefix={self.redis_prefix}"]
        if self.postgres_dsn is not None:
            settings += ["ledger.backend=postgres", f"ledger.postgres_dsn={self.ledger_dsn}",
                         f"ledger.postgres_schema={self.postgres_schema}"]
        return tuple(settings)

    def describe(self) -> str:
        location = (f"Redis {self.redis[0]}:{self.redis[1]} prefix {self.redis_prefix}"
                    if self.redis else "memory location store")
        ledger = (f"PostgreSQL {self.postgres_dsn} schema {self.postgres_schema}"
                  if self.postgres_dsn else "SQLite ledger")
        return f"{location}, {ledger}"

    # -- afterwards ---------------------------------------------------------------
    @defer.inlineCallbacks
    def cleanup(self, keep_schema: bool = False):
        """Delete the run's Redis keys and drop its schema (unless *keep_schema*): a summary."""
        done = []
        if self.redis is not None:
            deleted = yield self._delete_keys()
            done.append(f"deleted {deleted} Redis keys {self.redis_prefix}*")
        if self.postgres_dsn is not None:
            if keep_schema:
                done.append(f"kept schema {self.postgres_schema} in {self.postgres_dsn}")
            else:
                yield threads.deferToThread(self._drop_schema)
                done.append(f"dropped schema {self.postgres_schema}")
        return "; ".join(done)

    @defer.inlineCallbacks
    def leftovers(self):
        """(Redis keys with the prefix, whether the schema exists): (0, False) once clean."""
        keys = 0
        if self.redis is not None:
            keys = len((yield self._keys()))
        schema = False
        if self.postgres_dsn is not None:
            schema = yield threads.deferToThread(self._schema_exists)
        return keys, schema

    def _redis(self) -> defer.Deferred:
        import txredisapi

        return txredisapi.Connection(*self.redis, reconnect=False, charset="utf-8",
                                     connectTimeout=CONNECT_TIMEOUT_S)

    @defer.inlineCallbacks
    def _keys(self):
        redis = yield self._redis()
        try:
            found, cursor = [], 0
            while True:
                cursor, keys = yield redis.scan(cursor, f"{self.redis_prefix}*",
                                                CLEANUP_SCAN_KEYS)
                found += keys
                if int(cursor) == 0:
                    return sorted(set(found))
        finally:
            yield redis.disconnect()

    @defer.inlineCallbacks
    def _delete_keys(self):
        keys = yield self._keys()
        if not keys:
            return 0
        redis = yield self._redis()
        try:
            for start in range(0, len(keys), CLEANUP_SCAN_KEYS):
                yield redis.delete(keys[start:start + CLEANUP_SCAN_KEYS])
        finally:
            yield redis.disconnect()
        return len(keys)

    def _connect(self):
        import psycopg

        return psycopg.connect(self.postgres_dsn, autocommit=True,
                               connect_timeout=CONNECT_TIMEOUT_S)

    def _drop_schema(self) -> None:
        from psycopg import sql

        with self._connect() as connection:
            connection.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE")
                               .format(sql.Identifier(self.postgres_schema)))

    def _schema_exists(self) -> bool:
        with self._connect() as connection:
            return connection.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s",
                                      (self.postgres_schema,)).fetchone()[0] == 1

    # -- the backends' own processes -------------------------------------------------
    def postgres_pids(self) -> list[int]:
        """The PostgreSQL backends serving this run's connections now (blocking, brief)."""
        if self.postgres_dsn is None:
            return []
        with self._connect() as connection:
            rows = connection.execute("SELECT pid FROM pg_stat_activity"
                                      " WHERE application_name = %s",
                                      (self.application_name,)).fetchall()
        return sorted(row[0] for row in rows)

    def terminate_postgres_backends(self) -> int:
        """End every backend of this run (what the server sees of a PostgreSQL restart)."""
        with self._connect() as connection:
            rows = connection.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                      " WHERE application_name = %s",
                                      (self.application_name,)).fetchall()
        return sum(1 for (ended,) in rows if ended)

    @defer.inlineCallbacks
    def holders(self, numbers: list[str]):
        """Which PS process holds each of *numbers* (its binding's ``via``; None: not bound).

        With several PS processes on one port the kernel chose by a hash of each
        device's address; a run reports the spread rather than assume it.
        """
        from mpay.stores.location import RedisLocationStore

        redis = yield self._redis()
        try:
            store = RedisLocationStore(redis, self.redis_prefix)
            bindings = yield defer.gatherResults([store.lookup(number) for number in numbers])
        finally:
            yield redis.disconnect()
        return {number: binding.via if binding else None
                for number, binding in zip(numbers, bindings)}

    @defer.inlineCallbacks
    def redis_pid(self):
        """The redis-server's process id (INFO server), or None without Redis."""
        if self.redis is None:
            return None
        redis = yield self._redis()
        try:
            info = yield redis.info("server")
        finally:
            yield redis.disconnect()
        pid = info.get("process_id")
        return None if pid is None else int(pid)

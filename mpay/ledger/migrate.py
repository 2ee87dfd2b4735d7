"""Versioned schema migrations, applied when a store opens.

Files in ``migrations/`` are named ``NNNN_name.sql`` (both dialects) or
``NNNN_name.<dialect>.sql`` (one per backend, when SQLite and PostgreSQL
spell things differently).  Each pending version runs in its own transaction
together with the row that records it in ``schema_version``, under an
exclusive lock (SQLite ``BEGIN IMMEDIATE``, a PostgreSQL advisory lock), so
two processes starting at once apply it exactly once and a crash leaves the
schema at a whole version.  Opening an up-to-date database changes nothing.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from twisted.logger import Logger

from mpay.ledger.api import LedgerError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
DIALECTS = ("sqlite", "postgres")

_NAME_RE = re.compile(r"^(\d{4})_([a-z0-9_]+?)(?:\.(sqlite|postgres))?\.sql$")

VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    name    TEXT NOT NULL,
    applied DOUBLE PRECISION NOT NULL
)"""

log = Logger()


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")


class MigrationTarget(Protocol):
    """The part of a store that migrations need; both stores provide it."""

    dialect: str

    def _x(self, sql: str, params: tuple = ()): ...
    def _begin_migration(self) -> None: ...
    def _run_script(self, sql: str) -> None: ...


def migrations(dialect: str, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations for *dialect*, oldest first; a dialect-specific file wins."""
    assert dialect in DIALECTS, dialect
    chosen: dict[int, Migration] = {}
    for path in sorted(directory.iterdir()):
        match = _NAME_RE.match(path.name)
        if not match:
            continue
        version, name, only = int(match.group(1)), match.group(2), match.group(3)
        if only is not None and only != dialect:
            continue
        if version in chosen and only is None:
            continue  # the dialect-specific file seen already takes precedence
        chosen[version] = Migration(version, name, path)
    versions = sorted(chosen)
    if versions != list(range(1, len(versions) + 1)):
        raise LedgerError(f"migrations for {dialect} must be numbered 1..n without gaps:"
                          f" {versions}")
    return [chosen[v] for v in versions]


def current_version(target: MigrationTarget) -> int:
    """The highest applied version, 0 for an empty database."""
    target._x(VERSION_TABLE)
    row = target._x("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
    return int(row[0])


def applied_version(target: MigrationTarget) -> int:
    """The highest applied version without creating anything: 0 if there is no ledger."""
    try:
        row = target._x("SELECT MAX(version) FROM schema_version").fetchone()
    except Exception:  # no such table (or schema): not a ledger database
        return 0
    return int(row[0] or 0)


def latest_version(dialect: str) -> int:
    """The version this software migrates a *dialect* database to."""
    known = migrations(dialect)
    return known[-1].version if known else 0


def migrate(target: MigrationTarget, directory: Path = MIGRATIONS_DIR) -> list[int]:
    """Bring the database up to the newest version; return the versions applied now."""
    known = migrations(target.dialect, directory)
    applied: list[int] = []
    for migration in known:
        target._begin_migration()
        try:
            if current_version(target) >= migration.version:
                target._x("ROLLBACK")
                continue
            target._run_script(migration.sql())
            target._x("INSERT INTO schema_version (version, name, applied) VALUES (?, ?, ?)",
                      (migration.version, migration.name, time.time()))
            target._x("COMMIT")
        except BaseException:
            try:
                target._x("ROLLBACK")
            except Exception:
                pass  # the connection is gone: nothing was committed either
            raise
        applied.append(migration.version)
        log.info("ledger schema migrated to version {version} ({name})",
                 version=migration.version, name=migration.name)
    newest = known[-1].version if known else 0
    found = current_version(target)
    if found > newest:
        raise LedgerError(f"database schema version {found} is newer than this software "
                          f"(knows up to {newest}); upgrade mpay")
    return applied

"""The ledger a load run checks, on either backend: mpay-admin's options for it, the journal.

A load run funds its payers and audits the books with ``mpay-admin`` (a
process of its own, as an operator would) and looks the journal ids of its
200s up in the journal.  Both go through the ledger's own ``[ledger]``
section and :func:`mpay.ledger.store_opener`, so SQLite and PostgreSQL are
checked alike.
"""

from __future__ import annotations

import configparser
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from mpay.ledger import store_opener
from mpay.ledger.api import MAX_STATEMENT_ROWS

POSTGRES_URL_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(dsn: str) -> bool:
    """Whether *dsn* is a URL (what ``mpay-admin --db`` takes), not ``key=value`` pairs."""
    return dsn.startswith(POSTGRES_URL_SCHEMES)


@dataclass(frozen=True)
class LedgerRef:
    """A ``[ledger]`` config section (backend, sqlite_path, postgres_dsn, postgres_schema);
    *config_path*: the INI file it came from, if any (handed to mpay-admin as it is)."""

    section: Mapping[str, str] = field(default_factory=dict)
    config_path: str | None = None

    @classmethod
    def sqlite(cls, path: str) -> "LedgerRef":
        return cls({"backend": "sqlite", "sqlite_path": path})

    @classmethod
    def postgres(cls, dsn: str, schema: str) -> "LedgerRef":
        return cls({"backend": "postgres", "postgres_dsn": dsn, "postgres_schema": schema})

    @classmethod
    def parse(cls, text: str, schema: str | None = None) -> "LedgerRef":
        """What ``mpay-admin --db`` takes: ``sqlite:PATH`` or a ``postgresql://`` URL (with
        *schema*); a bare path is a SQLite file."""
        if is_postgres_url(text):
            return cls.postgres(text, schema or "public")
        if schema is not None:
            raise ValueError("a schema is for a PostgreSQL ledger only")
        path = text[len("sqlite:"):] if text.startswith("sqlite:") else text
        path = path[2:] if path.startswith("//") else path        # sqlite:///abs -> /abs
        if not path:
            raise ValueError("a SQLite ledger needs a path")
        return cls.sqlite(path)

    @classmethod
    def from_config(cls, path: str) -> "LedgerRef":
        """The ``[ledger]`` section of the server's INI file."""
        parser = configparser.ConfigParser(interpolation=None)
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
        section = dict(parser["ledger"]) if parser.has_section("ledger") else {}
        return cls(section, config_path=path)

    @property
    def backend(self) -> str:
        return self.section.get("backend") or "sqlite"

    def describe(self) -> str:
        if self.backend == "postgres":
            return (f"PostgreSQL {self.section.get('postgres_dsn')}"
                    f" schema {self.section.get('postgres_schema') or 'public'}")
        return f"SQLite {self.section.get('sqlite_path')}"

    def admin_args(self) -> list[str]:
        """The options that point ``mpay-admin`` at this ledger."""
        if self.config_path is not None:
            return ["--config", self.config_path]
        if self.backend == "sqlite":
            return ["--db", f"sqlite:{self.section['sqlite_path']}"]
        dsn = self.section.get("postgres_dsn") or ""
        if not is_postgres_url(dsn):
            raise ValueError("mpay-admin takes a postgresql:// URL (or an INI file), not"
                             f" {dsn!r}")
        return ["--db", dsn, "--schema", self.section.get("postgres_schema") or "public"]

    def missing_from_journal(self, journal_ids: Iterable[int]) -> int:
        """How many of *journal_ids* have no transfer row in the journal.

        Blocking (run it in a thread): reads the journal page by page from the
        lowest id asked for to the highest, through the ledger's own store.
        """
        wanted = set(journal_ids)
        if not wanted:
            return 0
        highest = max(wanted)
        store = store_opener(self.section)(migrate=False)
        found = 0
        try:
            after = min(wanted) - 1
            while after < highest:
                page = store.journal_page(after, MAX_STATEMENT_ROWS)
                if not page:
                    break
                found += sum(1 for entry in page
                             if entry.kind == "transfer" and entry.id in wanted)
                after = page[-1].id
        finally:
            store.close()
        return len(wanted) - found

"""mpay-admin: accounts, top-ups, balances, statements and the audit.

    mpay-admin --db sqlite:var/ledger.sqlite3 create +886912345678
    mpay-admin --db sqlite:var/ledger.sqlite3 topup +886912345678 50000
    mpay-admin --config etc/mpay.ini statement +886912345678 --csv
    mpay-admin --db postgresql://mpay@db/mpay --schema mpay audit

It works on the ledger database directly, through the same synchronous store
the server's writer thread uses, so it may run beside a live server (SQLite
waits for the write lock; PostgreSQL rows are locked as usual).  Amounts are
integers in minor units.  Money enters and leaves through the settlement
account (topup, cashout), with an idempotency key: re-run a command with the
``--key`` it printed and it cannot move the money twice.

Exit status: 0 done, 1 refused (or the audit found a discrepancy), 2 bad
usage, 3 the ledger database cannot be used.
"""

from __future__ import annotations

import argparse
import configparser
import csv
import datetime
import os
import re
import sqlite3
import sys
import uuid
from typing import Callable, Sequence

import psycopg

from mpay.ledger import DEFAULT_SQLITE_PATH, migrate, store_opener
from mpay.ledger.api import (
    SETTLEMENT, InvalidNumber, LedgerError, Outcome, TransferResult, UnknownAccount,
    check_number, validate_amount,
)
from mpay.ledger.store import SQLStore

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
STATEMENT_DEFAULT_ROWS = 50
MAX_AMOUNT_DIGITS = 13

_DIGITS_RE = re.compile(r"[0-9]+")
_DATABASE_ERRORS = (LedgerError, sqlite3.Error, psycopg.Error)


class AdminError(Exception):
    """A failure to report on one line, with the exit status it means."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def parse_number(text: str) -> str:
    """An account number from the command line (one place: swap in mpay.e164 here)."""
    try:
        return check_number(text)
    except InvalidNumber as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_account(text: str) -> str:
    """A number, or the settlement account (for balance and statement)."""
    return SETTLEMENT if text == SETTLEMENT else parse_number(text)


def parse_amount(text: str) -> int:
    """A positive whole number of minor units: "1.50" is refused, not rounded."""
    if not _DIGITS_RE.fullmatch(text) or len(text) > MAX_AMOUNT_DIGITS:
        raise argparse.ArgumentTypeError(f"amount must be a whole number of minor units: {text!r}")
    reason = validate_amount(int(text))
    if reason:
        raise argparse.ArgumentTypeError(reason)
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpay-admin", description=__doc__.split("\n\n")[0],
                                     epilog="Exit status: 0 done, 1 refused or audit failed,"
                                            " 2 bad usage, 3 database unavailable.")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--db", metavar="URL",
                       help="sqlite:PATH or postgresql://USER@HOST/DBNAME")
    where.add_argument("--config", metavar="PATH", help="an INI file with a [ledger] section")
    parser.add_argument("--schema", help="PostgreSQL schema (with --db postgresql://...)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help)

    command("create", "open an account").add_argument("number", type=parse_number)
    for name, help in (("topup", "cash in: settlement -> account"),
                       ("cashout", "cash out: account -> settlement")):
        sub = command(name, help)
        sub.add_argument("number", type=parse_number)
        sub.add_argument("amount", type=parse_amount, help="minor units")
        sub.add_argument("--key", help="idempotency key (default: a new one, printed)")
        sub.add_argument("--reference", default="", help="free text kept in the journal")
    command("block", "refuse payments from and to an account").add_argument(
        "number", type=parse_number)
    command("unblock", "allow payments again").add_argument("number", type=parse_number)
    command("balance", "show balance, held and available").add_argument(
        "number", type=parse_account)
    sub = command("statement", "the newest movements of an account")
    sub.add_argument("number", type=parse_account)
    sub.add_argument("--limit", type=int, default=STATEMENT_DEFAULT_ROWS)
    sub.add_argument("--csv", action="store_true", help="CSV on stdout, with a header")
    command("audit", "prove that the books balance (exit 1 if not)")
    return parser


def opener_from(args: argparse.Namespace) -> tuple[Callable[..., SQLStore], str | None]:
    """The store the options name, and the SQLite file it needs to exist (if any)."""
    if args.config is not None:
        if args.schema is not None:
            raise AdminError("--schema goes with --db; put postgres_schema in the config",
                             EXIT_USAGE)
        parser = configparser.ConfigParser(interpolation=None)
        try:
            with open(args.config, encoding="utf-8") as handle:
                parser.read_file(handle)
        except (OSError, configparser.Error) as exc:
            raise AdminError(f"cannot read {args.config}: {exc}", EXIT_USAGE) from None
        section = dict(parser["ledger"]) if parser.has_section("ledger") else {}
        try:
            opener = store_opener(section)
        except LedgerError as exc:
            raise AdminError(f"{args.config}: {exc}", EXIT_USAGE) from None
        if (section.get("backend") or "sqlite") != "sqlite":
            return opener, None
        return opener, section.get("sqlite_path") or DEFAULT_SQLITE_PATH
    url = args.db
    if url.startswith("sqlite:"):
        if args.schema is not None:
            raise AdminError("--schema is for PostgreSQL only", EXIT_USAGE)
        path = url[len("sqlite:"):]
        path = path[2:] if path.startswith("//") else path  # sqlite:///abs -> /abs
        if not path:
            raise AdminError("--db sqlite:PATH needs a path", EXIT_USAGE)
        return store_opener({"backend": "sqlite", "sqlite_path": path}), path
    if url.startswith(("postgresql://", "postgres://")):
        return store_opener({"backend": "postgres", "postgres_dsn": url,
                             "postgres_schema": args.schema or ""}), None
    raise AdminError(f"--db must be sqlite:PATH or postgresql://..., not {url!r}", EXIT_USAGE)


def open_store(args: argparse.Namespace) -> SQLStore:
    """Open the ledger; only ``create`` may bring a new database into being."""
    opener, sqlite_path = opener_from(args)
    creating = args.command == "create"
    if sqlite_path is not None and not creating and not os.path.exists(sqlite_path):
        raise AdminError(f"no ledger database at {sqlite_path} (create an account first, or"
                         " start the server)", EXIT_UNAVAILABLE)
    store = opener(migrate=creating)
    found = migrate.applied_version(store)
    wanted = migrate.latest_version(store.dialect)
    if found != wanted:
        store.close()
        problem = "holds no ledger" if found == 0 else f"is at schema version {found}, not {wanted}"
        raise AdminError(f"the database {problem} (start the server to migrate it)",
                         EXIT_UNAVAILABLE)
    return store


def describe(result: TransferResult, key: str) -> tuple[str, int]:
    if result.outcome is Outcome.COMMITTED:
        return (f"committed: journal {result.journal_id}, {result.amount} from {result.payer}"
                f" to {result.payee} (key {key})", EXIT_OK)
    if result.outcome is Outcome.DUPLICATE:
        return (f"already done by journal {result.journal_id}: {result.amount} from"
                f" {result.payer} to {result.payee} (key {key} was used before)", EXIT_OK)
    return f"refused ({result.outcome.value}): {result.detail}", EXIT_REFUSED


def iso(created: float) -> str:
    return datetime.datetime.fromtimestamp(created, datetime.timezone.utc).isoformat(
        timespec="seconds")


def run(store: SQLStore, args: argparse.Namespace, out) -> int:
    """Carry out one command; return the exit status."""
    if args.command == "create":
        created = store.open_account(args.number)
        print(f"{'created' if created else 'already exists:'} {args.number}", file=out)
        return EXIT_OK
    if args.command in ("topup", "cashout"):
        key = args.key or f"admin|{uuid.uuid4()}"
        move = store.cash_in if args.command == "topup" else store.cash_out
        message, status = describe(move(args.number, args.amount, key, args.reference), key)
        print(message, file=out)
        if status == EXIT_OK:
            print(f"balance of {args.number}: {store.balance(args.number).balance}", file=out)
        return status
    if args.command in ("block", "unblock"):
        (store.block if args.command == "block" else store.unblock)(args.number)
        print(f"{args.command}ed {args.number}", file=out)
        return EXIT_OK
    if args.command == "balance":
        b = store.balance(args.number)
        print(f"{args.number} balance={b.balance} held={b.held} available={b.available}"
              f" status={b.status}", file=out)
        return EXIT_OK
    if args.command == "statement":
        return print_statement(store, args.number, args.limit, args.csv, out)
    if args.command == "audit":
        report = store.audit()
        print(report.format(), file=out)
        return EXIT_OK if report.ok else EXIT_REFUSED
    raise AssertionError(args.command)


def print_statement(store: SQLStore, number: str, limit: int, as_csv: bool, out) -> int:
    """Newest first; a debit is negative, ``balance_after`` is this account's."""
    entries = store.statement(number, limit)
    header = ["journal_id", "created_utc", "kind", "counterparty", "amount", "balance_after",
              "reference", "idempotency_key"]
    rows = []
    for e in entries:
        outgoing = e.debit == number
        rows.append([e.id, iso(e.created), e.kind, e.credit if outgoing else e.debit,
                     -e.amount if outgoing else e.amount,
                     e.debit_balance_after if outgoing else e.credit_balance_after,
                     e.reference, e.idempotency_key])
    if as_csv:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return EXIT_OK
    print(f"statement of {number}, newest first (movements: {len(rows)})", file=out)
    for row in rows:
        print(f"{row[0]:>8} {row[1]} {row[2]:<8} {row[3]:<16} {row[4]:>14} {row[5]:>14}"
              f" {row[6]}", file=out)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """The ``mpay-admin`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # argparse has printed the usage and the reason
        return int(exit.code or 0)
    try:
        store = open_store(args)
        try:
            return run(store, args, sys.stdout)
        finally:
            store.close()
    except AdminError as exc:
        print(f"mpay-admin: {exc}", file=sys.stderr)
        return exc.status
    except UnknownAccount as exc:
        print(f"mpay-admin: no account {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except (InvalidNumber, ValueError) as exc:
        print(f"mpay-admin: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except _DATABASE_ERRORS as exc:
        print(f"mpay-admin: the ledger database failed: {str(exc).strip()}", file=sys.stderr)
        return EXIT_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())

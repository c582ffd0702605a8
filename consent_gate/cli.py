"""consent-gate: administration commands (database, ledger queries, prompts)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import asyncpg

from consent_gate.config import add_settings_arguments, dsn_for_command
from consent_gate.ledger.journal import Journal
from consent_gate.ledger.store import SQL_DIR, Ledger, MigrationError, migrate
from consent_gate.log import configure_logging
from consent_gate.prompts import build as prompts


async def _history(dsn: str, call_id: str | None, consent_id: str | None) -> list[dict[str, Any]]:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await connection.fetch(
            """SELECT occurred_at, event, consent_id, call_id, purpose, legal_basis, language, digit,
                      left(prompt_version, 12) AS prompt_version, recording_id, via_journal, source
                 FROM consent_events
                WHERE ($1::text IS NULL OR call_id = $1) AND ($2::uuid IS NULL OR consent_id = $2)
                ORDER BY occurred_at, seq""",
            call_id, consent_id,
        )
    finally:
        await connection.close()
    return [dict(row) for row in rows]


def _print_rows(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, default=str, indent=2))
        return
    if not rows:
        print("(no consent events)")
        return
    columns = list(rows[0])
    text_rows = [["" if row[c] is None else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in text_rows)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in text_rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def _optional_module(name: str) -> Any:
    """Subcommand modules whose extra dependencies (numpy for the anonymiser) may be absent."""
    import importlib

    try:
        return importlib.import_module(f"consent_gate.admin.{name}")
    except ModuleNotFoundError as error:
        if error.name and error.name.startswith("consent_gate"):
            return None
        print(f"consent-gate: {name} commands unavailable ({error.name} not installed)", file=sys.stderr)
        return None


def _journal(args: argparse.Namespace) -> int:
    journal = Journal(args.dir)
    if args.journal_command == "show":
        events = journal.pending()
        _print_rows([{"occurred_at": e.occurred_at, "event": str(e.event), "consent_id": e.consent_id,
                      "call_id": e.call_id, "purpose": e.purpose, "digit": e.digit} for e in events], False)
    elif args.journal_command == "requeue":
        print(f"requeued {journal.requeue_quarantine()} quarantined line(s) into {journal.path}")
    else:
        async def replay() -> int:
            ledger = Ledger(dsn_for_command(args), journal)
            try:
                return await ledger.replay_journal()
            finally:
                await ledger.close()

        print(f"replayed {asyncio.run(replay())} event(s)")
        if backlog := journal.backlog():
            print(f"consent-gate: {backlog} event(s) still pending (another process may be replaying "
                  "them right now)", file=sys.stderr)
    quarantined = journal.quarantined_lines()
    if quarantined:
        print(f"consent-gate: {quarantined} line(s) in quarantine: {journal.quarantine_path} "
              f"(why: {journal.reasons_path}); fix the cause, then "
              f"`consent-gate journal requeue --dir {args.dir}`", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="consent-gate", description="consent-gate administration")
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="ledger database")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    mig = db_sub.add_parser("migrate", help=f"apply the SQL migrations in {SQL_DIR}")
    add_settings_arguments(mig)

    hist = sub.add_parser("history", help="consent history of a call or a decision")
    add_settings_arguments(hist)
    who = hist.add_mutually_exclusive_group()
    who.add_argument("--call", help="call id (the Asterisk channel id)")
    who.add_argument("--consent-id", help="decision id (CONSENT_ID)")
    hist.add_argument("--json", action="store_true", help="JSON instead of a table")

    journal = sub.add_parser("journal", help="the local journal of decisions the database could not take")
    journal_sub = journal.add_subparsers(dest="journal_command", required=True)
    for name, help_text in (("show", "list journaled events not yet in the database"),
                            ("replay", "move journaled events into the database (idempotent)"),
                            ("requeue", "move quarantined lines back into the journal, once fixed")):
        cmd = journal_sub.add_parser(name, help=help_text)
        cmd.add_argument("--dir", required=True, type=Path, help="journal directory (ledger.journal_dir)")
        add_settings_arguments(cmd)

    prompts.register_cli(sub)
    # Retention, legal hold, data-subject requests, the subject API and training copies each
    # bring their own subcommands (they set args.func).
    for module_name in ("retention", "subject", "api", "anonymise", "training"):
        module = _optional_module(module_name)
        if module is not None and hasattr(module, "register_cli"):
            module.register_cli(sub)
    args = parser.parse_args(argv)
    # Logs on stderr (stdout is the command's answer), readable at a terminal.
    configure_logging("console" if sys.stderr.isatty() else "json")
    match args.command:
        case "db":
            try:
                applied = asyncio.run(migrate(dsn_for_command(args)))
            except (MigrationError, FileNotFoundError) as error:
                print(f"consent-gate db migrate: {error}", file=sys.stderr)
                return 2
            print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
            return 0
        case "journal":
            return _journal(args)
        case "history":
            rows = asyncio.run(_history(dsn_for_command(args), args.call, args.consent_id))
            _print_rows(rows, args.json)
            return 0
        case _:
            return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

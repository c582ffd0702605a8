"""consent-gate stack, the "migrate" job (run by the service image's entrypoint as asterisk).

Connects to the stack's PostgreSQL as its superuser (password from $PGPASSFILE, a copy of the
Docker secret pg-admin-password) and, idempotently:
  1. creates the database consent_gate if it does not exist;
  2. applies the migrations: consent_gate.ledger.store.migrate, as `consent-gate db migrate`
     does (a ledger newer than this wheel is refused: exit status 2, nothing changed);
  3. applies roles.sql (the least-privilege groups) and creates or updates the login role
     "asterisk" in consent_gate_gate (INSERT only), with the password of pg-gate-password.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import asyncpg

from consent_gate.ledger.store import SQL_DIR, migrate

PORT = int(os.environ.get("CONSENT_GATE_PG_PORT", "5432"))


def dsn(database: str) -> str:
    return f"postgresql://postgres@127.0.0.1:{PORT}/{database}"


async def connect(database: str, timeout: float = 60.0) -> asyncpg.Connection:
    """The server may still be starting (compose waits for its health check, but be kind)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await asyncpg.connect(dsn(database))
        except (OSError, asyncpg.CannotConnectNowError) as error:
            if asyncio.get_running_loop().time() > deadline:
                raise SystemExit(f"stack-init: PostgreSQL on 127.0.0.1:{PORT} not reachable: {error}") from None
            await asyncio.sleep(1)


async def main() -> int:
    gate_password = Path(os.environ["CONSENT_GATE_GATE_PASSWORD_FILE"]).read_text().strip()
    server = await connect("postgres")
    try:
        if not await server.fetchval("SELECT 1 FROM pg_database WHERE datname = 'consent_gate'"):
            await server.execute("CREATE DATABASE consent_gate")
            print("stack-init: created database consent_gate", flush=True)
    finally:
        await server.close()
    try:
        await migrate(dsn("consent_gate"))
    except Exception as error:  # noqa: BLE001 - reported, then a failing exit status
        print(f"stack-init: migrate failed: {error}", file=sys.stderr)
        return 2
    print("stack-init: migrations applied", flush=True)
    ledger = await connect("consent_gate")
    try:
        await ledger.execute((Path(SQL_DIR) / "roles" / "roles.sql").read_text())
        exists = await ledger.fetchval("SELECT 1 FROM pg_roles WHERE rolname = 'asterisk'")
        verb = "ALTER" if exists else "CREATE"
        # A password is no identifier: quote it as a literal (the server hashes it, scram-sha-256).
        literal = await ledger.fetchval("SELECT quote_literal($1::text)", gate_password)
        await ledger.execute(f"{verb} ROLE asterisk LOGIN PASSWORD {literal}")
        await ledger.execute("GRANT consent_gate_gate TO asterisk")
    finally:
        await ledger.close()
    print("stack-init: roles applied; asterisk may INSERT decisions (consent_gate_gate)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

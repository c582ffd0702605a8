"""sql/roles/roles.sql on a real PostgreSQL: the gate's role can only add decisions, the tools'
role can do retention and subject requests, and neither can switch the append-only triggers off."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from consent_gate import subject
from consent_gate.rig.pgsandbox import PgSandbox
from consent_gate.subject import SubjectQuery

from .test_retention import (  # noqa: F401  (fixtures)
    DAY,
    HMAC_KEY,
    PURPOSES,
    T0,
    Clock,
    add_decision,
    admin_dsn,
    db,
    recdir,
    retention_template,
    write_recording,
)

ROLES_SQL = Path(__file__).resolve().parents[2] / "sql" / "roles" / "roles.sql"


@pytest_asyncio.fixture
async def as_role(pg_sandbox: PgSandbox, db: str) -> AsyncIterator:
    """Apply roles.sql to this test's database (as the superuser, twice: it must be rerunnable)
    and hand out connections as login members of each group role."""
    database = db.rsplit("/", 1)[1]
    members = {group: f"cg_{group.removeprefix('consent_gate_')}_{uuid.uuid4().hex[:8]}"
               for group in ("consent_gate_gate", "consent_gate_admin")}
    superuser = await asyncpg.connect(admin_dsn(pg_sandbox, database), timeout=10)
    opened: list[asyncpg.Connection] = []
    try:
        for _ in range(2):
            await superuser.execute(ROLES_SQL.read_text())
        for group, member in members.items():
            await superuser.execute(f"CREATE ROLE {member} LOGIN IN ROLE {group}")

        async def connect(group: str) -> asyncpg.Connection:
            connection = await asyncpg.connect(
                f"postgresql://{members[group]}@127.0.0.1:{pg_sandbox.port}/{database}", timeout=10)
            opened.append(connection)
            return connection

        yield connect
    finally:
        for connection in opened:
            await connection.close()
        for member in members.values():
            await superuser.execute(f"DROP OWNED BY {member}")
            await superuser.execute(f"DROP ROLE {member}")
        await superuser.close()


async def test_the_gate_role_only_adds_decisions(as_role) -> None:
    gate = await as_role("consent_gate_gate")
    decision = await add_decision(gate, at=T0)  # the ledger's own INSERT ... ON CONFLICT DO NOTHING
    for statement in ("SELECT caller_ref FROM consent_events",
                      "SELECT * FROM consent_decisions",
                      "UPDATE consent_events SET caller_ref = NULL",
                      "DELETE FROM consent_events",
                      "SELECT * FROM data_erasures",
                      "INSERT INTO legal_holds (hold_id, action, call_id, reason, actor, at)"
                      " VALUES (gen_random_uuid(), 'place', 'x', 'r', 'a', now())"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await gate.execute(statement)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):  # "must be owner of table"
        await gate.execute("ALTER TABLE consent_events DISABLE TRIGGER ALL")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await gate.fetchval("SELECT consent_redact($1, now())", uuid.uuid4())
    assert decision.recording_id


async def test_the_admin_role_erases_through_the_audited_path_only(as_role, recdir: Path) -> None:
    gate = await as_role("consent_gate_gate")
    d = await add_decision(gate, at=T0, number="+45 11 22 33 44")
    [path] = write_recording(recdir, d.recording_id)
    tools = await as_role("consent_gate_admin")
    result = await subject.erase(tools, HMAC_KEY, recdir, PURPOSES, SubjectQuery(consent_id=str(d.consent_id)),
                                 reason="test", actor="dpo", clock=Clock(T0 + DAY))
    assert result.status == "erased" and not path.exists()
    assert await tools.fetchval("SELECT caller_ref FROM consent_events WHERE consent_id = $1", d.consent_id) is None
    # Still no way around the triggers: no direct UPDATE of the ledger, no DELETE, no ALTER.
    for statement in ("UPDATE consent_events SET digit = '9'", "DELETE FROM consent_events",
                      "ALTER TABLE consent_events DISABLE TRIGGER ALL", "DELETE FROM data_erasures"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await tools.execute(statement)

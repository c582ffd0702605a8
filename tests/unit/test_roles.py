"""sql/roles/roles.sql on a real PostgreSQL: the gate's role can only add decisions, the tools'
role can do retention and subject requests, and neither can switch the append-only triggers off."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from consent_gate.admin import subject
from consent_gate.admin.subject import SubjectQuery
from consent_gate.ledger.store import SQL_DIR
from consent_gate_rig.ledgerdata import DAY, HMAC_KEY, PURPOSES, T0, Clock, add_decision, write_recording
from consent_gate_rig.pgsandbox import PgSandbox

ROLES_SQL = SQL_DIR / "roles" / "roles.sql"


@pytest_asyncio.fixture
async def as_role(pg_sandbox: PgSandbox, db: str) -> AsyncIterator:
    """Apply roles.sql to this test's database (as the superuser, twice: it must be rerunnable)
    and hand out connections as login members of each group role."""
    database = db.rsplit("/", 1)[1]
    members = {group: f"cg_{group.removeprefix('consent_gate_')}_{uuid.uuid4().hex[:8]}"
               for group in ("consent_gate_gate", "consent_gate_admin")}
    superuser = await asyncpg.connect(pg_sandbox.admin_dsn(database), timeout=10)
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


async def test_the_roles_cannot_create_temporary_tables(as_role) -> None:
    """roles.sql revokes TEMPORARY from PUBLIC: the classic way to shadow a table is closed."""
    for group in ("consent_gate_gate", "consent_gate_admin"):
        connection = await as_role(group)
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="temporary"):
            await connection.execute("CREATE TEMP TABLE data_erasures (erasure_id uuid)")


async def _tools_with_temp(as_role, pg_sandbox: PgSandbox, db: str) -> asyncpg.Connection:
    """A tools connection on a database where TEMPORARY was granted back (an older roles.sql, or
    an admin who granted it): the functions themselves must not be fooled."""
    tools = await as_role("consent_gate_admin")
    member = await tools.fetchval("SELECT current_user")
    database = db.rsplit("/", 1)[1]
    superuser = await asyncpg.connect(pg_sandbox.admin_dsn(database), timeout=10)
    try:
        await superuser.execute(f'GRANT TEMPORARY ON DATABASE "{database}" TO "{member}"')
    finally:
        await superuser.close()
    return tools


async def test_a_temporary_data_erasures_cannot_stand_in_for_a_tombstone(
    as_role, pg_sandbox: PgSandbox, db: str,
) -> None:
    gate = await as_role("consent_gate_gate")
    victim = await add_decision(gate, at=T0, number="+45 55 66 77 88")
    tools = await _tools_with_temp(as_role, pg_sandbox, db)
    # A fake tombstone for somebody else's decision, in a table that shadows the real log.
    await tools.execute("CREATE TEMP TABLE data_erasures (LIKE public.data_erasures INCLUDING DEFAULTS)")
    fake = uuid.uuid4()
    await tools.execute(
        "INSERT INTO pg_temp.data_erasures (erasure_id, kind, scope, consent_id, purpose, reason, actor, performed_at)"
        " VALUES ($1, 'erasure', 'record', $2, $3, 'no audit', 'attacker', now())",
        fake, victim.consent_id, victim.purpose)
    await tools.execute("GRANT ALL ON pg_temp.data_erasures TO PUBLIC")  # so the definer can read it
    with pytest.raises(asyncpg.RaiseError, match="no erasure tombstone"):
        await tools.fetchval("SELECT consent_redact($1, now())", fake)
    assert await tools.fetchval("SELECT caller_ref FROM public.consent_events WHERE consent_id = $1",
                                victim.consent_id) == victim.caller_ref


async def test_a_temporary_consent_events_cannot_absorb_a_redaction(
    as_role, pg_sandbox: PgSandbox, db: str,
) -> None:
    gate = await as_role("consent_gate_gate")
    d = await add_decision(gate, at=T0, number="+45 55 66 77 99")
    tools = await _tools_with_temp(as_role, pg_sandbox, db)
    # A decoy ledger: a redaction that lands here would leave the real rows as they were.
    await tools.execute("CREATE TEMP TABLE consent_events (LIKE public.consent_events INCLUDING DEFAULTS)")
    await tools.execute("GRANT ALL ON pg_temp.consent_events TO PUBLIC")  # so the definer can write it
    erasure_id = uuid.uuid4()
    await tools.execute(
        "INSERT INTO public.data_erasures (erasure_id, kind, scope, consent_id, purpose, legal_basis, reason,"
        " actor, performed_at) VALUES ($1, 'erasure', 'record', $2, $3, 'consent', 'test', 'dpo', now())",
        erasure_id, d.consent_id, d.purpose)
    assert await tools.fetchval("SELECT consent_redact($1, now())", erasure_id) == 1
    assert await tools.fetchval("SELECT caller_ref FROM public.consent_events WHERE consent_id = $1",
                                d.consent_id) is None


def test_roles_sql_runs_through_psql_as_documented(pg_sandbox: PgSandbox, db: str) -> None:
    """The file's own instructions: psql -v ON_ERROR_STOP=1 -f sql/roles/roles.sql (twice)."""
    psql = shutil.which("psql")
    assert psql, "psql is not installed"
    for _ in range(2):
        done = subprocess.run(
            [psql, "-X", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(pg_sandbox.port), "-U", "postgres",
             "-d", db.rsplit("/", 1)[1], "-f", str(ROLES_SQL)],
            capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr

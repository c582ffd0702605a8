"""Unit-test fixtures shared by several test modules (the PostgreSQL cluster is tests/conftest.py's)."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from consent_gate.ledger.journal import Journal
from consent_gate.ledger.store import Ledger, migrate
from consent_gate_rig.fakes import ScriptedAmi, ScriptedAriInfo
from consent_gate_rig.pgsandbox import PgSandbox


@pytest.fixture
async def ledger(pg_dsn: str, tmp_path: Path) -> AsyncIterator[Ledger]:
    """A real Ledger on the test PostgreSQL, with its own journal directory."""
    ledger = Ledger(pg_dsn, Journal(tmp_path / "journal"), write_timeout=5.0)
    try:
        yield ledger
    finally:
        await ledger.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def retention_template(pg_sandbox: PgSandbox) -> str:
    """A migrated database used only as a template (no connections stay open to it)."""
    name = f"cg_h6tpl_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_sandbox.admin_dsn(), timeout=10)
    try:
        await admin.execute(f"CREATE DATABASE {name} OWNER {pg_sandbox.user}")
    finally:
        await admin.close()
    await migrate(f"postgresql://{pg_sandbox.user}@127.0.0.1:{pg_sandbox.port}/{name}")
    return name


@pytest_asyncio.fixture
async def db(pg_sandbox: PgSandbox, retention_template: str) -> AsyncIterator[str]:
    """DSN of a fresh, migrated database of this test's own (application role)."""
    dsn = await pg_sandbox.new_database("cg_h6", template=retention_template)
    yield dsn
    name = dsn.rsplit("/", 1)[1]
    admin = await asyncpg.connect(pg_sandbox.admin_dsn(), timeout=10)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest_asyncio.fixture
async def conn(db: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(db, timeout=10)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
def restore_logging() -> Any:
    """The CLI configures structlog for stderr (pytest's capture there): put it back afterwards."""
    import structlog

    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture
def recdir(tmp_path: Path) -> Path:
    directory = tmp_path / "recordings"
    directory.mkdir(mode=0o700)
    return directory


# -- the ARI service checked as a subprocess (--check-config, start-up) ------------------------

SERVICE_SECRETS = {"CONSENT_GATE_HMAC_KEY": "private-dir-hmac-key-0123456789", "CONSENT_GATE_ARI_PASSWORD": "ari-pw-1"}


@pytest.fixture
def private(tmp_path: Path) -> Path:
    """A recordings directory as the service wants it: 0700, ours."""
    directory = tmp_path / "recordings"
    directory.mkdir(mode=0o700)
    return directory


def _serve_in_thread(server: ScriptedAmi | ScriptedAriInfo) -> Iterator[None]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def ami() -> Iterator[ScriptedAmi]:
    server = ScriptedAmi("right-ami-secret")
    for _ in _serve_in_thread(server):
        yield server


@pytest.fixture
def ari_info() -> Iterator[ScriptedAriInfo]:
    """ARI's /asterisk/info for --check-config (the node's Asterisk systemname: "pbx-a")."""
    server = ScriptedAriInfo("consent-gate", SERVICE_SECRETS["CONSENT_GATE_ARI_PASSWORD"], "pbx-a")
    for _ in _serve_in_thread(server):
        yield server


@pytest.fixture
def service_env(tmp_path: Path, private: Path, ami: ScriptedAmi, ari_info: ScriptedAriInfo, db: str) -> dict[str, str]:
    """The environment of a consent-gate-ari process whose every dependency answers: its own
    migrated ledger (--check-config compares the node with it), a scripted AMI and ARI."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONSENT_GATE_")}
    env.update(SERVICE_SECRETS, CONSENT_GATE_DSN=db, CONSENT_GATE_RECORDINGS_DIR=str(private),
               CONSENT_GATE_RECORDINGS_OWNER=str(os.geteuid()), CONSENT_GATE_JOURNAL_DIR=str(tmp_path / "journal"),
               CONSENT_GATE_AMI_HOST="127.0.0.1", CONSENT_GATE_AMI_PORT=str(ami.server_address[1]),
               CONSENT_GATE_AMI_USER="cg-check", CONSENT_GATE_AMI_SECRET="right-ami-secret",
               CONSENT_GATE_ARI_URL=ari_info.url, CONSENT_GATE_ARI_USER="consent-gate")
    return env


"""Shared fixtures: one throwaway PostgreSQL 15 cluster for the whole session.

Tests isolate themselves by unique call/consent ids (the ledger table is append-only, so
nothing is ever truncated); a test that needs an untouched schema creates its own database.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from consent_gate.ledger.store import migrate
from consent_gate_rig.pgsandbox import PgSandbox

# Override to run two test sessions side by side on one host.
PG_TEST_PORT = int(os.environ.get("CONSENT_GATE_TEST_PG_PORT", "25532"))


@pytest.fixture(scope="session")
def pg_sandbox() -> Iterator[PgSandbox]:
    """The running cluster.  A test that stops it must start it again before it ends."""
    # Not tmp_path_factory: its directories are 0700 root, and the server runs as 'postgres'.
    base = Path(tempfile.mkdtemp(prefix="consent-gate-pg-"))
    sandbox = PgSandbox(base, port=PG_TEST_PORT)
    try:
        sandbox.start()
        yield sandbox
    finally:
        sandbox.destroy()
        shutil.rmtree(base, ignore_errors=True)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def pg_dsn(pg_sandbox: PgSandbox) -> AsyncIterator[str]:
    """DSN of the migrated consent_gate database (as the application role)."""
    await migrate(pg_sandbox.dsn)
    yield pg_sandbox.dsn

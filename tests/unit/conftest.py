"""Unit-test fixtures shared by several test modules (the PostgreSQL cluster is tests/conftest.py's)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from consent_gate.journal import Journal
from consent_gate.ledger import Ledger


@pytest.fixture
async def ledger(pg_dsn: str, tmp_path: Path) -> AsyncIterator[Ledger]:
    """A real Ledger on the test PostgreSQL, with its own journal directory."""
    ledger = Ledger(pg_dsn, Journal(tmp_path / "journal"), write_timeout=5.0)
    try:
        yield ledger
    finally:
        await ledger.close()

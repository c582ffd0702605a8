"""The ledger follows the primary of a multi-host DSN (issue 15), against a real PostgreSQL
primary + synchronous standby (consent_gate_rig.pgsandbox.PgCluster, on the test port + 7/+ 8).

The hard case is a primary that goes *silent* (SIGSTOP: a lost host or a partition, no
connection reset): its pooled connections hang instead of failing, and a connect that tries the
hosts one after the other spends its whole timeout on it.  Writes must reach the promoted
standby all the same, the acknowledged ones are there, and the journal replays into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from consent_gate.core.events import EventKind
from consent_gate.ledger.journal import Journal
from consent_gate.ledger.store import Durability, Ledger, host_dsns, migrate
from consent_gate_rig.calls import wait_until
from consent_gate_rig.ledgerdata import make_event, unique_call
from consent_gate_rig.pgsandbox import PgCluster, child_pids

BASE_PORT = int(os.environ.get("CONSENT_GATE_TEST_PG_PORT", "25532"))


def test_host_dsns_splits_a_multi_host_url_and_keeps_the_rest() -> None:
    assert host_dsns("postgresql://u@h1:5432,h2:5433/db?target_session_attrs=read-write") == [
        "postgresql://u@h1:5432/db?target_session_attrs=read-write",
        "postgresql://u@h2:5433/db?target_session_attrs=read-write",
    ]
    assert host_dsns("postgresql:///consent_gate?host=/run/postgresql") == [
        "postgresql:///consent_gate?host=/run/postgresql"]
    assert host_dsns("postgresql://a,b/db") == ["postgresql://a/db", "postgresql://b/db"]


@pytest.fixture
def cluster() -> Iterator[PgCluster]:
    base = Path(tempfile.mkdtemp(prefix="consent-gate-pgfo-"))
    base.chmod(0o711)
    pg = PgCluster(base, BASE_PORT + 7, BASE_PORT + 8)
    try:
        pg.start()
        yield pg
    finally:
        pg.destroy()
        shutil.rmtree(base, ignore_errors=True)


async def stored(dsn: str, call_ids: list[str]) -> set[str]:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await connection.fetch("SELECT call_id FROM consent_events WHERE call_id = ANY($1::text[])", call_ids)
    finally:
        await connection.close()
    return {row["call_id"] for row in rows}


async def test_a_silent_primary_does_not_wedge_the_ledger_after_the_standby_is_promoted(
    cluster: PgCluster, tmp_path: Path,
) -> None:
    await migrate(cluster.dsn)
    ledger = Ledger(cluster.dsn, Journal(tmp_path / "journal"), write_timeout=2.0, replay_interval=0.5)
    await ledger.start()
    pid = cluster.primary.postmaster_pid()
    assert pid is not None
    frozen = [pid, *child_pids(pid)]
    try:
        before = unique_call()
        assert await ledger.append(make_event(before)) is Durability.DATABASE  # acknowledged by both
        for victim in frozen:
            os.kill(victim, signal.SIGSTOP)
        cluster.promote()
        during = unique_call()
        outcomes = [await ledger.append(make_event(during, EventKind.DECLINED))]
        after = unique_call()
        # Bounded: each append is bounded by write_timeout; the ledger must reach the new primary.
        for _ in range(10):
            outcomes.append(await ledger.append(make_event(after, EventKind.DECLINED)))
            if outcomes[-1] is Durability.DATABASE:
                break
        assert outcomes[-1] is Durability.DATABASE, f"never reached the promoted standby: {outcomes}"
        await wait_until(lambda: ledger.journal.backlog() == 0, 30, "the journal to replay into the new primary")
        # Read from the promoted standby by its own address (a plain connect would hang on the frozen primary).
        new_primary = host_dsns(cluster.dsn)[1]
        assert await stored(new_primary, [before, during, after]) == {before, during, after}
        assert not cluster.is_in_recovery(cluster.standby)
    finally:
        for victim in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        await asyncio.wait_for(ledger.close(), 30)

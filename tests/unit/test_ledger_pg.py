"""The ledger on a real PostgreSQL: append-only in the database, idempotent replay, journal fallback."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from consent_gate.core.events import EventKind
from consent_gate.ledger.journal import Journal
from consent_gate.ledger.store import SQL_DIR as _SQL_DIR
from consent_gate.ledger.store import Durability, Ledger, MigrationError, migrate
from consent_gate_rig.ledgerdata import make_event, unique_call
from consent_gate_rig.pgsandbox import PgSandbox

ALL_MIGRATIONS = sorted(p.name for p in _SQL_DIR.glob("[0-9][0-9][0-9]_*.sql"))

T = 20.0  # upper bound for any wait on the background replayer; never slept


def app_dsn(sandbox: PgSandbox, database: str) -> str:
    return f"postgresql://{sandbox.user}@127.0.0.1:{sandbox.port}/{database}"


async def fresh_database(sandbox: PgSandbox) -> str:
    return await sandbox.new_database()


async def rows_for(dsn: str, call_id: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        return await connection.fetch("SELECT * FROM consent_events WHERE call_id = $1 ORDER BY seq", call_id)
    finally:
        await connection.close()


async def test_append_stores_in_the_database(ledger: Ledger, pg_dsn: str) -> None:
    call = unique_call()
    event = make_event(call, detail={"attempts": 2, "invalid_keys": ["7"]})
    assert await ledger.append(event) is Durability.DATABASE
    assert not ledger.degraded
    [row] = await rows_for(pg_dsn, call)
    assert row["event_id"] == event.event_id and row["consent_id"] == event.consent_id
    assert row["event"] == "granted" and row["digit"] == "1" and row["language"] == "da"
    assert row["prompt_version"] == event.prompt_version and row["recording_id"] == event.recording_id
    assert row["prompt_started_at"] == event.prompt_started_at and row["decided_at"] == event.decided_at
    assert row["via_journal"] is False
    assert json.loads(row["detail"]) == {"attempts": 2, "invalid_keys": ["7"]}
    assert ledger.journal.pending() == []

    history = await ledger.history(consent_id=str(event.consent_id))
    assert [h["event_id"] for h in history] == [event.event_id]
    assert [h["event_id"] for h in await ledger.history(call_id=call)] == [event.event_id]


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE consent_events SET digit = '2' WHERE call_id = $1",
        "UPDATE consent_events SET recording_id = NULL WHERE call_id = $1",
        "DELETE FROM consent_events WHERE call_id = $1",
        "TRUNCATE consent_events",
    ],
)
@pytest.mark.parametrize("role", ["application", "superuser"])
async def test_the_database_rejects_changes(
    ledger: Ledger, pg_dsn: str, pg_sandbox: PgSandbox, statement: str, role: str
) -> None:
    call = unique_call()
    event = make_event(call)
    assert await ledger.append(event) is Durability.DATABASE
    dsn = pg_dsn if role == "application" else pg_sandbox.admin_dsn(pg_sandbox.database)
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        args = (call,) if "$1" in statement else ()
        with pytest.raises(asyncpg.PostgresError, match="append-only"):
            await connection.execute(statement, *args)
    finally:
        await connection.close()
    [row] = await rows_for(pg_dsn, call)
    assert row["digit"] == "1" and row["recording_id"] == event.recording_id


async def test_duplicate_event_id_is_stored_once(ledger: Ledger, pg_dsn: str) -> None:
    call = unique_call()
    event = make_event(call)
    assert await ledger.append(event) is Durability.DATABASE
    assert await ledger.append(event) is Durability.DATABASE
    # A journal replay of an event the database already has is harmless too.
    ledger.journal.append(event)
    assert await ledger.replay_journal() == 1
    rows = await rows_for(pg_dsn, call)
    assert len(rows) == 1 and rows[0]["via_journal"] is False


async def test_database_constraints_hold(pg_dsn: str) -> None:
    """The schema refuses values the application must never write (checked directly, not via append)."""
    call = unique_call()
    base: dict[str, Any] = dict(consent_id=uuid.uuid4(), call_id=call, event="granted", purpose="training",
                                legal_basis="consent", occurred_at=datetime.now(UTC), source="ari")
    connection = await asyncpg.connect(pg_dsn, timeout=10)
    try:
        for column, bad in [("recording_id", "../../etc/passwd"), ("digit", "x"), ("language", "english"),
                            ("source", "web"), ("event", "maybe"), ("prompt_version", "v1"),
                            ("purpose", "Training"), ("legal_basis", "whim"), ("call_id", "c" * 65)]:
            values = {**base, "event_id": uuid.uuid4(), column: bad}
            placeholders = ", ".join(f"${i}" for i in range(1, len(values) + 1))
            with pytest.raises(asyncpg.CheckViolationError):
                await connection.execute(
                    f"INSERT INTO consent_events ({', '.join(values)}) VALUES ({placeholders})", *values.values())
    finally:
        await connection.close()
    assert await rows_for(pg_dsn, call) == []


async def test_database_down_journals_then_replay_loses_nothing(
    pg_sandbox: PgSandbox, pg_dsn: str, tmp_path: Path
) -> None:
    ledger = Ledger(pg_dsn, Journal(tmp_path / "journal"), write_timeout=5.0)
    call = unique_call()
    before = make_event(call, EventKind.NOTIFIED)
    try:
        assert await ledger.append(before) is Durability.DATABASE  # the pool exists and is warm
        pg_sandbox.stop()
        try:
            journaled = [make_event(call, kind) for kind in
                         (EventKind.GRANTED, EventKind.DECLINED, EventKind.NO_INPUT, EventKind.ABANDONED,
                          EventKind.UNAVAILABLE)]
            for event in journaled:
                assert await ledger.append(event) is Durability.JOURNAL
            assert ledger.degraded
            # Without the journal the caller learns the event is not stored.
            assert await ledger.append(make_event(call), use_journal=False) is Durability.LOST
            assert ledger.journal.backlog() == len(journaled)
            with pytest.raises(Exception):
                await ledger.replay_journal()  # still down: nothing is lost by trying
            assert ledger.journal.backlog() == len(journaled)
        finally:
            pg_sandbox.start()
        assert await ledger.replay_journal() == len(journaled)
        assert not ledger.degraded
        assert ledger.journal.backlog() == 0
        rows = await rows_for(pg_dsn, call)
        assert len(rows) == 1 + len(journaled)
        by_id = {row["event_id"]: row for row in rows}
        assert by_id[before.event_id]["via_journal"] is False
        for event in journaled:
            row = by_id[event.event_id]
            assert row["via_journal"] is True
            assert row["event"] == str(event.event) and row["consent_id"] == event.consent_id
            assert row["occurred_at"] == event.occurred_at and row["recording_id"] == event.recording_id
        assert await ledger.replay_journal() == 0
        assert len(await rows_for(pg_dsn, call)) == 1 + len(journaled)
        # And the ledger writes straight to the database again.
        assert await ledger.append(make_event(call)) is Durability.DATABASE
    finally:
        await ledger.close()
        pg_sandbox.start()


async def test_background_replayer_moves_the_journal_when_the_database_returns(
    pg_dsn: str, tmp_path: Path
) -> None:
    """start() never fails on a dead database; the replayer drains the journal once it answers."""
    database_up = asyncio.Event()
    attempts = 0

    async def connect(dsn: str, **kwargs: Any) -> asyncpg.Pool:
        nonlocal attempts
        attempts += 1
        if not database_up.is_set():
            raise ConnectionRefusedError("database down (simulated)")
        return await asyncpg.create_pool(dsn, **kwargs)

    ledger = Ledger(pg_dsn, Journal(tmp_path / "journal"), write_timeout=2.0, replay_interval=0.05, connect=connect)
    call = unique_call()
    try:
        await ledger.start()
        events = [make_event(call) for _ in range(3)]
        for event in events:
            assert await ledger.append(event) is Durability.JOURNAL
        assert ledger.degraded
        database_up.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + T
        while ledger.journal.backlog() or ledger.degraded:
            assert loop.time() < deadline, "the replayer did not drain the journal"
            await asyncio.sleep(0.02)
        rows = await rows_for(pg_dsn, call)
        assert sorted(row["event_id"] for row in rows) == sorted(event.event_id for event in events)
        assert all(row["via_journal"] for row in rows)
    finally:
        await ledger.close()
    assert ledger._replayer is None  # close() stopped the task


class ObservedJournal(Journal):
    """A journal that tells the test each time a drain has finished."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.drained = asyncio.Event()

    async def drain(self, store: Any) -> int:
        try:
            return await super().drain(store)
        finally:
            self.drained.set()


async def test_a_journaled_event_wakes_the_replayer_at_once(pg_dsn: str, tmp_path: Path) -> None:
    """The replay interval is an hour: only the append's wake-up can replay within the bound."""
    attempts = 0

    async def connect(dsn: str, **kwargs: Any) -> asyncpg.Pool:
        nonlocal attempts
        attempts += 1
        if attempts <= 2:  # start() and the append's write find the database down
            raise ConnectionRefusedError("database down (simulated)")
        return await asyncpg.create_pool(dsn, **kwargs)

    journal = ObservedJournal(tmp_path / "journal")
    ledger = Ledger(pg_dsn, journal, write_timeout=2.0, replay_interval=3600, connect=connect)
    call = unique_call()
    try:
        await ledger.start()
        await asyncio.wait_for(journal.drained.wait(), T)  # the replayer's first pass (nothing to do)
        journal.drained.clear()
        event = make_event(call)
        assert await ledger.append(event) is Durability.JOURNAL
        await asyncio.wait_for(journal.drained.wait(), T)
        assert journal.backlog() == 0
        [row] = await rows_for(pg_dsn, call)
        assert row["event_id"] == event.event_id and row["via_journal"] is True
    finally:
        await ledger.close()


async def test_degraded_clears_only_when_the_database_answers(pg_dsn: str, tmp_path: Path) -> None:
    ledger = Ledger("postgresql://nobody@127.0.0.1:1/none", Journal(tmp_path / "journal"), write_timeout=2.0)
    try:
        assert await ledger.append(make_event(unique_call())) is Durability.JOURNAL
        assert ledger.degraded
        with pytest.raises(OSError):
            await ledger.replay_journal()
        assert ledger.degraded and ledger.journal.backlog() == 1
    finally:
        await ledger.close()


async def test_migrate_twice_is_a_no_op(pg_sandbox: PgSandbox) -> None:
    dsn = await fresh_database(pg_sandbox)
    assert await migrate(dsn) == ALL_MIGRATIONS
    assert await migrate(dsn) == []
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        assert await connection.fetchval("SELECT count(*) FROM schema_migrations") == len(ALL_MIGRATIONS)
        triggers = await connection.fetch(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'consent_events'::regclass AND NOT tgisinternal")
        assert {"consent_events_no_update_delete", "consent_events_no_truncate"} <= {t["tgname"] for t in triggers}
    finally:
        await connection.close()


async def test_concurrent_migrates_do_not_fail(pg_sandbox: PgSandbox) -> None:
    dsn = await fresh_database(pg_sandbox)
    results = await asyncio.wait_for(asyncio.gather(*(migrate(dsn) for _ in range(4))), T)
    assert sorted(results) == [[], [], [], ALL_MIGRATIONS]
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        assert await connection.fetchval("SELECT count(*) FROM schema_migrations") == len(ALL_MIGRATIONS)
    finally:
        await connection.close()


async def test_an_upgrade_applies_only_the_new_migrations(pg_sandbox: PgSandbox, tmp_path: Path) -> None:
    """A ledger made by an older version (its migrations only) gets just what it lacks."""
    older = tmp_path / "older"
    older.mkdir()
    for name in ALL_MIGRATIONS[:2]:
        (older / name).write_text((_SQL_DIR / name).read_text())
    dsn = await fresh_database(pg_sandbox)
    assert await migrate(dsn, older) == ALL_MIGRATIONS[:2]
    assert await migrate(dsn) == ALL_MIGRATIONS[2:]
    assert await migrate(dsn) == []


async def test_a_ledger_migrated_by_a_newer_version_is_refused(pg_sandbox: PgSandbox, tmp_path: Path) -> None:
    """A downgrade: the ledger has a migration this version does not ship.  Nothing is applied."""
    older = tmp_path / "older"
    older.mkdir()
    for name in ALL_MIGRATIONS[:2]:
        (older / name).write_text((_SQL_DIR / name).read_text())
    dsn = await fresh_database(pg_sandbox)
    assert await migrate(dsn) == ALL_MIGRATIONS
    with pytest.raises(MigrationError) as refused:
        await migrate(dsn, older)
    assert all(name in str(refused.value) for name in ALL_MIGRATIONS[2:])
    assert "newer version" in str(refused.value)


async def test_migrate_without_files_is_an_error(pg_dsn: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await migrate(pg_dsn, tmp_path)

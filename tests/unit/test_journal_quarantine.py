"""Journal lines that can never be replayed go to the quarantine; the replay goes on around them.

Real PostgreSQL (the session cluster of tests/conftest.py) wherever the database decides.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import multiprocessing
import os
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from structlog.testing import capture_logs

from consent_gate import cli
from consent_gate.ari import metrics
from consent_gate.core.events import ConsentEvent, EventKind
from consent_gate.ledger import journal as journal_module
from consent_gate.ledger.journal import Journal
from consent_gate.ledger.store import Durability, Ledger
from consent_gate_rig.pgsandbox import PgSandbox

T = 30.0  # upper bound for every wait; never slept
CLOSED_DSN = "postgresql://nobody@127.0.0.1:1/none"  # nothing listens on port 1


def make_event(call_id: str, **fields: Any) -> ConsentEvent:
    values: dict[str, Any] = {
        "consent_id": uuid.uuid4(), "call_id": call_id, "event": EventKind.GRANTED, "purpose": "training",
        "legal_basis": "consent", "occurred_at": datetime.now(UTC), "source": "ari", "language": "da",
        "digit": "1", "detail": {"attempts": 1},
    }
    values.update(fields)
    return ConsentEvent(**values)


def unique_call() -> str:
    return f"q-{uuid.uuid4().hex}"


def line_of(source: ConsentEvent, **changes: Any) -> bytes:
    """The journal line of ``source``, with fields changed (``None`` as a key's value drops it)."""
    data = source.to_json()
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return json.dumps(data, separators=(",", ":")).encode()


def append_raw(journal: Journal, raw: bytes) -> None:
    """What a bug, an older version or a disk error could have left in the journal."""
    journal.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(journal.path, "ab") as fh:
        fh.write(raw)


def everything_in(directory: Path) -> bytes:
    """All bytes the journal directory holds, whatever the file."""
    return b"".join(path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file())


async def rows_for(dsn: str, call_id: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        return await connection.fetch("SELECT * FROM consent_events WHERE call_id = $1 ORDER BY seq", call_id)
    finally:
        await connection.close()


# -- the bad lines, around good ones, through a real PostgreSQL ------------------------------

BAD_LINES: dict[str, tuple[Callable[[ConsentEvent], bytes], str]] = {
    # name: (how the line is made from an event, the quarantine kind)
    "invalid-utf8": (lambda e: line_of(e).replace(b'"training"', b'"train\xffing"'), "invalid-utf8"),
    "not-json": (lambda e: b"granted " + line_of(e)[:30], "invalid-json"),
    "json-array": (lambda e: b"[1, 2]", "invalid-json"),
    "wrongly-typed-digit": (lambda e: line_of(e, digit=1), "invalid-event"),
    "wrongly-typed-detail": (lambda e: line_of(e, detail="attempts=1"), "invalid-event"),
    "bad-time": (lambda e: line_of(e, occurred_at="yesterday"), "invalid-event"),
    "unknown-event-kind": (lambda e: line_of(e, event="maybe"), "invalid-event"),
    "unknown-field": (lambda e: line_of(e, note="added by a newer version"), "invalid-event"),
    "missing-event-id": (lambda e: line_of(e, event_id=None), "invalid-event"),
}


@pytest.mark.parametrize("name", sorted(BAD_LINES))
async def test_a_bad_line_is_quarantined_and_the_good_ones_around_it_replayed_once(
    ledger: Ledger, pg_dsn: str, name: str
) -> None:
    make_line, kind = BAD_LINES[name]
    call = unique_call()
    before, bad_event, after = make_event(call), make_event(call), make_event(call)
    bad = make_line(bad_event)
    ledger.journal.append(before)
    append_raw(ledger.journal, bad + b"\n")
    ledger.journal.append(after)
    ledger.degraded = True  # as after the outage that filled the journal

    with capture_logs() as logs:
        assert await ledger.replay_journal() == 2

    rows = await rows_for(pg_dsn, call)
    assert sorted(row["event_id"] for row in rows) == sorted([before.event_id, after.event_id])
    assert not ledger.degraded, "a bad line must not keep the service from asking callers"
    assert ledger.journal.pending() == []
    # Kept byte for byte, exactly once, in a private file -- not deleted, not pending.
    assert bad in everything_in(ledger.journal.directory)
    assert ledger.journal.quarantine_path.read_bytes() == bad + b"\n"
    assert ledger.journal.quarantine_path.stat().st_mode & 0o777 == 0o600
    assert ledger.journal.reasons_path.stat().st_mode & 0o777 == 0o600
    [reason] = ledger.journal.quarantine_reasons()
    assert reason["kind"] == kind and reason["line"] == 2 and reason["quarantine_line"] == 1
    assert reason["bytes"] == len(bad)
    [alert] = [entry for entry in logs if entry["event"] == "journal.quarantined"]
    assert alert["log_level"] == "error" and alert["kind"] == kind and alert["line"] == 2
    if kind == "invalid-event":
        assert alert["event_id"] == (None if name == "missing-event-id" else str(bad_event.event_id))
    assert ledger.journal.quarantined_by_kind[kind] == 1

    # A second replay finds nothing: nothing stored twice, nothing quarantined twice.
    assert await ledger.replay_journal() == 0
    assert len(await rows_for(pg_dsn, call)) == 2
    assert ledger.journal.quarantined_lines() == 1


DATABASE_REJECTS: dict[str, tuple[dict[str, Any], str]] = {
    "check-violation-purpose": ({"purpose": "Not A Purpose"}, "CheckViolationError"),
    "check-violation-call-id": ({"call_id": "c" * 65}, "CheckViolationError"),
    "jsonb-nul": ({"detail": {"note": "\x00"}}, "UntranslatableCharacterError"),
    # asyncpg cannot even encode it (a lone surrogate is no UTF-8): refused before PostgreSQL.
    "unencodable-text": ({"caller_number": "\ud800"}, "DataError, SQLSTATE 22000, column caller_number"),
}


@pytest.mark.parametrize("name", sorted(DATABASE_REJECTS))
async def test_a_line_postgresql_rejects_is_quarantined_and_the_rest_replayed(
    ledger: Ledger, pg_dsn: str, name: str
) -> None:
    fields, error_name = DATABASE_REJECTS[name]
    call = unique_call()
    good = [make_event(call) for _ in range(3)]
    rejected = dataclasses.replace(make_event(call), **fields)
    for event in (good[0], rejected, good[1], good[2]):
        ledger.journal.append(event)
    ledger.degraded = True

    with capture_logs() as logs:
        assert await ledger.replay_journal() == 3

    rows = await rows_for(pg_dsn, call)
    assert sorted(row["event_id"] for row in rows) == sorted(event.event_id for event in good)
    assert not ledger.degraded
    assert ledger.journal.pending() == []
    [kept] = ledger.journal.quarantine_path.read_bytes().splitlines()
    assert journal_module.parse_line(kept) == rejected
    [reason] = ledger.journal.quarantine_reasons()
    assert reason["kind"] == "database-rejected" and reason["event_id"] == str(rejected.event_id)
    assert error_name in reason["reason"] and reason["line"] == 2
    [alert] = [entry for entry in logs if entry["event"] == "journal.quarantined"]
    assert alert["event_id"] == str(rejected.event_id) and error_name in alert["reason"]
    # The reason names the rule, never the value (it may be caller data).
    assert "Not A Purpose" not in json.dumps(logs, default=str) and "c" * 65 not in json.dumps(logs, default=str)

    assert await ledger.replay_journal() == 0
    assert len(await rows_for(pg_dsn, call)) == 3


async def test_an_event_the_database_rejects_does_not_degrade_the_ledger(ledger: Ledger, pg_dsn: str) -> None:
    call = unique_call()
    assert await ledger.append(make_event(call, purpose="Not A Purpose")) is Durability.JOURNAL
    assert not ledger.degraded, "one refused event must not make every other caller 'unavailable'"
    assert await ledger.append(make_event(call)) is Durability.DATABASE
    assert await ledger.replay_journal() == 0
    assert ledger.journal.quarantined_lines() == 1 and ledger.journal.backlog() == 0


# -- transient failures keep everything pending ---------------------------------------------

async def test_a_closed_port_keeps_every_line_pending_and_quarantines_nothing_for_it(
    pg_dsn: str, tmp_path: Path
) -> None:
    journal = Journal(tmp_path / "journal")
    call = unique_call()
    good, refused = make_event(call), make_event(call, purpose="Not A Purpose")
    journal.append(good)
    journal.append(refused)
    down = Ledger(CLOSED_DSN, journal, write_timeout=2.0)
    try:
        for _ in range(2):
            with pytest.raises(OSError):
                await down.replay_journal()
            assert down.degraded
            assert journal.pending() == [good, refused]
            assert journal.quarantined_lines() == 0, "a database that is away must not quarantine"
    finally:
        await down.close()

    up = Ledger(pg_dsn, journal, write_timeout=5.0)
    try:
        assert await up.replay_journal() == 1
        assert [row["event_id"] for row in await rows_for(pg_dsn, call)] == [good.event_id]
        assert journal.quarantined_lines() == 1 and journal.pending() == []
    finally:
        await up.close()


async def test_a_stopped_cluster_keeps_the_lines_pending(
    pg_sandbox: PgSandbox, pg_dsn: str, tmp_path: Path
) -> None:
    journal = Journal(tmp_path / "journal")
    ledger = Ledger(pg_dsn, journal, write_timeout=5.0)
    call = unique_call()
    good, refused = make_event(call), dataclasses.replace(make_event(call), call_id="c" * 65)
    try:
        assert await ledger.append(make_event(call)) is Durability.DATABASE  # a warm pool
        journal.append(good)
        journal.append(refused)
        pg_sandbox.stop()
        try:
            with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
                await ledger.replay_journal()
            assert ledger.degraded
            assert journal.pending() == [good, refused]
            assert journal.quarantined_lines() == 0
        finally:
            pg_sandbox.start()
        assert await ledger.replay_journal() == 1
        assert not ledger.degraded
        assert good.event_id in {row["event_id"] for row in await rows_for(pg_dsn, call)}
        assert journal.quarantined_lines() == 1 and journal.pending() == []
    finally:
        await ledger.close()
        pg_sandbox.start()


# -- torn lines ----------------------------------------------------------------------------

async def test_a_torn_last_line_is_tolerated_and_kept(ledger: Ledger, pg_dsn: str) -> None:
    call = unique_call()
    good = [make_event(call), make_event(call)]
    for event in good:
        ledger.journal.append(event)
    torn = line_of(make_event(call))[:57]
    append_raw(ledger.journal, torn)  # a crash in the middle of the third append
    assert ledger.journal.pending() == good  # maybe an append still being written: not counted
    assert ledger.journal.backlog() == 2

    assert await ledger.replay_journal() == 2
    assert sorted(row["event_id"] for row in await rows_for(pg_dsn, call)) == sorted(e.event_id for e in good)
    assert not ledger.degraded
    # Once claimed for replay no writer can finish it: kept for the admin, not deleted.
    assert ledger.journal.quarantine_path.read_bytes() == torn + b"\n"
    [reason] = ledger.journal.quarantine_reasons()
    assert reason["kind"] == "torn-line" and reason["line"] == 3


async def test_a_torn_line_followed_by_an_append_is_a_bad_complete_line(ledger: Ledger, pg_dsn: str) -> None:
    call = unique_call()
    first, after = make_event(call), make_event(call)
    ledger.journal.append(first)
    torn = b'{"consent_id":"12'
    append_raw(ledger.journal, torn)
    ledger.journal.append(after)  # ends the torn line first
    assert ledger.journal.pending() == [first, after]
    assert await ledger.replay_journal() == 2
    assert len(await rows_for(pg_dsn, call)) == 2
    assert ledger.journal.quarantine_path.read_bytes() == torn + b"\n"
    [reason] = ledger.journal.quarantine_reasons()
    assert reason["kind"] == "invalid-json"


# -- the background replayer ---------------------------------------------------------------

class ObservedJournal(Journal):
    """A journal that counts finished drains and tells the test each time."""

    def __init__(self, directory: Path, *, fail_first: BaseException | None = None) -> None:
        super().__init__(directory)
        self.drains = 0
        self.drained = asyncio.Event()
        self.fail_first = fail_first

    async def drain(self, store: Any) -> int:
        try:
            if self.fail_first is not None:
                error, self.fail_first = self.fail_first, None
                raise error
            return await super().drain(store)
        finally:
            self.drains += 1
            self.drained.set()

    async def wait_drains(self, count: int) -> None:
        while self.drains < count:
            await asyncio.wait_for(self.drained.wait(), T)
            self.drained.clear()


async def test_the_background_replayer_survives_bad_lines_and_leaves_degraded_mode(
    pg_dsn: str, tmp_path: Path
) -> None:
    journal = ObservedJournal(tmp_path / "journal")
    call = unique_call()
    good = [make_event(call) for _ in range(3)]
    journal.append(good[0])
    append_raw(journal, line_of(make_event(call)).replace(b'"da"', b'"d\xe6"') + b"\n")  # Latin-1 'æ'
    journal.append(good[1])
    journal.append(make_event(call, digit="x"))  # PostgreSQL refuses it
    journal.append(good[2])
    ledger = Ledger(pg_dsn, journal, write_timeout=5.0, replay_interval=0.05)
    ledger.degraded = True  # the outage that filled the journal
    try:
        await ledger.start()
        await journal.wait_drains(2)  # a second round: the replayer is alive after the bad lines
        assert not ledger.degraded
        rows = await rows_for(pg_dsn, call)
        assert sorted(row["event_id"] for row in rows) == sorted(event.event_id for event in good)
        assert journal.quarantined_lines() == 2 and journal.backlog() == 0
        assert {r["kind"] for r in journal.quarantine_reasons()} == {"invalid-utf8", "database-rejected"}
    finally:
        await ledger.close()


async def test_an_unexpected_replay_failure_is_logged_counted_and_retried(
    pg_dsn: str, tmp_path: Path
) -> None:
    journal = ObservedJournal(tmp_path / "journal", fail_first=RuntimeError("a bug in a replay round"))
    call = unique_call()
    event = make_event(call)
    journal.append(event)
    ledger = Ledger(pg_dsn, journal, write_timeout=5.0, replay_interval=0.05)
    try:
        with capture_logs() as logs:
            await ledger.start()
            await journal.wait_drains(2)
        assert ledger.replay_failures == 1
        assert not ledger.degraded, "a failure that is not the database's must not stop the questions"
        assert [row["event_id"] for row in await rows_for(pg_dsn, call)] == [event.event_id]
        [failed] = [entry for entry in logs if entry["event"] == "ledger.replay_failed"]
        assert failed["log_level"] == "error" and "a bug" in failed["error"]
    finally:
        await ledger.close()


# -- several replayers, several writers ------------------------------------------------------

async def test_a_second_replayer_waits_its_turn_and_nothing_is_quarantined_twice(tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    first, second = Journal(directory), Journal(directory)  # e.g. the service and an AGI script
    event = make_event("c")
    first.append(event)
    append_raw(first, b"garbage\n")
    storing, release = asyncio.Event(), asyncio.Event()
    stored: list[ConsentEvent] = []

    async def slow_store(batch: list[ConsentEvent]) -> None:
        storing.set()
        await asyncio.wait_for(release.wait(), T)
        stored.extend(batch)

    async def other_store(batch: list[ConsentEvent]) -> None:
        raise AssertionError("the second replayer must not replay what the first one holds")

    draining = asyncio.create_task(first.drain(slow_store))
    await asyncio.wait_for(storing.wait(), T)
    assert await second.drain(other_store) == 0
    release.set()
    assert await asyncio.wait_for(draining, T) == 1
    assert stored == [event]
    assert first.quarantine_path.read_bytes() == b"garbage\n"
    assert first.pending() == []


def _append_worker(directory: str, worker: int, count: int, start: Any) -> None:
    start.wait(T)
    journal = Journal(Path(directory))
    for n in range(count):
        if n % 5 == 0:  # a line the parser refuses (detail must be an object)
            journal.append(make_event(f"w{worker}-{n}", detail="not-an-object"))  # type: ignore[arg-type]
        elif n % 5 == 1:  # a line the store refuses
            journal.append(make_event(f"reject-w{worker}-{n}"))
        else:
            journal.append(make_event(f"w{worker}-{n}", detail={"pad": "x" * (150 * (n % 7))}))


async def test_replay_with_bad_lines_while_other_processes_append_loses_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    journal = Journal(directory)
    workers, count = 4, 60
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_append_worker, args=(str(directory), w, count, start)) for w in range(workers)]
    for proc in procs:
        proc.start()
    stored: list[ConsentEvent] = []
    calls = 0

    async def store(batch: list[ConsentEvent]) -> dict[uuid.UUID, str]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)  # a database round trip lets the loop run
        if calls % 3 == 0:
            raise ConnectionError("database away for this round")
        refused = {e.event_id: "refused by the test" for e in batch if e.call_id.startswith("reject-")}
        stored.extend(e for e in batch if e.event_id not in refused)
        return refused

    start.set()
    deadline = time.monotonic() + T
    while any(proc.exitcode is None for proc in procs):
        assert time.monotonic() < deadline, "writers did not finish"
        try:
            await journal.drain(store)
        except ConnectionError:
            pass
        await asyncio.sleep(0)
    for proc in procs:
        proc.join(T)
        assert proc.exitcode == 0, f"writer exited with {proc.exitcode}"
    while journal.backlog() or any(directory.glob("replaying-*")):
        assert time.monotonic() < deadline, "the journal did not drain"
        try:
            await journal.drain(store)
        except ConnectionError:
            pass

    names = [(w, n) for w in range(workers) for n in range(count)]
    assert sorted(e.call_id for e in stored) == sorted(f"w{w}-{n}" for w, n in names if n % 5 > 1)
    assert len({e.event_id for e in stored}) == len(stored)  # nothing stored twice
    quarantined = [json.loads(line)["call_id"] for line in journal.quarantine_path.read_bytes().splitlines()]
    expected = [f"w{w}-{n}" for w, n in names if n % 5 == 0] + [f"reject-w{w}-{n}" for w, n in names if n % 5 == 1]
    assert sorted(quarantined) == sorted(expected)  # each bad line exactly once
    assert len(journal.quarantine_reasons()) == len(expected)
    assert not list(directory.glob("*.tmp"))


# -- the strict parser -----------------------------------------------------------------------

@pytest.mark.parametrize(("changes", "kind", "mentions"), [
    ({"consent_id": "not-a-uuid"}, "invalid-event", "consent_id"),
    ({"call_id": 42}, "invalid-event", "call_id"),
    ({"language": ["da"]}, "invalid-event", "language"),
    ({"decided_at": "2026-01-01T10:00:00"}, "invalid-event", "decided_at"),  # no UTC offset
    ({"prompt_started_at": 17}, "invalid-event", "prompt_started_at"),
    ({"event": 1}, "invalid-event", "event"),
    ({"purpose": None}, "invalid-event", "purpose"),
    ({"source": None, "digit": None}, "invalid-event", "missing field"),
    ({"extra": 1}, "invalid-event", "unknown field 'extra'"),
])
def test_the_parser_refuses_what_to_json_never_writes(changes: dict[str, Any], kind: str, mentions: str) -> None:
    event = make_event("c")
    data = event.to_json()
    for key, value in changes.items():
        if value is None and key in ("source", "digit"):
            data.pop(key)
        else:
            data[key] = value
    with pytest.raises(journal_module.InvalidLine) as caught:
        journal_module.parse_line(json.dumps(data).encode())
    assert caught.value.kind == kind and mentions in caught.value.reason
    assert caught.value.event_id == str(event.event_id)


def test_the_parser_round_trips_every_event_the_journal_writes() -> None:
    now = datetime.now(UTC)
    full = make_event("c", prompt_version="a" * 64, caller_ref="b" * 64, caller_number="+4512345678",
                      recording_id="c" * 32, prompt_started_at=now, decided_at=now, detail={"k": [1, None]})
    for event in (make_event("c"), full):
        assert journal_module.parse_line(line_of(event)) == event


# -- what an admin sees and does -------------------------------------------------------------

async def test_metrics_count_quarantined_lines(ledger: Ledger) -> None:
    before = 0.0
    ledger.journal.append(make_event(unique_call()))
    append_raw(ledger.journal, b"{oops\n")
    await ledger.replay_journal()
    exporter = await metrics.start_exporter(metrics.ServiceMetrics(), None, ledger, env={metrics.PORT_ENV: "0"})
    try:
        for _ in range(2):  # two scrapes: counted once
            async with aiohttp.ClientSession() as session, \
                    session.get(f"http://127.0.0.1:{exporter.port}/metrics") as response:
                text = await response.text()
        assert metrics.sample("consent_gate_journal_quarantined_total", {"kind": "invalid-json"}, text) == before + 1
        assert metrics.sample("consent_gate_journal_quarantine_lines", None, text) == 1
    finally:
        await exporter.close()


def test_an_admin_inspects_fixes_and_requeues_the_quarantine(
    pg_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "journal"
    journal = Journal(directory)
    call = unique_call()
    event = make_event(call)
    append_raw(journal, line_of(event, note="from a newer version") + b"\n")
    assert cli.main(["journal", "replay", "--dir", str(directory), "--dsn", pg_dsn]) == 0
    out = capsys.readouterr()
    assert "replayed 0 event(s)" in out.out
    assert "1 line(s) in quarantine" in out.err and "journal requeue" in out.err

    assert cli.main(["journal", "show", "--dir", str(directory)]) == 0
    assert "1 line(s) in quarantine" in capsys.readouterr().err

    # The admin reads why, fixes the line in place, and puts it back.
    [reason] = journal.quarantine_reasons()
    assert reason["kind"] == "invalid-event" and "note" in reason["reason"]
    journal.quarantine_path.write_bytes(line_of(event) + b"\n")
    assert cli.main(["journal", "requeue", "--dir", str(directory)]) == 0
    assert "requeued 1" in capsys.readouterr().out
    assert not journal.quarantine_path.exists() and not journal.reasons_path.exists()
    assert journal.pending() == [event]

    assert cli.main(["journal", "replay", "--dir", str(directory), "--dsn", pg_dsn]) == 0
    out = capsys.readouterr()
    assert "replayed 1 event(s)" in out.out and "quarantine" not in out.err
    [row] = asyncio.run(rows_for(pg_dsn, call))
    assert row["event_id"] == event.event_id and row["via_journal"] is True
    assert oct(os.stat(directory).st_mode & 0o777) == oct(0o700)

"""The fsync'd local journal: round trip, torn lines, drain semantics, several writer processes."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from consent_gate.core.events import ConsentEvent, EventKind
from consent_gate.ledger.journal import Journal, JournalError

T = 60.0  # upper bound for the multi-process tests; never slept


def make_event(call_id: str = "call-1", kind: EventKind = EventKind.GRANTED, **extra: object) -> ConsentEvent:
    return ConsentEvent(
        consent_id=uuid.uuid4(), call_id=call_id, event=kind, purpose="training", legal_basis="consent",
        occurred_at=datetime.now(UTC), source="ari", language="da", digit="1",
        detail={"attempts": 1, **extra},
    )


def ids(events: list[ConsentEvent]) -> list[uuid.UUID]:
    return [event.event_id for event in events]


def make_unwritable(directory: Path) -> None:
    """Make a journal directory that cannot be written, also for root (who ignores modes)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "journal.lock").mkdir()   # open(O_RDWR) on a directory fails: EISDIR
    (directory / "pending.jsonl").mkdir()
    directory.chmod(0o500)


def test_append_round_trip(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    events = [make_event(f"c{i}", detail_note=f"n{i}") for i in range(5)]
    for event in events:
        journal.append(event)
    assert journal.pending() == events
    assert journal.backlog() == 5
    assert (tmp_path / "journal").stat().st_mode & 0o777 == 0o700
    assert journal.path.stat().st_mode & 0o777 == 0o600
    lines = journal.path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 6  # one complete line per event


def test_append_fsyncs_before_returning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = Journal(tmp_path / "journal")
    journal.append(make_event("first"))  # the directory and the file exist from now on
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    journal.append(make_event("second"))
    assert str(journal.path) in synced, f"append returned without fsyncing the journal file: {synced}"


def test_append_fails_loudly_when_unwritable(tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    make_unwritable(directory)
    try:
        with pytest.raises(JournalError):
            Journal(directory).append(make_event())
    finally:
        directory.chmod(0o700)


def test_append_fails_when_the_directory_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(JournalError):
        Journal(tmp_path / "file" / "journal").append(make_event())


def test_torn_last_line_is_ignored(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    good = [make_event("a"), make_event("b")]
    for event in good:
        journal.append(event)
    full = journal.path.read_bytes()
    with open(journal.path, "ab") as fh:  # a crash in the middle of the third write
        fh.write(full[: len(full) // 3])
    assert journal.pending() == good


def test_append_after_a_torn_line_is_not_lost(tmp_path: Path) -> None:
    """The next acknowledged event must not be glued onto the torn, unterminated line."""
    journal = Journal(tmp_path / "journal")
    first = make_event("a")
    journal.append(first)
    with open(journal.path, "ab") as fh:
        fh.write(b'{"consent_id":"12')
    after = make_event("b")
    journal.append(after)
    assert journal.pending() == [first, after]


def test_garbage_lines_are_not_pending(tmp_path: Path) -> None:
    """Not replayable, so not pending; the next drain moves them to the quarantine."""
    journal = Journal(tmp_path / "journal")
    first, second = make_event("a"), make_event("b")
    journal.append(first)
    with open(journal.path, "ab") as fh:
        fh.write(b"[1, 2]\n{}\nnot json\n\n")
    journal.append(second)
    assert journal.pending() == [first, second]


async def test_drain_quarantines_garbage_and_stores_the_rest(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    first, second = make_event("a"), make_event("b")
    journal.append(first)
    with open(journal.path, "ab") as fh:
        fh.write(b"[1, 2]\n{}\nnot json\n\n")
    journal.append(second)
    stored: list[ConsentEvent] = []

    async def store(batch: list[ConsentEvent]) -> None:
        stored.extend(batch)

    assert await journal.drain(store) == 2
    assert stored == [first, second]
    assert journal.quarantine_path.read_bytes() == b"[1, 2]\n{}\nnot json\n"  # the empty line held nothing
    assert [r["line"] for r in journal.quarantine_reasons()] == [2, 3, 4]
    assert journal.pending() == [] and journal.quarantined_lines() == 3


async def test_drain_stores_then_removes(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    events = [make_event(f"c{i}") for i in range(3)]
    for event in events:
        journal.append(event)
    stored: list[ConsentEvent] = []

    async def store(batch: list[ConsentEvent]) -> None:
        stored.extend(batch)

    assert await journal.drain(store) == 3
    assert stored == events
    assert journal.pending() == []
    assert list((tmp_path / "journal").glob("*.jsonl")) == []
    assert await journal.drain(store) == 0
    assert len(stored) == 3


async def test_drain_of_a_journal_never_written(tmp_path: Path) -> None:
    async def store(batch: list[ConsentEvent]) -> None:
        raise AssertionError("nothing to store")

    assert await Journal(tmp_path / "never").drain(store) == 0


async def test_drain_removes_only_what_was_stored(tmp_path: Path) -> None:
    """An event appended while the store is awaiting the database stays pending."""
    journal = Journal(tmp_path / "journal")
    before = make_event("before")
    journal.append(before)
    during = make_event("during")
    stored: list[ConsentEvent] = []

    async def store(batch: list[ConsentEvent]) -> None:
        journal.append(during)
        stored.extend(batch)

    assert await journal.drain(store) == 1
    assert stored == [before]
    assert journal.pending() == [during]


async def test_failed_store_keeps_the_events(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    events = [make_event(f"c{i}") for i in range(3)]
    for event in events:
        journal.append(event)

    async def broken(batch: list[ConsentEvent]) -> None:
        raise ConnectionError("database down")

    with pytest.raises(ConnectionError):
        await journal.drain(broken)
    assert journal.pending() == events

    # More events arrive while the database is down; a failed drain again keeps everything.
    later = make_event("later")
    journal.append(later)
    with pytest.raises(ConnectionError):
        await journal.drain(broken)
    assert sorted(ids(journal.pending())) == sorted(ids([*events, later]))

    stored: list[ConsentEvent] = []

    async def store(batch: list[ConsentEvent]) -> None:
        stored.extend(batch)

    assert await journal.drain(store) == 4
    assert sorted(ids(stored)) == sorted(ids([*events, later]))
    assert journal.pending() == []


async def test_partly_failed_drain_keeps_exactly_the_unstored_batch(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    old = make_event("old")
    journal.append(old)

    async def broken(batch: list[ConsentEvent]) -> None:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        await journal.drain(broken)  # 'old' is now in a claimed batch
    new = make_event("new")
    journal.append(new)              # 'new' goes into a second batch

    calls: list[list[uuid.UUID]] = []

    async def first_only(batch: list[ConsentEvent]) -> None:
        calls.append(ids(batch))
        if len(calls) > 1:
            raise ConnectionError("down again")

    with pytest.raises(ConnectionError):
        await journal.drain(first_only)
    assert len(calls) == 2
    stored_first = calls[0]
    remaining = ids(journal.pending())
    assert sorted(stored_first + remaining) == sorted([old.event_id, new.event_id])
    assert set(stored_first).isdisjoint(remaining)


# -- several processes ----------------------------------------------------------------------


def _append_worker(directory: str, worker: int, count: int, start: multiprocessing.synchronize.Event) -> None:
    start.wait(T)
    journal = Journal(Path(directory))
    for n in range(count):
        journal.append(make_event(f"w{worker}-{n}", pad="x" * (200 * (n % 7))))


def _spawn_writers(directory: Path, workers: int, count: int) -> tuple[list[multiprocessing.process.BaseProcess], object]:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_append_worker, args=(str(directory), w, count, start)) for w in range(workers)]
    for proc in procs:
        proc.start()
    return procs, start


def _expected_calls(workers: int, count: int) -> list[str]:
    return sorted(f"w{w}-{n}" for w in range(workers) for n in range(count))


def _join(procs: list[multiprocessing.process.BaseProcess]) -> None:
    for proc in procs:
        proc.join(T)
        if proc.exitcode is None:
            proc.kill()
            raise AssertionError(f"writer {proc.pid} did not finish in {T} s")
        assert proc.exitcode == 0, f"writer exited with {proc.exitcode}"


def test_concurrent_appends_from_several_processes_all_land(tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    procs, start = _spawn_writers(directory, workers=4, count=60)
    start.set()  # type: ignore[attr-defined]
    _join(procs)
    pending = Journal(directory).pending()
    assert sorted(event.call_id for event in pending) == _expected_calls(4, 60)
    raw = Journal(directory).path.read_bytes()
    assert raw.count(b"\n") == 240 and raw.endswith(b"\n")  # no interleaved or torn lines


async def test_drain_while_other_processes_append_loses_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    journal = Journal(directory)
    workers, count = 4, 80
    procs, start = _spawn_writers(directory, workers, count)
    stored: list[ConsentEvent] = []
    drains_with_events = 0

    async def store(batch: list[ConsentEvent]) -> None:
        stored.extend(batch)
        await asyncio.sleep(0)  # let the loop breathe, as a real database round trip would

    start.set()  # type: ignore[attr-defined]
    deadline = time.monotonic() + T
    while any(proc.exitcode is None for proc in procs):
        assert time.monotonic() < deadline, "writers did not finish"
        if await journal.drain(store):
            drains_with_events += 1
        await asyncio.sleep(0)
    _join(procs)
    await journal.drain(store)
    assert sorted(event.call_id for event in stored) == _expected_calls(workers, count)
    assert len({event.event_id for event in stored}) == len(stored)  # and nothing twice
    assert journal.pending() == []
    assert drains_with_events >= 2, "the drains never overlapped the writers; the test proved nothing"

"""Several purposes in one call: the training worker and the retention sweeper decide per
(consent id, purpose).

``run_gate`` asks each purpose in turn but gives the call one CONSENT_ID and one recording id;
each purpose gets its own ledger event.  These tests drive the real ``run_gate`` (a caller who
answers each question with a scripted key) against a real Ledger on a PostgreSQL database of
their own, write the files MixMonitor would leave, and then run the real training worker and
the real retention sweeper with an injected clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest

from consent_gate.admin import anonymise as an
from consent_gate.admin import subject, training
from consent_gate.admin.retention import RetentionSweeper, place_hold, release_hold
from consent_gate.config import Purpose, Settings, load_settings
from consent_gate.core.dialog import (
    CallInfo,
    DialogResult,
    GateContext,
    PromptRef,
    event_for,
    run_gate,
)
from consent_gate.core.events import Decision, EventKind
from consent_gate.core.midcall import MidCallState
from consent_gate.ledger.journal import Journal
from consent_gate.ledger.store import Ledger
from consent_gate.prompts.catalog import PromptCatalog, packaged_sounds_dir

REPO = Path(__file__).resolve().parents[2]
SOUNDS = packaged_sounds_dir()
CATALOG = PromptCatalog.load(SOUNDS)
# The calls happen an hour ago: the training worker runs on the real clock, the sweeper on an injected one.
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
DAY = timedelta(days=1)
RATE = an.SAMPLE_RATE

PURPOSES = {
    "training": Purpose("training", "consent", "question-training", 90, training_copy=True),
    "documentation": Purpose("documentation", "consent", "question-documentation", 365),
    "mifid": Purpose("mifid", "legal-obligation", "notice-legal-obligation", 1825),
}
YES, NO = "1", "2"


class StepClock:
    """The gate's clock: each reading one second after the previous one, from ``start``."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


class AnsweringCaller:
    """A DialogPort whose caller presses ``answers[question]`` during each question; every other
    prompt (a legal-obligation notice) plays to the end."""

    source = "ari"

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = dict(answers)

    async def play(self, prompt: PromptRef, *, stop_keys: str) -> str | None:
        key = self.answers.pop(prompt.name, None)
        assert key is None or key in stop_keys, f"{key!r} cannot interrupt {prompt.name}"
        return key

    async def wait_key(self, timeout: float) -> str | None:
        raise AssertionError("every question was answered during its prompt")

    async def discard_keys(self) -> None:
        pass  # keys come only as answers to the prompt being played


@dataclasses.dataclass
class Rig:
    gate: GateContext
    recordings: Path
    copies: Path


@pytest.fixture
async def rig(db: str, tmp_path: Path) -> AsyncIterator[Rig]:
    settings: Settings = dataclasses.replace(load_settings(None, env={
        "CONSENT_GATE_HMAC_KEY": "k" * 32,
        "CONSENT_GATE_ARI_PASSWORD": "pw",
        "CONSENT_GATE_PROMPTS_DIR": str(SOUNDS),
        "CONSENT_GATE_ASTERISK_SOUNDS_DIR": "/var/lib/asterisk/sounds/consent-gate/",
        "CONSENT_GATE_RECORDINGS_DIR": str(tmp_path / "recordings"),
        "CONSENT_GATE_RECORDINGS_OWNER": str(os.geteuid()),
    }), purposes=PURPOSES)
    ledger = Ledger(db, Journal(tmp_path / "journal"), write_timeout=5.0)
    recordings = tmp_path / "recordings"
    recordings.mkdir(mode=0o700)
    try:
        yield Rig(GateContext(settings, CATALOG, ledger, clock=StepClock()), recordings, tmp_path / "copies")
    finally:
        await ledger.close()


async def place_call(rig: Rig, asked: str, answers: dict[str, str]) -> tuple[CallInfo, DialogResult]:
    """One call through the real gate: ``asked`` as the dialplan passes it ("documentation+training")."""
    call = CallInfo(call_id=f"tp-{uuid.uuid4().hex[:16]}", caller_number="+45 20 30 40 50", language="en")
    purposes = [PURPOSES[name] for name in asked.split("+")]
    result = await asyncio.wait_for(run_gate(AnsweringCaller(answers), call, purposes, rig.gate), 10)
    return call, result


def record(rig: Rig, result: DialogResult) -> list[Path]:
    """The files MixMonitor leaves for this result (legs only when CONSENT_RECORD_LEGS), closed."""
    assert result.recording_id is not None
    base = rig.recordings / result.recording_id
    t = np.arange(RATE) / RATE
    caller = (np.sin(2 * np.pi * 140 * t) * 6000 + np.sin(2 * np.pi * 700 * t) * 3000).astype(np.int16)
    agent = (np.sin(2 * np.pi * 1000 * t) * 8000).astype(np.int16)
    paths = [an.write_wav(Path(f"{base}.wav"), [(caller // 2 + agent // 2).astype(np.int16)])]
    if result.record_legs:
        paths += [an.write_wav(Path(f"{base}-caller.wav"), [caller]), an.write_wav(Path(f"{base}-agent.wav"), [agent])]
    closed = time.time() - 60  # Asterisk closed them a minute ago
    for path in paths:
        os.utime(path, (closed, closed))
    return paths


async def make_copy(rig: Rig, conn: asyncpg.Connection, recording_id: str) -> training.CopyOutcome:
    return await training.make_training_copy(conn, recording_id, recordings_dir=rig.recordings,
                                             copies_dir=rig.copies, purposes=PURPOSES)


async def sweep(db: str, rig: Rig, now: datetime) -> Any:
    return await RetentionSweeper(db, rig.recordings, PURPOSES, clock=lambda: now).run()


async def decisions(conn: asyncpg.Connection, consent_id: str) -> dict[str, dict[str, Any]]:
    rows = await conn.fetch("SELECT * FROM consent_decisions WHERE consent_id = $1", uuid.UUID(consent_id))
    return {row["purpose"]: dict(row) for row in rows}


async def recording_tombstones(conn: asyncpg.Connection, recording_id: str) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch(
        "SELECT * FROM data_erasures WHERE scope = 'recording' AND recording_id = $1 ORDER BY seq", recording_id)]


# -- the four shapes of a documentation/training call ----------------------------------------------

@pytest.mark.parametrize("asked", ["documentation+training", "training+documentation"])
async def test_both_granted_copy_made_and_original_kept_until_documentation_retention(
    db: str, conn: asyncpg.Connection, rig: Rig, asked: str,
) -> None:
    _, result = await place_call(rig, asked, {"question-documentation": YES, "question-training": YES})
    assert result.status is Decision.GRANTED and sorted(result.purposes) == ["documentation", "training"]
    recording_id = result.recording_id
    assert recording_id is not None
    paths = record(rig, result)
    assert recording_id in await training.pending_recordings(conn, rig.recordings, PURPOSES)

    outcome = await make_copy(rig, conn, recording_id)
    assert outcome.created and outcome.path.exists()
    assert not outcome.original_deleted and outcome.kept_because == "purpose documentation keeps the recording"
    assert all(p.exists() for p in paths) and await recording_tombstones(conn, recording_id) == []
    assert recording_id not in await training.pending_recordings(conn, rig.recordings, PURPOSES)

    # Day 91: training's own retention is over; documentation still needs the original.
    assert (await sweep(db, rig, T0 + 91 * DAY)).recordings_deleted == []
    assert all(p.exists() for p in paths)
    # Day 366: documentation's retention ends, and with it the original.
    report = await sweep(db, rig, T0 + 366 * DAY)
    assert [r["recording_id"] for r in report.recordings_deleted] == [recording_id]
    assert not any(p.exists() for p in paths)
    view = await decisions(conn, result.consent_id)
    assert {p: (row["decision"], row["recording_id"]) for p, row in view.items()} == {
        "documentation": ("granted", recording_id), "training": ("granted", recording_id)}


async def test_original_goes_when_documentation_retention_ends_even_before_training_retention(
    db: str, conn: asyncpg.Connection, rig: Rig,
) -> None:
    """Once the copy exists, training no longer needs the original: the shorter documentation
    retention decides (here 30 days against training's 90)."""
    short = {**PURPOSES, "documentation": dataclasses.replace(PURPOSES["documentation"], retention_days=30)}
    _, result = await place_call(rig, "documentation+training", {"question-documentation": YES,
                                                                 "question-training": YES})
    assert result.recording_id is not None
    paths = record(rig, result)
    outcome = await training.make_training_copy(conn, result.recording_id, recordings_dir=rig.recordings,
                                                copies_dir=rig.copies, purposes=short)
    assert outcome.created and not outcome.original_deleted
    report = await RetentionSweeper(db, rig.recordings, short, clock=lambda: T0 + 31 * DAY).run()
    assert [r["recording_id"] for r in report.recordings_deleted] == [result.recording_id]
    assert not any(p.exists() for p in paths) and outcome.path.exists()


@pytest.mark.parametrize("asked", ["documentation+training", "training+documentation"])
async def test_documentation_granted_training_declined_no_copy_original_kept(
    db: str, conn: asyncpg.Connection, rig: Rig, asked: str,
) -> None:
    _, result = await place_call(rig, asked, {"question-documentation": YES, "question-training": NO})
    assert result.status is Decision.GRANTED and result.purposes == ["documentation"]
    assert result.recording_id is not None and not result.record_legs
    [path] = record(rig, result)

    assert result.recording_id not in await training.pending_recordings(conn, rig.recordings, PURPOSES)
    with pytest.raises(training.NotEligible):
        await make_copy(rig, conn, result.recording_id)
    assert path.exists() and not rig.copies.exists()
    assert (await sweep(db, rig, T0 + 91 * DAY)).recordings_deleted == []
    assert path.exists(), "documentation keeps it"
    await sweep(db, rig, T0 + 366 * DAY)
    assert not path.exists()
    # What an admin reads: one row per purpose of the call.
    view = await decisions(conn, result.consent_id)
    assert {p: row["decision"] for p, row in view.items()} == {"documentation": "granted", "training": "declined"}
    assert view["training"]["recording_id"] is None


async def test_training_granted_only_copy_made_original_deleted_with_a_tombstone(
    db: str, conn: asyncpg.Connection, rig: Rig,
) -> None:
    _, result = await place_call(rig, "training", {"question-training": YES})
    recording_id = result.recording_id
    assert recording_id is not None and result.record_legs
    paths = record(rig, result)
    before = datetime.now(UTC)
    [outcome] = await training.make_pending(conn, recordings_dir=rig.recordings, copies_dir=rig.copies,
                                            purposes=PURPOSES)
    assert outcome.created and outcome.original_deleted and outcome.kept_because is None
    assert not any(p.exists() for p in paths) and outcome.path.exists()
    [tomb] = await recording_tombstones(conn, recording_id)
    assert tomb["kind"] == "retention" and tomb["actor"] == "training-worker"
    assert before <= tomb["performed_at"] <= datetime.now(UTC)
    assert sorted(tomb["files"]) == sorted(p.name for p in paths)
    assert "training copy" in tomb["reason"]
    # Idempotent: a re-run and the sweeper find nothing more to delete and write no second tombstone.
    again = await make_copy(rig, conn, recording_id)
    assert not again.created and not again.original_deleted and again.copy_id == outcome.copy_id
    assert (await sweep(db, rig, T0 + 2 * DAY)).recordings_deleted == []
    assert len(await recording_tombstones(conn, recording_id)) == 1


@pytest.mark.parametrize("asked", ["documentation+training", "training+documentation"])
async def test_documentation_declined_training_granted_copy_made(
    db: str, conn: asyncpg.Connection, rig: Rig, asked: str,
) -> None:
    _, result = await place_call(rig, asked, {"question-documentation": NO, "question-training": YES})
    assert result.purposes == ["training"] and result.record_legs
    recording_id = result.recording_id
    assert recording_id is not None
    paths = record(rig, result)

    assert await training.pending_recordings(conn, rig.recordings, PURPOSES) == [recording_id]
    outcome = await make_copy(rig, conn, recording_id)
    assert outcome.created and outcome.path.exists()
    assert outcome.original_deleted, "the declined documentation purpose keeps nothing"
    assert not any(p.exists() for p in paths)
    assert [sorted(t["files"]) for t in await recording_tombstones(conn, recording_id)] == [
        sorted(p.name for p in paths)]
    view = await decisions(conn, result.consent_id)
    assert {p: row["decision"] for p, row in view.items()} == {"documentation": "declined", "training": "granted"}


# -- withdrawal and erasure across the purposes of one call ----------------------------------------

async def withdraw(rig: Rig, call: CallInfo, result: DialogResult) -> None:
    """*0 mid-call: the event is logged as the adapters log it, under the call's primary purpose."""
    primary = PURPOSES[result.purpose]
    state = MidCallState.after_dialog(call, primary, result, "en")
    await rig.gate.ledger.append(state.event(rig.gate, EventKind.WITHDRAWN, "ari"))


async def test_withdrawal_withdraws_every_consent_purpose_of_the_call(
    db: str, conn: asyncpg.Connection, rig: Rig,
) -> None:
    call, result = await place_call(rig, "documentation+training", {"question-documentation": YES,
                                                                    "question-training": YES})
    assert result.purpose == "documentation" and result.recording_id is not None
    await withdraw(rig, call, result)
    # The files outlived the mid-call deletion (say it failed): nothing may use or keep them.
    paths = record(rig, result)
    assert await training.pending_recordings(conn, rig.recordings, PURPOSES) == []
    with pytest.raises(training.NotEligible):
        await make_copy(rig, conn, result.recording_id)
    report = await sweep(db, rig, T0 + DAY)
    assert [r["recording_id"] for r in report.recordings_deleted] == [result.recording_id]
    assert not any(p.exists() for p in paths)
    view = await decisions(conn, result.consent_id)
    assert view["training"]["withdrawn_at"] == view["documentation"]["withdrawn_at"] is not None


async def test_withdrawal_leaves_a_legal_obligation_purpose_alone(
    db: str, conn: asyncpg.Connection, rig: Rig,
) -> None:
    call, result = await place_call(rig, "mifid+training", {"question-training": YES})
    assert result.purpose == "mifid" and result.recording_id is not None
    await withdraw(rig, call, result)  # logged under mifid (legal obligation): it still withdraws training
    paths = record(rig, result)
    with pytest.raises(training.NotEligible):
        await make_copy(rig, conn, result.recording_id)
    assert (await sweep(db, rig, T0 + 91 * DAY)).recordings_deleted == []
    assert all(p.exists() for p in paths), "the legal obligation keeps the recording"
    view = await decisions(conn, result.consent_id)
    assert view["mifid"]["decision"] == "notified" and view["mifid"]["withdrawn_at"] is None
    assert view["training"]["decision"] == "granted" and view["training"]["withdrawn_at"] is not None


async def test_an_erased_training_decision_gets_no_copy_while_a_legal_obligation_keeps_the_recording(
    db: str, conn: asyncpg.Connection, rig: Rig,
) -> None:
    _, result = await place_call(rig, "training+mifid", {"question-training": YES})
    assert result.recording_id is not None
    paths = record(rig, result)
    erased = await subject.erase(conn, rig.gate.settings.hmac_key, rig.recordings, PURPOSES,
                                 subject.SubjectQuery(consent_id=result.consent_id), reason="letter",
                                 actor="test", clock=lambda: T0 + timedelta(minutes=5))
    assert erased.status == "partial" and [e["purpose"] for e in erased.erased] == ["training"]
    assert all(p.exists() for p in paths), "mifid keeps it"
    assert await training.pending_recordings(conn, rig.recordings, PURPOSES) == []
    with pytest.raises(training.NotEligible):
        await make_copy(rig, conn, result.recording_id)
    assert not rig.copies.exists()


async def test_a_grant_the_gate_reported_as_unavailable_keeps_nothing(
    db: str, conn: asyncpg.Connection, rig: Rig,
) -> None:
    """documentation's grant reached the database after the write timed out, so the gate logged
    ``unavailable`` for it and recorded for training only: documentation keeps nothing."""
    call = CallInfo(call_id=f"tp-{uuid.uuid4().hex[:16]}", caller_number="+45 20 30 40 50", language="en")
    consent_id, recording_id = uuid.uuid4(), uuid.uuid4().hex
    for purpose, kind, recording in (("documentation", EventKind.GRANTED, recording_id),
                                     ("documentation", EventKind.UNAVAILABLE, None),
                                     ("training", EventKind.GRANTED, recording_id)):
        await rig.gate.ledger.append(event_for(rig.gate, call, PURPOSES[purpose], kind, consent_id=consent_id,
                                               language="en", recording_id=recording, source="ari"))
    result = DialogResult(Decision.GRANTED, str(consent_id), recording_id, None, record_legs=True,
                          purpose="training", purposes=["training"])
    paths = record(rig, result)
    outcome = await make_copy(rig, conn, recording_id)
    assert outcome.created and outcome.original_deleted and not any(p.exists() for p in paths)
    assert (await decisions(conn, str(consent_id)))["documentation"]["decision"] == "unavailable"


async def test_a_legal_hold_keeps_the_original_until_released(
    db: str, conn: asyncpg.Connection, rig: Rig,
) -> None:
    call, result = await place_call(rig, "training", {"question-training": YES})
    assert result.recording_id is not None
    paths = record(rig, result)
    hold = await place_hold(conn, call_id=call.call_id, reason="complaint 17", actor="test", at=T0)
    outcome = await make_copy(rig, conn, result.recording_id)
    assert outcome.created and outcome.kept_because == "legal hold" and all(p.exists() for p in paths)
    assert await recording_tombstones(conn, result.recording_id) == []
    await release_hold(conn, hold, reason="closed", actor="test", at=T0 + DAY)
    rerun = await make_copy(rig, conn, result.recording_id)
    assert not rerun.created and rerun.original_deleted and not any(p.exists() for p in paths)
    assert len(await recording_tombstones(conn, result.recording_id)) == 1


async def test_files_left_behind_a_committed_tombstone_are_deleted_by_a_rerun(
    db: str, conn: asyncpg.Connection, rig: Rig,
) -> None:
    """The tombstone commits before the files go: a crash in between leaves files that a re-run
    deletes, under the same tombstone."""
    _, result = await place_call(rig, "training", {"question-training": YES})
    assert result.recording_id is not None
    record(rig, result)
    await make_copy(rig, conn, result.recording_id)
    left = record(rig, result)  # as if the process had died right after the commit
    rerun = await make_copy(rig, conn, result.recording_id)
    assert rerun.original_deleted and not any(p.exists() for p in left)
    assert len(await recording_tombstones(conn, result.recording_id)) == 1

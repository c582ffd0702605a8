"""Retention sweeper and legal hold on a real PostgreSQL and real files, with an injected clock.

Every test gets its own database (a copy of a migrated template), so a sweep with a clock years
ahead never touches another test's rows.  The helpers and fixtures here are shared with
test_subject.py and test_api.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from consent_gate import recordings
from consent_gate.admin import retention
from consent_gate.admin.retention import RetentionSweeper, list_holds, place_hold, release_hold
from consent_gate.config import Purpose
from consent_gate.core.events import EventKind, new_recording_id
from consent_gate.prompts.catalog import packaged_sounds_dir
from consent_gate_rig.ledgerdata import (
    DAY,
    FAIL_AT_COMMIT,
    HMAC_KEY,
    NON_PERSONAL,
    PURPOSES,
    T0,
    Clock,
    Decision,
    add_decision,
    add_event,
    rows,
    sweeper,
    tombstones,
    write_recording,
)

# -- shared helpers ---------------------------------------------------------------------------

























# -- retention boundaries -----------------------------------------------------------------------

async def test_recording_and_personal_fields_go_exactly_when_retention_ends(
    db: str, conn: asyncpg.Connection, recdir: Path,
) -> None:
    d = await add_decision(conn, at=T0, purpose="training", caller_number="+4520304050")
    files = write_recording(recdir, d.recording_id, legs=True)
    other = write_recording(recdir, new_recording_id())  # not in the ledger: never touched
    before = await rows(conn, d.consent_id)
    clock = Clock()

    report = await sweeper(db, recdir, clock.at(T0 + 90 * DAY - timedelta(seconds=1))).run()
    assert report.recordings_deleted == [] and report.records_redacted == []
    assert all(p.exists() for p in files)
    assert (await rows(conn, d.consent_id))[0]["caller_ref"] == d.caller_ref

    report = await sweeper(db, recdir, clock.at(T0 + 90 * DAY)).run()
    assert report.recordings_deleted == [{"recording_id": d.recording_id,
                                          "files": sorted(p.name for p in files)}]
    assert report.records_redacted == [{"consent_id": str(d.consent_id), "purpose": "training", "rows": 1}]
    assert not any(p.exists() for p in files)
    assert all(p.exists() for p in other)

    [after] = await rows(conn, d.consent_id)
    assert after["caller_ref"] is None and after["caller_number"] is None
    assert after["redacted_at"] == T0 + 90 * DAY
    assert {k: after[k] for k in NON_PERSONAL} == {k: before[0][k] for k in NON_PERSONAL}, "proof kept"

    [record] = await tombstones(conn, scope="record", consent_id=d.consent_id)
    assert record["kind"] == "retention" and record["rows_redacted"] == 1
    assert after["redaction_id"] == record["erasure_id"]
    assert "90 days" in record["reason"] and record["performed_at"] == T0 + 90 * DAY
    [recording] = await tombstones(conn, scope="recording", recording_id=d.recording_id)
    assert recording["kind"] == "retention" and sorted(recording["files"]) == sorted(p.name for p in files)
    # The tombstones hold nothing personal.
    for tomb in (record, recording):
        assert d.caller_ref not in json.dumps(tomb, default=str) and "4520304050" not in json.dumps(tomb, default=str)


async def test_a_second_run_is_a_no_op(db: str, conn: asyncpg.Connection, recdir: Path) -> None:
    d = await add_decision(conn, at=T0)
    write_recording(recdir, d.recording_id)
    clock = Clock(T0 + 400 * DAY)
    first = await sweeper(db, recdir, clock).run()
    assert len(first.recordings_deleted) == 1 and len(first.records_redacted) == 1
    again = await sweeper(db, recdir, clock.at(T0 + 800 * DAY)).run()
    assert again.recordings_deleted == [] and again.records_redacted == [] and again.busy == 0
    assert len(await tombstones(conn)) == 2


async def test_declined_decision_has_no_recording_but_its_personal_fields_expire_too(
    db: str, conn: asyncpg.Connection, recdir: Path,
) -> None:
    d = await add_decision(conn, at=T0, event=EventKind.DECLINED)
    assert d.recording_id is None
    report = await sweeper(db, recdir, Clock(T0 + 90 * DAY)).run()
    assert report.recordings_deleted == []
    assert [r["consent_id"] for r in report.records_redacted] == [str(d.consent_id)]
    [row] = await rows(conn, d.consent_id)
    assert row["caller_ref"] is None and row["event"] == "declined" and row["digit"] == "2"


async def test_legal_obligation_is_kept_five_years(db: str, conn: asyncpg.Connection, recdir: Path) -> None:
    d = await add_decision(conn, at=T0, purpose="mifid", event=EventKind.NOTIFIED)
    [path] = write_recording(recdir, d.recording_id)
    clock = Clock()
    await sweeper(db, recdir, clock.at(T0 + 1825 * DAY - timedelta(microseconds=1))).run()
    assert path.exists()
    await sweeper(db, recdir, clock.at(T0 + 1825 * DAY)).run()
    assert not path.exists()
    assert (await rows(conn, d.consent_id))[0]["caller_ref"] is None


async def test_unknown_purpose_is_kept_and_reported(db: str, conn: asyncpg.Connection, recdir: Path) -> None:
    d = await add_decision(conn, at=T0, purpose="retired-purpose")
    [path] = write_recording(recdir, d.recording_id)
    report = await sweeper(db, recdir, Clock(T0 + 5000 * DAY)).run()
    assert report.unknown_purposes == ["retired-purpose"]
    assert path.exists() and (await rows(conn, d.consent_id))[0]["caller_ref"] == d.caller_ref


async def test_dry_run_deletes_nothing(db: str, conn: asyncpg.Connection, recdir: Path) -> None:
    d = await add_decision(conn, at=T0)
    [path] = write_recording(recdir, d.recording_id)
    report = await sweeper(db, recdir, Clock(T0 + 100 * DAY)).run(dry_run=True)
    assert report.recordings_deleted == [{"recording_id": d.recording_id, "files": [path.name]}]
    assert path.exists() and await tombstones(conn) == []
    assert (await rows(conn, d.consent_id))[0]["redacted_at"] is None


# -- granular purposes --------------------------------------------------------------------------

async def test_one_granted_one_declined_keeps_only_the_granted_purpose(
    db: str, conn: asyncpg.Connection, recdir: Path,
) -> None:
    call = f"call-{uuid.uuid4().hex[:12]}"
    granted = await add_decision(conn, at=T0, purpose="documentation", call_id=call)
    declined = await add_decision(conn, at=T0, purpose="training", call_id=call, event=EventKind.DECLINED)
    [path] = write_recording(recdir, granted.recording_id)
    clock = Clock()
    # Day 90: the declined training decision's personal fields go; the documentation recording stays.
    report = await sweeper(db, recdir, clock.at(T0 + 90 * DAY)).run()
    assert [r["consent_id"] for r in report.records_redacted] == [str(declined.consent_id)]
    assert path.exists() and (await rows(conn, granted.consent_id))[0]["caller_ref"] is not None
    await sweeper(db, recdir, clock.at(T0 + 365 * DAY)).run()
    assert not path.exists() and (await rows(conn, granted.consent_id))[0]["caller_ref"] is None


async def test_a_recording_shared_by_two_purposes_lives_as_long_as_the_longer(
    db: str, conn: asyncpg.Connection, recdir: Path,
) -> None:
    consent_id, call = uuid.uuid4(), f"call-{uuid.uuid4().hex[:12]}"
    rec = new_recording_id()
    training = await add_decision(conn, at=T0, purpose="training", consent_id=consent_id, call_id=call, recording_id=rec)
    documentation = await add_decision(conn, at=T0, purpose="documentation", consent_id=consent_id, call_id=call,
                                       recording_id=rec)
    paths = write_recording(recdir, rec, legs=True)
    clock = Clock()
    report = await sweeper(db, recdir, clock.at(T0 + 91 * DAY)).run()
    assert report.recordings_deleted == []
    assert report.records_redacted == [{"consent_id": str(consent_id), "purpose": "training", "rows": 1}]
    assert all(p.exists() for p in paths)
    by_purpose = {r["purpose"]: r for r in await rows(conn, consent_id)}
    assert by_purpose["training"]["caller_ref"] is None
    assert by_purpose["documentation"]["caller_ref"] == documentation.caller_ref == training.caller_ref
    report = await sweeper(db, recdir, clock.at(T0 + 365 * DAY)).run()
    assert [r["recording_id"] for r in report.recordings_deleted] == [rec]
    assert not any(p.exists() for p in paths)


async def test_withdrawn_consent_ends_the_recording_before_retention(
    db: str, conn: asyncpg.Connection, recdir: Path,
) -> None:
    d = await add_decision(conn, at=T0, purpose="documentation")
    [path] = write_recording(recdir, d.recording_id)
    await add_event(conn, d, EventKind.WITHDRAWN, T0 + timedelta(minutes=3))
    report = await sweeper(db, recdir, Clock(T0 + 2 * DAY)).run()
    assert [r["recording_id"] for r in report.recordings_deleted] == [d.recording_id] and not path.exists()
    # The proof of the decision and of its withdrawal stays until the retention period ends.
    assert report.records_redacted == []
    assert [r["event"] for r in await rows(conn, d.consent_id)] == ["granted", "withdrawn"]


# -- legal hold ----------------------------------------------------------------------------------

@pytest.mark.parametrize("on", ["call", "caller"])
async def test_legal_hold_blocks_deletion_until_released(
    db: str, conn: asyncpg.Connection, recdir: Path, on: str,
) -> None:
    d = await add_decision(conn, at=T0)
    [path] = write_recording(recdir, d.recording_id)
    bystander = await add_decision(conn, at=T0, number="+4511111111")
    [bystander_path] = write_recording(recdir, bystander.recording_id)
    clock = Clock(T0 + 10 * DAY)
    target = {"call_id": d.call_id} if on == "call" else {"caller_ref": d.caller_ref}
    hold_id = await place_hold(conn, reason="case 2031-17", actor="legal@example", at=clock(), **target)

    report = await sweeper(db, recdir, clock.at(T0 + 200 * DAY)).run()
    assert path.exists() and (await rows(conn, d.consent_id))[0]["caller_ref"] == d.caller_ref
    assert {"recording_id": d.recording_id} in report.held
    assert not bystander_path.exists(), "a hold on one caller keeps nobody else's data"

    await release_hold(conn, hold_id, reason="case closed", actor="legal@example", at=clock())
    assert await list_holds(conn) == []
    report = await sweeper(db, recdir, clock.at(T0 + 201 * DAY)).run()
    assert not path.exists() and (await rows(conn, d.consent_id))[0]["caller_ref"] is None
    [hold] = await list_holds(conn, include_released=True)
    assert hold.hold_id == hold_id and hold.reason == "case 2031-17" and hold.release_reason == "case closed"
    log = await conn.fetch("SELECT action FROM legal_holds WHERE hold_id = $1 ORDER BY seq", hold_id)
    assert [r["action"] for r in log] == ["placed", "released"]


async def test_holds_are_validated_and_released_once(conn: asyncpg.Connection) -> None:
    with pytest.raises(ValueError):
        await place_hold(conn, reason="x", actor="a", at=T0)
    with pytest.raises(ValueError):
        await place_hold(conn, call_id="c", caller_ref="0" * 64, reason="x", actor="a", at=T0)
    with pytest.raises(ValueError):
        await place_hold(conn, caller_ref="not-a-hash", reason="x", actor="a", at=T0)
    with pytest.raises(ValueError):
        await place_hold(conn, call_id="c", reason=" ", actor="a", at=T0)
    hold_id = await place_hold(conn, call_id="c", reason="x", actor="a", at=T0)
    await release_hold(conn, hold_id, reason="done", actor="a", at=T0)
    with pytest.raises(retention.HoldNotFound):
        await release_hold(conn, hold_id, reason="again", actor="a", at=T0)
    with pytest.raises(retention.HoldNotFound):
        await release_hold(conn, "not-a-uuid", reason="x", actor="a", at=T0)
    with pytest.raises(asyncpg.PostgresError, match="append-only"):
        await conn.execute("DELETE FROM legal_holds")


# -- concurrency -----------------------------------------------------------------------------------

async def test_concurrent_sweepers_delete_everything_exactly_once(
    db: str, conn: asyncpg.Connection, recdir: Path,
) -> None:
    decisions = [await add_decision(conn, at=T0 + i * timedelta(minutes=1), number=f"+45{10000000 + i}")
                 for i in range(40)]
    for d in decisions:
        write_recording(recdir, d.recording_id, legs=True)
    clock = Clock(T0 + 100 * DAY)
    reports = await asyncio.gather(*(sweeper(db, recdir, clock).run() for _ in range(4)))

    assert list(recdir.iterdir()) == []
    deleted = [r["recording_id"] for rep in reports for r in rep.recordings_deleted]
    redacted = [r["consent_id"] for rep in reports for r in rep.records_redacted]
    assert sorted(deleted) == sorted(d.recording_id for d in decisions), "each recording once"
    assert sorted(redacted) == sorted(str(d.consent_id) for d in decisions), "each decision once"
    counts = await conn.fetch("SELECT scope, count(*) AS n, count(DISTINCT coalesce(recording_id, consent_id::text))"
                              " AS distinct_n FROM data_erasures GROUP BY scope ORDER BY scope")
    assert [(r["scope"], r["n"], r["distinct_n"]) for r in counts] == [("record", 40, 40), ("recording", 40, 40)]
    assert await conn.fetchval("SELECT count(*) FROM consent_events WHERE caller_ref IS NOT NULL") == 0


async def test_an_item_another_sweeper_holds_is_skipped_then_done(
    db: str, conn: asyncpg.Connection, recdir: Path,
) -> None:
    d = await add_decision(conn, at=T0)
    [path] = write_recording(recdir, d.recording_id)
    other = await asyncpg.connect(db)
    try:
        async with other.transaction():  # "another sweeper" is in the middle of this recording
            await other.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", retention.RECORDING_LOCK_NS,
                                d.recording_id)
            report = await sweeper(db, recdir, Clock(T0 + 100 * DAY)).run()
            assert report.busy == 1 and report.recordings_deleted == [] and path.exists()
    finally:
        await other.close()
    report = await sweeper(db, recdir, Clock(T0 + 100 * DAY)).run()
    assert [r["recording_id"] for r in report.recordings_deleted] == [d.recording_id] and not path.exists()


async def wait_for_lock_wait(observer: asyncpg.Connection, timeout: float = 10.0) -> None:
    """Until some session waits for the hold lock (seen in pg_locks; polled with a bound)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await observer.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND classid = $1 AND objid = $2", *retention.HOLD_LOCK):
        assert loop.time() < deadline, "nobody waited for the hold lock"
        await asyncio.sleep(0.01)


async def test_a_hold_placed_during_a_sweep_waits_for_the_item_in_flight(
    db: str, conn: asyncpg.Connection, recdir: Path,
) -> None:
    d = await add_decision(conn, at=T0)
    other = await asyncpg.connect(db)
    try:
        async with other.transaction():  # an item transaction of a running sweep
            await retention.share_hold_lock(other)
            placing = asyncio.create_task(place_hold(conn, call_id=d.call_id, reason="r", actor="a", at=T0))
            await wait_for_lock_wait(other)
            assert not placing.done(), "placing a hold waits until the item in flight is finished"
        await asyncio.wait_for(placing, 10)
    finally:
        await other.close()
    assert [h.call_id for h in await list_holds(conn)] == [d.call_id]


# -- append-only stays true --------------------------------------------------------------------

async def test_only_the_audited_redaction_can_change_a_row(db: str, conn: asyncpg.Connection, recdir: Path) -> None:
    d = await add_decision(conn, at=T0)
    victim = await add_decision(conn, at=T0 + 50 * DAY, number="+4599999999")  # not expired yet
    await sweeper(db, recdir, Clock(T0 + 100 * DAY)).run()
    [tomb] = await tombstones(conn, scope="record", consent_id=d.consent_id)

    attempts = [
        # no redaction context at all
        ("UPDATE consent_events SET caller_ref = NULL WHERE consent_id = $1", victim.consent_id),
        ("DELETE FROM consent_events WHERE consent_id = $1", victim.consent_id),
    ]
    for sql, arg in attempts:
        with pytest.raises(asyncpg.PostgresError, match="append-only"):
            await conn.execute(sql, arg)
    # Forging the setting with a real tombstone id: still only its own group, only personal fields.
    with pytest.raises(asyncpg.PostgresError, match="audited redaction"):
        async with conn.transaction():
            await conn.execute("SELECT set_config('consent_gate.redaction_id', $1, true)", str(tomb["erasure_id"]))
            await conn.execute("UPDATE consent_events SET caller_ref = NULL, redacted_at = now(), redaction_id = $2"
                               " WHERE consent_id = $1", victim.consent_id, tomb["erasure_id"])
    assert (await rows(conn, victim.consent_id))[0]["caller_ref"] == victim.caller_ref

    # A row of the tombstone's own group, but changing a non-personal field: refused.
    d2 = await add_decision(conn, at=T0 + 99 * DAY, consent_id=d.consent_id, call_id=d.call_id, recording_id=None,
                            event=EventKind.WITHDRAWN)
    with pytest.raises(asyncpg.PostgresError, match="audited redaction"):
        async with conn.transaction():
            await conn.execute("SELECT set_config('consent_gate.redaction_id', $1, true)", str(tomb["erasure_id"]))
            await conn.execute("UPDATE consent_events SET caller_ref = NULL, digit = '9', redacted_at = now(),"
                               " redaction_id = $2 WHERE event_id = $1", d2.events[0].event_id, tomb["erasure_id"])
    # A refusal is no licence to redact.
    refusal = await retention.write_erasure(conn, kind="refusal", scope="record", reason="r", actor="a", at=T0,
                                            group=(await retention.fetch_groups(
                                                conn, retention.KEYS_ONE_GROUP, victim.consent_id, "training"))[0])
    with pytest.raises(asyncpg.PostgresError, match="no erasure tombstone"):
        await conn.fetchval("SELECT consent_redact($1, now())", refusal)
    await place_hold(conn, call_id=victim.call_id, reason="r", actor="a", at=T0)
    for table in ("data_erasures", "legal_holds"):
        with pytest.raises(asyncpg.PostgresError, match="append-only"):
            await conn.execute(f"UPDATE {table} SET actor = 'x'")
        with pytest.raises(asyncpg.PostgresError, match="append-only"):
            await conn.execute(f"TRUNCATE {table}")


# -- files ----------------------------------------------------------------------------------------

def test_recording_files_match_only_the_id(recdir: Path) -> None:
    rec = new_recording_id()
    mine = write_recording(recdir, rec, legs=True)
    other = new_recording_id()
    write_recording(recdir, other)
    for junk in (f"{rec}.wav.bak~", f"x{rec}.wav", f"{rec}-../x.wav".replace("/", "_"), f"{rec}.WAV"):
        (recdir / junk).write_bytes(b"")
    assert recordings.recording_files(recdir, rec) == sorted(mine)
    for bad in ("../../etc/passwd", rec.upper(), rec[:-1], rec + "0", "*", f"{rec}\n", ""):
        with pytest.raises(ValueError):
            recordings.recording_files(recdir, bad)


# -- command line -----------------------------------------------------------------------------------

def test_cli_sweep_and_hold(db: str, recdir: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str], restore_logging: None) -> None:
    """The CLI on the real clock: an old decision goes, a fresh one stays; holds by number."""
    now = datetime.now(UTC)

    async def setup() -> tuple[Decision, Decision]:
        connection = await asyncpg.connect(db)
        try:
            old = await add_decision(connection, at=now - 100 * DAY, number="+45 70 70 70 70")
            fresh = await add_decision(connection, at=now - DAY)
            return old, fresh
        finally:
            await connection.close()

    old, fresh = asyncio.run(setup())
    [old_path] = write_recording(recdir, old.recording_id)
    [fresh_path] = write_recording(recdir, fresh.recording_id)
    monkeypatch.setenv("CONSENT_GATE_DSN", db)
    monkeypatch.setenv("CONSENT_GATE_HMAC_KEY", HMAC_KEY.decode())
    monkeypatch.setenv("CONSENT_GATE_RECORDINGS_DIR", str(recdir))
    monkeypatch.delenv("CONSENT_GATE_CONFIG", raising=False)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    retention.register_cli(sub)

    def run(*argv: str, stdin: str | None = None) -> str:
        if stdin is not None:
            import io
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        args = parser.parse_args(list(argv))
        assert args.func(args) == 0
        return capsys.readouterr().out

    run("hold", "place", "--caller-number", "-", "--reason", "dispute 42", stdin="+4570707070\n")
    [listing] = json.loads(run("hold", "list", "--json"))
    assert listing["caller_ref"] == old.caller_ref and listing["reason"] == "dispute 42"
    assert "4570707070" not in json.dumps(listing)
    report = json.loads(run("retention", "sweep", "--json"))
    assert report["recordings_deleted"] == [] and old_path.exists() and report["held"]
    run("hold", "release", listing["hold_id"], "--reason", "settled")
    dry = json.loads(run("retention", "sweep", "--dry-run", "--json"))
    assert [r["recording_id"] for r in dry["recordings_deleted"]] == [old.recording_id] and old_path.exists()
    assert "deleted 1 recording(s)" in run("retention", "sweep")
    assert not old_path.exists() and fresh_path.exists()


# -- shipped samples ----------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def test_sample_purpose_catalogue_loads_with_both_businesses() -> None:
    import re
    import tomllib

    from consent_gate.config import load_settings

    settings = load_settings(ROOT / "deploy" / "consent-gate.toml", env={"CONSENT_GATE_HMAC_KEY": "k" * 32},
                             require_ari=False)
    training, broker = settings.purposes["training"], settings.purposes["mifid-orders"]
    assert training.legal_basis == "consent" and training.training_copy and training.retention_days == 90
    assert broker.legal_basis == "legal-obligation" and broker.retention_days == 1825
    assert broker.prompt == "notice-legal-obligation" and not broker.training_copy
    for purpose in settings.purposes.values():
        assert (packaged_sounds_dir() / "en" / f"{purpose.prompt}.wav").is_file(), purpose.prompt
    # The TOML shown in docs/purposes.md is the shipped sample, table for table.
    docs = (ROOT / "docs" / "purposes.md").read_text()
    shown: dict[str, Any] = {}
    for block in re.findall(r"```toml\n(.*?)```", docs, re.S):
        shown.update(tomllib.loads(block)["purposes"])
    assert shown == tomllib.loads((ROOT / "deploy" / "consent-gate.toml").read_text())["purposes"]


def test_retention_timer_and_service_verify(tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    service = (ROOT / "deploy" / "consent-gate-retention.service").read_text()
    timer = (ROOT / "deploy" / "consent-gate-retention.timer").read_text()
    assert "retention sweep --config /etc/consent-gate/consent-gate.toml" in service
    assert "Type=oneshot" in service and "Unit=consent-gate-retention.service" in timer
    assert "Persistent=true" in timer
    assert not [line for line in service.splitlines()
                if line.startswith("Environment=CONSENT_GATE_") and "_FILE=" not in line], "no secret in the unit"
    entry = shutil.which("consent-gate") or str(Path(sys.executable).with_name("consent-gate"))
    assert Path(entry).exists(), "consent-gate is not installed (pip install -e .)"
    (tmp_path / "consent-gate-retention.service").write_text(service.replace("/usr/local/bin/consent-gate", entry))
    (tmp_path / "consent-gate-retention.timer").write_text(timer)
    done = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "consent-gate-retention.service"),
                           str(tmp_path / "consent-gate-retention.timer")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "consent-gate-retention" not in done.stderr, done.stderr


# -- files go after the commit ----------------------------------------------------------------

async def test_a_sweep_whose_commit_fails_leaves_the_files(db: str, conn: asyncpg.Connection, recdir: Path) -> None:
    d = await add_decision(conn, at=T0, purpose="training")
    files = write_recording(recdir, d.recording_id, legs=True)
    await conn.execute(FAIL_AT_COMMIT)
    with pytest.raises(asyncpg.RaiseError, match="refused at commit"):
        await sweeper(db, recdir, Clock(T0 + 90 * DAY)).run()
    assert all(p.exists() for p in files)
    assert await tombstones(conn, recording_id=d.recording_id) == []
    await conn.execute("DROP TRIGGER test_refuse_at_commit ON data_erasures")
    report = await sweeper(db, recdir, Clock(T0 + 90 * DAY)).run()
    assert [r["recording_id"] for r in report.recordings_deleted] == [d.recording_id]
    assert not any(p.exists() for p in files)


async def test_files_left_after_a_committed_tombstone_are_deleted_by_the_next_sweep(
    db: str, conn: asyncpg.Connection, recdir: Path,
) -> None:
    """A crash between the commit and the unlink (or an unlink error) leaves files whose
    deletion is already recorded: the next sweep finds them by listing the directory."""
    d = await add_decision(conn, at=T0, purpose="training")
    files = write_recording(recdir, d.recording_id, legs=True)
    unrelated = write_recording(recdir, new_recording_id())  # no tombstone: never touched
    stuck = files[1]
    stuck.unlink()
    stuck.mkdir()  # unlink() fails on it (EISDIR)
    report = await sweeper(db, recdir, Clock(T0 + 90 * DAY)).run()
    [failed] = report.files_not_deleted
    assert failed["recording_id"] == d.recording_id and [f["name"] for f in failed["files"]] == [stuck.name]
    assert stuck.exists() and len(await tombstones(conn, scope="recording", recording_id=d.recording_id)) == 1
    stuck.rmdir()
    stuck.write_bytes(b"RIFF")
    dry = await sweeper(db, recdir, Clock(T0 + 91 * DAY)).run(dry_run=True)
    assert dry.leftovers_deleted == [{"recording_id": d.recording_id, "files": [stuck.name]}] and stuck.exists()
    report = await sweeper(db, recdir, Clock(T0 + 91 * DAY)).run()
    assert report.leftovers_deleted == [{"recording_id": d.recording_id, "files": [stuck.name]}]
    assert report.files_not_deleted == [] and not stuck.exists()
    assert all(p.exists() for p in unrelated)


# -- retention_days bounds ----------------------------------------------------------------------

@pytest.mark.parametrize("days", [3_000_000, 10**9, 10**12])
async def test_a_retention_beyond_the_calendar_keeps_the_data_and_does_not_crash_the_sweep(
    db: str, conn: asyncpg.Connection, recdir: Path, days: int,
) -> None:
    """A catalogue built in code (not through the settings loader) can still hold such a value."""
    purposes = {**PURPOSES, "training": Purpose("training", "consent", "question-training", days)}
    kept = await add_decision(conn, at=T0, purpose="training")
    [kept_file] = write_recording(recdir, kept.recording_id)
    due = await add_decision(conn, at=T0, purpose="documentation")
    [due_file] = write_recording(recdir, due.recording_id)
    report = await RetentionSweeper(db, recdir, purposes, clock=Clock(T0 + 400 * DAY)).run()
    assert [r["recording_id"] for r in report.recordings_deleted] == [due.recording_id]
    assert kept_file.exists() and not due_file.exists()


@pytest.mark.parametrize("days, ok", [(1, True), (36500, True), (0, False), (36501, False), (10**12, False)])
def test_retention_days_is_bounded_when_the_settings_load(tmp_path: Path, days: int, ok: bool) -> None:
    from consent_gate.config import ConfigError, load_settings

    config = tmp_path / "c.toml"
    config.write_text(f'[purposes.archive]\nlegal_basis = "consent"\nretention_days = {days}\n')
    if ok:
        settings = load_settings(config, env={"CONSENT_GATE_HMAC_KEY": "k" * 32}, require_ari=False)
        assert settings.purposes["archive"].retention_days == days
        return
    with pytest.raises(ConfigError, match=rf"purposes\.archive\.retention_days: {days} is outside 1\.\.36500 days"):
        load_settings(config, env={"CONSENT_GATE_HMAC_KEY": "k" * 32}, require_ari=False)


def test_the_recordings_directory_must_be_0700_as_the_gate_requires(tmp_path: Path) -> None:
    """Issue 16, case 7: no group or other bits at all (the 2770 shared-group setup is gone; the
    tools reach the directory with CAP_DAC_OVERRIDE), and the problem says how to fix it."""
    directory = tmp_path / "recordings"
    directory.mkdir()
    for mode, private in ((0o700, True), (0o2700, False), (0o2770, False), (0o750, False),
                          (0o710, False), (0o701, False), (0o755, False), (0o2777, False)):
        directory.chmod(mode)
        problem = recordings.dir_mode_problem(directory)
        assert (problem is None) == private, oct(mode)
        if problem is not None:
            assert f"mode {mode:04o} is not 0700" in problem and f"chmod 00700 {directory}" in problem
    link = tmp_path / "link"
    link.symlink_to(directory)
    directory.chmod(0o700)
    assert "symbolic link" in (recordings.dir_mode_problem(link) or "")
    assert recordings.dir_mode_problem(tmp_path / "missing") is None
    # GNU chmod keeps a directory's setgid bit on "chmod 0700": the hint's "00700" clears it.
    directory.chmod(0o2770)
    subprocess.run(["chmod", "00700", str(directory)], check=True, timeout=30)
    assert recordings.dir_mode_problem(directory) is None

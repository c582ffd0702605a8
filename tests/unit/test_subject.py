"""Data-subject export and erasure on a real PostgreSQL and real files (fixtures: tests/unit/conftest.py, data: consent_gate_rig.ledgerdata)."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import threading
import uuid
import zipfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from consent_gate.admin import subject
from consent_gate.admin.retention import place_hold, release_hold
from consent_gate.admin.subject import SubjectNotFound, SubjectQuery
from consent_gate.core.events import EventKind, new_recording_id
from consent_gate_rig.ledgerdata import (
    DAY,
    FAIL_AT_COMMIT,
    HMAC_KEY,
    PURPOSES,
    T0,
    Clock,
    add_decision,
    add_event,
    add_training_copy,
    rows,
    sweeper,
    tombstones,
    write_recording,
)

NUMBER = "+45 31 41 59 26"
OTHER = "+45 27 18 28 18"


async def do_export(conn: asyncpg.Connection, recdir: Path, query: SubjectQuery) -> zipfile.ZipFile:
    out = io.BytesIO()
    await subject.export(conn, HMAC_KEY, recdir, PURPOSES, query, out, clock=Clock(T0 + DAY))
    out.seek(0)
    return zipfile.ZipFile(out)


def records_of(archive: zipfile.ZipFile) -> dict[str, Any]:
    return json.loads(archive.read("consent-records.json"))


async def do_erase(conn: asyncpg.Connection, recdir: Path, query: SubjectQuery, at=T0 + DAY, **kw: Any):
    return await subject.erase(conn, HMAC_KEY, recdir, PURPOSES, query, reason="caller asked by phone",
                               actor="dpo@example", request_ref="CRM-1", clock=Clock(at), **kw)


# -- export -----------------------------------------------------------------------------------

async def test_export_by_number_has_this_callers_recordings_and_records_only(
    conn: asyncpg.Connection, recdir: Path,
) -> None:
    first = await add_decision(conn, at=T0, number=NUMBER, purpose="training")
    second = await add_decision(conn, at=T0 + DAY, number="+4531415926", purpose="documentation")
    declined = await add_decision(conn, at=T0 + 2 * DAY, number=NUMBER, event=EventKind.DECLINED)
    other = await add_decision(conn, at=T0, number=OTHER)
    mine = write_recording(recdir, first.recording_id, legs=True) + write_recording(recdir, second.recording_id)
    write_recording(recdir, other.recording_id)

    archive = await do_export(conn, recdir, SubjectQuery(caller_number="0045 31415926".replace("0045", "+45")))
    assert sorted(archive.namelist()) == sorted(
        ["consent-records.json", "README.txt"] + [f"recordings/{p.name}" for p in mine])
    for path in mine:
        assert archive.read(f"recordings/{path.name}") == path.read_bytes()
    records = records_of(archive)
    assert records["format"] == "consent-gate-subject-export/1"
    assert {d["consent_id"] for d in records["decisions"]} == {
        str(first.consent_id), str(second.consent_id), str(declined.consent_id)}
    by_id = {d["consent_id"]: d for d in records["decisions"]}
    assert by_id[str(first.consent_id)]["decision"] == "granted"
    assert by_id[str(first.consent_id)]["kept_until"] == (T0 + 90 * DAY).isoformat()
    assert by_id[str(declined.consent_id)]["decision"] == "declined"
    assert {e["caller_ref"] for e in records["events"]} == {first.caller_ref}
    files = {f["name"]: f for r in records["recordings"] for f in r["files"]}
    assert files[mine[0].name]["sha256"] == hashlib.sha256(mine[0].read_bytes()).hexdigest()
    # Nothing about the other caller anywhere in the archive.
    blob = b"".join(archive.read(n) for n in archive.namelist())
    for leak in (other.caller_ref, str(other.consent_id), other.recording_id, other.call_id):
        assert leak.encode() not in blob


async def test_export_by_consent_reference_covers_that_call(conn: asyncpg.Connection, recdir: Path) -> None:
    call = "call-granular-1"
    training = await add_decision(conn, at=T0, number=NUMBER, call_id=call, purpose="training")
    documentation = await add_decision(conn, at=T0, number=NUMBER, call_id=call, purpose="documentation",
                                       event=EventKind.DECLINED)
    later_call = await add_decision(conn, at=T0 + DAY, number=NUMBER)
    write_recording(recdir, training.recording_id)
    records = records_of(await do_export(conn, recdir, SubjectQuery(consent_id=str(training.consent_id))))
    assert {d["consent_id"] for d in records["decisions"]} == {str(training.consent_id),
                                                               str(documentation.consent_id)}
    assert str(later_call.consent_id) not in json.dumps(records)
    assert records["requested_by"] == "consent-reference"


@pytest.mark.parametrize("query", [
    SubjectQuery(caller_number="+45 00 00 00 00"),
    SubjectQuery(caller_number="anonymous"),
    SubjectQuery(consent_id=str(uuid.UUID(int=7))),
])
async def test_unknown_person_is_not_found(conn: asyncpg.Connection, recdir: Path, query: SubjectQuery) -> None:
    await add_decision(conn, at=T0, number=NUMBER)
    with pytest.raises(SubjectNotFound):
        await do_export(conn, recdir, query)
    with pytest.raises(SubjectNotFound):
        await do_erase(conn, recdir, query)
    assert await tombstones(conn) == []


def test_query_needs_exactly_one_well_formed_key() -> None:
    for bad in (dict(), dict(caller_number="1", consent_id=str(uuid.uuid4())), dict(consent_id="../etc"),
                dict(caller_number="1" * 65)):
        with pytest.raises(ValueError):
            SubjectQuery(**bad)


# -- erase ------------------------------------------------------------------------------------

async def test_erase_leaves_no_file_and_no_personal_field_but_a_tombstone(
    db: str, conn: asyncpg.Connection, recdir: Path,
) -> None:
    a = await add_decision(conn, at=T0, number=NUMBER, caller_number="+4531415926")
    b = await add_decision(conn, at=T0 + DAY, number=NUMBER, purpose="documentation")
    await add_event(conn, b, EventKind.WITHDRAWN, T0 + DAY + timedelta(minutes=2))
    other = await add_decision(conn, at=T0, number=OTHER)
    files = write_recording(recdir, a.recording_id, legs=True) + write_recording(recdir, b.recording_id)
    [other_file] = write_recording(recdir, other.recording_id)

    result = await do_erase(conn, recdir, SubjectQuery(caller_number=NUMBER))
    assert result.status == "erased" and result.refused == []
    assert sorted(r["recording_id"] for r in result.recordings_deleted) == sorted([a.recording_id, b.recording_id])
    assert not any(p.exists() for p in files) and other_file.exists()
    for d in (a, b):
        for row in await rows(conn, d.consent_id):
            assert row["caller_ref"] is None and row["caller_number"] is None
            assert row["redacted_at"] == T0 + DAY and row["redaction_id"] is not None
            assert row["event"] in ("granted", "withdrawn") and row["recording_id"] == d.recording_id
        [tomb] = await tombstones(conn, scope="record", consent_id=d.consent_id)
        assert tomb["kind"] == "erasure" and tomb["reason"] == "caller asked by phone"
        assert tomb["request_ref"] == "CRM-1" and tomb["actor"] == "dpo@example"
    recording_tombs = await tombstones(conn, scope="recording")
    assert {t["recording_id"] for t in recording_tombs} == {a.recording_id, b.recording_id}
    assert all(t["kind"] == "erasure" for t in recording_tombs)
    assert (await rows(conn, other.consent_id))[0]["caller_ref"] == other.caller_ref

    # After erasure the number matches nothing any more; the reference still shows the proof.
    with pytest.raises(SubjectNotFound):
        await do_export(conn, recdir, SubjectQuery(caller_number=NUMBER))
    archive = await do_export(conn, recdir, SubjectQuery(consent_id=str(a.consent_id)))
    assert [n for n in archive.namelist() if n.startswith("recordings/")] == []
    records = records_of(archive)
    assert records["decisions"][0]["personal_data_removed"] and records["decisions"][0]["erased"]
    assert {e["kind"] for e in records["erasures"]} == {"erasure"}

    # Idempotent: again by reference changes nothing; the sweeper later finds nothing to do.
    again = await do_erase(conn, recdir, SubjectQuery(consent_id=str(a.consent_id)))
    assert again.status == "erased" and again.erased == [
        {"consent_id": str(a.consent_id), "purpose": "training", "rows": 0}] and again.recordings_deleted == []
    report = await sweeper(db, recdir, Clock(T0 + 1000 * DAY)).run()
    assert {r["consent_id"] for r in report.records_redacted} == {str(other.consent_id)}
    assert [r["recording_id"] for r in report.recordings_deleted] == [other.recording_id]


async def test_legal_obligation_erasure_is_refused_and_logged(conn: asyncpg.Connection, recdir: Path) -> None:
    broker = await add_decision(conn, at=T0, number=NUMBER, purpose="mifid", event=EventKind.NOTIFIED)
    [path] = write_recording(recdir, broker.recording_id)
    result = await do_erase(conn, recdir, SubjectQuery(caller_number=NUMBER))
    assert result.status == "refused" and result.erased == []
    [refused] = result.refused
    assert "Art. 17(3)(b)" in refused["reason"] and "2036-02-28" in refused["reason"]  # T0 + 1825 days
    assert path.exists() and (await rows(conn, broker.consent_id))[0]["caller_ref"] == broker.caller_ref
    [log] = await tombstones(conn, consent_id=broker.consent_id)
    assert log["kind"] == "refusal" and "Art. 17(3)(b)" in log["reason"] and log["files"] == []
    assert log["request_ref"] == "CRM-1"


async def test_mixed_request_erases_the_consent_part_and_keeps_the_shared_recording(
    conn: asyncpg.Connection, recdir: Path,
) -> None:
    """One call: recorded under a legal obligation and, by consent, for training too."""
    rec, call = new_recording_id(), "call-desk-7"
    mifid = await add_decision(conn, at=T0, number=NUMBER, purpose="mifid", event=EventKind.NOTIFIED,
                               call_id=call, recording_id=rec)
    training = await add_decision(conn, at=T0, number=NUMBER, purpose="training", call_id=call, recording_id=rec)
    paths = write_recording(recdir, rec, legs=True)
    result = await do_erase(conn, recdir, SubjectQuery(consent_id=str(training.consent_id)))
    assert result.status == "partial"
    assert [e["consent_id"] for e in result.erased] == [str(training.consent_id)]
    assert [r["consent_id"] for r in result.refused] == [str(mifid.consent_id)]
    assert result.recordings_deleted == []
    assert result.recordings_kept == [{"recording_id": rec,
                                       "reason": "needed for purpose 'mifid' (legal-obligation)"}]
    assert all(p.exists() for p in paths)
    assert (await rows(conn, training.consent_id))[0]["caller_ref"] is None
    assert (await rows(conn, mifid.consent_id))[0]["caller_ref"] == mifid.caller_ref


async def test_legal_hold_refuses_erasure_until_released(conn: asyncpg.Connection, recdir: Path) -> None:
    d = await add_decision(conn, at=T0, number=NUMBER)
    [path] = write_recording(recdir, d.recording_id)
    hold_id = await place_hold(conn, call_id=d.call_id, reason="court order 12", actor="legal", at=T0)
    result = await do_erase(conn, recdir, SubjectQuery(caller_number=NUMBER))
    assert result.status == "refused" and "Art. 17(3)(e)" in result.refused[0]["reason"]
    assert path.exists() and (await rows(conn, d.consent_id))[0]["caller_ref"] == d.caller_ref
    await release_hold(conn, hold_id, reason="order lifted", actor="legal", at=T0 + DAY)
    result = await do_erase(conn, recdir, SubjectQuery(caller_number=NUMBER), at=T0 + 2 * DAY)
    assert result.status == "erased" and not path.exists()
    assert [t["kind"] for t in await tombstones(conn, scope="record", consent_id=d.consent_id)] == [
        "refusal", "erasure"]




async def test_erase_removes_the_training_copy_of_the_recording(
    conn: asyncpg.Connection, recdir: Path, tmp_path: Path,
) -> None:
    d = await add_decision(conn, at=T0, number=NUMBER)
    copies = tmp_path / "copies"
    copy_id = await add_training_copy(conn, d.recording_id, copies)
    result = await do_erase(conn, recdir, SubjectQuery(caller_number=NUMBER), copies_dir=copies)
    assert result.training_copies_erased == 1 and not (copies / f"{copy_id}.wav").exists()
    assert await conn.fetchval("SELECT count(*) FROM training_copies WHERE copy_id = $1", copy_id) == 0
    assert result.status == "erased" and result.training_copies_left == 0


async def test_erase_without_the_copies_directory_says_the_copy_is_left(
    conn: asyncpg.Connection, recdir: Path, tmp_path: Path,
) -> None:
    d = await add_decision(conn, at=T0, number=NUMBER)
    copies = tmp_path / "copies"
    copy_id = await add_training_copy(conn, d.recording_id, copies)
    result = await do_erase(conn, recdir, SubjectQuery(caller_number=NUMBER))
    assert (result.status, result.training_copies_erased, result.training_copies_left) == ("partial", 0, 1)
    assert (copies / f"{copy_id}.wav").exists()  # still linked, so a second request can find it
    again = await do_erase(conn, recdir, SubjectQuery(consent_id=str(d.consent_id)), copies_dir=copies)
    assert again.training_copies_erased == 1 and not (copies / f"{copy_id}.wav").exists()


async def test_an_erasure_whose_commit_fails_leaves_every_file(
    conn: asyncpg.Connection, recdir: Path, tmp_path: Path,
) -> None:
    """The files go only after the transaction that records their deletion has committed."""
    d = await add_decision(conn, at=T0, number=NUMBER)
    files = write_recording(recdir, d.recording_id, legs=True)
    copies = tmp_path / "copies"
    copy_id = await add_training_copy(conn, d.recording_id, copies)
    await conn.execute(FAIL_AT_COMMIT)  # a deferred check: fails at COMMIT, after every statement ran
    with pytest.raises(asyncpg.RaiseError, match="refused at commit"):
        await do_erase(conn, recdir, SubjectQuery(caller_number=NUMBER), copies_dir=copies)
    assert all(p.exists() for p in files) and (copies / f"{copy_id}.wav").exists()
    assert await tombstones(conn, recording_id=d.recording_id) == []
    assert (await rows(conn, d.consent_id))[0]["caller_ref"] == d.caller_ref


async def test_a_file_that_cannot_be_deleted_makes_the_erasure_partial_and_is_retried(
    conn: asyncpg.Connection, recdir: Path,
) -> None:
    d = await add_decision(conn, at=T0, number=NUMBER)
    [mix] = write_recording(recdir, d.recording_id)
    stuck = recdir / f"{d.recording_id}-caller.wav"
    stuck.mkdir()  # unlink() fails on it (EISDIR), as it would on a busy or protected file
    result = await do_erase(conn, recdir, SubjectQuery(caller_number=NUMBER))
    assert result.status == "partial" and not mix.exists() and stuck.exists()
    assert result.recordings_deleted == [{"recording_id": d.recording_id, "files": [mix.name]}]
    [left] = result.files_not_deleted
    assert left["recording_id"] == d.recording_id and [f["name"] for f in left["files"]] == [stuck.name]
    [tomb] = await tombstones(conn, scope="recording", recording_id=d.recording_id)
    assert sorted(tomb["files"]) == sorted([mix.name, stuck.name])  # what was decided
    # The cause goes away (here: the obstacle becomes an ordinary file): erasing again removes it.
    stuck.rmdir()
    write_recording(recdir, d.recording_id)  # and a stray copy of the mix reappears, say
    stuck.write_bytes(b"RIFF")
    again = await do_erase(conn, recdir, SubjectQuery(consent_id=str(d.consent_id)))
    assert again.status == "erased" and again.files_not_deleted == []
    assert again.recordings_deleted == [{"recording_id": d.recording_id, "files": sorted([mix.name, stuck.name])}]
    assert not mix.exists() and not stuck.exists()


async def test_export_includes_the_training_copy(conn: asyncpg.Connection, recdir: Path, tmp_path: Path) -> None:
    d = await add_decision(conn, at=T0, number=NUMBER)
    write_recording(recdir, d.recording_id)
    copies = tmp_path / "copies"
    copy_id = await add_training_copy(conn, d.recording_id, copies)
    out = io.BytesIO()
    await subject.export(conn, HMAC_KEY, recdir, PURPOSES, SubjectQuery(caller_number=NUMBER), out,
                         clock=Clock(T0 + DAY), copies_dir=copies)
    archive = zipfile.ZipFile(out)
    assert archive.read(f"training-copies/{copy_id}.wav") == (copies / f"{copy_id}.wav").read_bytes()
    [listed] = records_of(archive)["training_copies"]
    assert (listed["copy_id"], listed["recording_id"], listed["available"]) == (copy_id, d.recording_id, True)
    assert "training-copies/" in archive.read("README.txt").decode()
    # Without the directory the copy is still listed (the person learns it exists), not included.
    listed_only = records_of(await do_export(conn, recdir, SubjectQuery(caller_number=NUMBER)))
    assert [(c["copy_id"], c["available"]) for c in listed_only["training_copies"]] == [(copy_id, False)]


async def test_erasure_and_sweepers_at_once_delete_each_thing_once(
    db: str, conn: asyncpg.Connection, recdir: Path,
) -> None:
    decisions = [await add_decision(conn, at=T0, number=NUMBER) for _ in range(10)]
    decisions += [await add_decision(conn, at=T0, number=f"+45{40000000 + i}") for i in range(10)]
    for d in decisions:
        write_recording(recdir, d.recording_id, legs=True)
    other = await asyncpg.connect(db)
    try:
        clock = Clock(T0 + 100 * DAY)
        await asyncio.gather(
            subject.erase(other, HMAC_KEY, recdir, PURPOSES, SubjectQuery(caller_number=NUMBER), reason="r",
                          actor="a", clock=clock),
            sweeper(db, recdir, clock).run(), sweeper(db, recdir, clock).run())
    finally:
        await other.close()
    await sweeper(db, recdir, Clock(T0 + 100 * DAY)).run()  # whatever was busy the first time
    assert list(recdir.iterdir()) == []
    counts = await conn.fetch("SELECT recording_id, count(*) AS n FROM data_erasures WHERE scope = 'recording'"
                              " GROUP BY recording_id")
    assert sorted(r["recording_id"] for r in counts) == sorted(d.recording_id for d in decisions)
    assert {r["n"] for r in counts} == {1}
    assert await conn.fetchval("SELECT count(*) FROM consent_events WHERE caller_ref IS NOT NULL") == 0


# -- command line ----------------------------------------------------------------------------

def test_cli_export_and_erase(db: str, recdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str], restore_logging: None) -> None:
    async def setup():
        connection = await asyncpg.connect(db)
        try:
            return await add_decision(connection, at=T0, number=NUMBER)
        finally:
            await connection.close()

    d = asyncio.run(setup())
    [path] = write_recording(recdir, d.recording_id)
    monkeypatch.setenv("CONSENT_GATE_DSN", db)
    monkeypatch.setenv("CONSENT_GATE_HMAC_KEY", HMAC_KEY.decode())
    monkeypatch.setenv("CONSENT_GATE_RECORDINGS_DIR", str(recdir))
    monkeypatch.delenv("CONSENT_GATE_CONFIG", raising=False)
    monkeypatch.delenv("CONSENT_GATE_TRAINING_DIR", raising=False)
    parser = argparse.ArgumentParser()
    subject.register_cli(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str, stdin: str | None = None) -> int:
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        args = parser.parse_args(list(argv))
        return args.func(args)

    out = tmp_path / "export.zip"
    assert run("subject", "export", "--caller-number", "-", "--out", str(out), stdin=NUMBER + "\n") == 0
    assert os.stat(out).st_mode & 0o777 == 0o600
    assert zipfile.ZipFile(out).read(f"recordings/{path.name}") == path.read_bytes()
    with pytest.raises(SystemExit, match="exists"):
        run("subject", "export", "--consent-id", str(d.consent_id), "--out", str(out))
    assert run("subject", "export", "--consent-id", str(uuid.uuid4()), "--out", str(tmp_path / "none.zip")) == 2
    assert not (tmp_path / "none.zip").exists()
    capsys.readouterr()
    assert run("subject", "erase", "--consent-id", str(d.consent_id), "--reason", "letter 3",
               "--request-ref", "T-9") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "erased" and not path.exists()
    assert run("subject", "erase", "--caller-number", NUMBER) == 2


# -- export: only regular files are read ------------------------------------------------------

async def test_export_skips_a_fifo_and_a_symlink_instead_of_hanging(
    conn: asyncpg.Connection, recdir: Path, tmp_path: Path,
) -> None:
    d = await add_decision(conn, at=T0, number=NUMBER)
    [mix] = write_recording(recdir, d.recording_id)
    fifo = recdir / f"{d.recording_id}-caller.wav"
    os.mkfifo(fifo, 0o600)  # opening it for reading blocks until a writer comes
    secret = tmp_path / "not-a-recording"
    secret.write_bytes(b"secret")
    (recdir / f"{d.recording_id}-agent.wav").symlink_to(secret)
    records = await subject.collect_records(conn, HMAC_KEY, SubjectQuery(caller_number=NUMBER), PURPOSES,
                                            now=T0 + DAY)
    out = io.BytesIO()
    outcome: list[Any] = []
    worker = threading.Thread(target=lambda: outcome.append(subject.write_archive(records, recdir, out)),
                              daemon=True)
    worker.start()
    worker.join(timeout=20)
    if worker.is_alive():  # release the blocked open() so the test fails instead of hanging
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=20)
        pytest.fail("the export blocked on a FIFO in the recordings directory")
    [summary] = outcome
    assert summary.files == [mix.name]
    archive = zipfile.ZipFile(io.BytesIO(out.getvalue()))
    assert [n for n in archive.namelist() if n.startswith("recordings/")] == [f"recordings/{mix.name}"]
    [listed] = records_of(archive)["recordings"]
    assert sorted(s["name"] for s in listed["skipped"]) == sorted([fifo.name, f"{d.recording_id}-agent.wav"])
    assert {s["skipped"] for s in listed["skipped"]} == {"not a regular file"}
    assert b"secret" not in out.getvalue()

"""End to end: a real SIP call is recorded after the consent key, then the caller's data is
exported and erased through the data-subject HTTP API (real aiohttp server on 127.0.0.1).

The caller presents a number of its own (P-Asserted-Identity), so the request by number covers
this call and nothing any other test left in the shared ledger.
"""

from __future__ import annotations

import io
import json
import secrets
import zipfile
from pathlib import Path

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from consent_gate.admin import api
from consent_gate.admin.retention import recording_files as files_of_recording
from consent_gate.admin.training import wav_is_closed
from consent_gate.config import DEFAULT_PURPOSES
from consent_gate.core.events import caller_reference
from consent_gate_rig import audio
from consent_gate_rig.calls import Phones, finish, ledger_events, run_gate_call, wait_until
from consent_gate_rig.harness import AsteriskLog, GateService
from consent_gate_rig.sandbox import AsteriskSandbox

pytestmark = pytest.mark.integration

TOKEN = secrets.token_hex(24)


async def test_real_call_is_recorded_then_exported_then_erased(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, pg_dsn: str,
    speech_wav: Path, test_tag: str, tmp_path: Path,
) -> None:
    number = "+4591" + "".join(secrets.choice("0123456789") for _ in range(6))
    pai = f'"Subject Request" <sip:{number}@127.0.0.1>'
    call = await run_gate_call(phones, asterisk_log, test_tag, exten="200", key="1", key_after_prompt=1.0,
                               headers={"P-Asserted-Identity": pai})
    assert call.result.status == "granted"
    recording_id, consent_id = call.result.recording_id, call.result.consent_id
    await call.caller.play_wav(speech_wav)
    await call.caller.play_silence(0.5)
    await finish(call)

    recordings = asterisk.recordings_dir
    mixed = recordings / f"{recording_id}.wav"
    await wait_until(lambda: mixed.exists() and all(wav_is_closed(p, 0.5) for p in files_of_recording(
        recordings, recording_id)), 20, "the recording files to be closed")
    on_disk = files_of_recording(recordings, recording_id)
    assert mixed in on_disk and all(p.stat().st_mode & 0o777 == 0o600 for p in on_disk)
    [event] = await ledger_events(pg_dsn, consent_id)
    key = gate.hmac_key.encode()
    assert event["caller_ref"] == caller_reference(key, number), "the gate stored this caller's pseudonym"

    app = api.create_app(dsn=pg_dsn, hmac_key=key, recordings_dir=recordings, purposes=DEFAULT_PURPOSES,
                         token=TOKEN)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        # Without the token: nothing, whatever the request.
        denied = await client.post("/v1/subject/export", json={"caller_number": number})
        assert denied.status == 401

        # -- export by number ------------------------------------------------------------------
        response = await client.post("/v1/subject/export", json={"caller_number": number}, headers=headers)
        assert response.status == 200, await response.text()
        archive = zipfile.ZipFile(io.BytesIO(await response.read()))
        for path in on_disk:
            assert archive.read(f"recordings/{path.name}") == path.read_bytes()
        exported = tmp_path / "exported.wav"
        exported.write_bytes(archive.read(f"recordings/{mixed.name}"))
        rate, samples = audio.read_wav(exported)
        assert audio.rms_dbfs(samples) > -45, "the exported recording holds the call's audio"
        records = json.loads(archive.read("consent-records.json"))
        [decision] = records["decisions"]
        assert decision["consent_id"] == consent_id and decision["decision"] == "granted"
        assert decision["recording_ids"] == [recording_id] and decision["purpose"] == "training"
        assert {e["consent_id"] for e in records["events"]} == {consent_id}

        # -- erase by the consent reference ----------------------------------------------------
        response = await client.post("/v1/subject/erase", headers=headers, json={
            "consent_id": consent_id, "reason": "caller asked at the end of the call", "request_ref": test_tag})
        assert response.status == 200
        result = await response.json()
        assert result["status"] == "erased"
        assert result["recordings_deleted"][0]["recording_id"] == recording_id

        # Nothing left to find by number; the reference still shows the non-personal proof.
        gone = await client.post("/v1/subject/export", json={"caller_number": number}, headers=headers)
        assert gone.status == 404

    assert files_of_recording(recordings, recording_id) == [], "no file of the recording is left"
    assert not any(p.name.startswith(recording_id) for p in recordings.iterdir())
    [row] = await ledger_events(pg_dsn, consent_id)
    assert row["caller_ref"] is None and row["caller_number"] is None and row["redacted_at"] is not None
    assert row["event"] == "granted" and row["recording_id"] == recording_id and row["digit"] == "1"
    connection = await asyncpg.connect(pg_dsn)
    try:
        tombs = await connection.fetch(
            "SELECT kind, scope, recording_id, files, request_ref FROM data_erasures"
            " WHERE consent_id = $1::uuid OR recording_id = $2 ORDER BY scope", consent_id, recording_id)
    finally:
        await connection.close()
    assert [(t["kind"], t["scope"]) for t in tombs] == [("erasure", "record"), ("erasure", "recording")]
    assert sorted(tombs[1]["files"]) == sorted(p.name for p in on_disk)
    assert all(t["request_ref"] == test_tag for t in tombs)
    assert number not in json.dumps([dict(t) for t in tombs], default=str)

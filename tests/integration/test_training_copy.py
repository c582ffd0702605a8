"""A training copy made end to end from a real recorded call.

A real SIP caller dials the gate (extension 200, purpose ``training``), presses 1, speaks; the
agent answers and plays a tone.  Asterisk records the mixed call and the two legs.  Then the
``consent-gate training make`` command (a real process, as an admin or the worker would run
it) makes the copy.  The copy must have the caller's leg changed, the agent's leg intact, and
nothing identifying in the file, its name or its index row; the original must be gone.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import numpy as np
import pytest

from consent_gate.admin import anonymise as an
from consent_gate.admin import training
from consent_gate_rig import audio
from consent_gate_rig.calls import Phones, finish, recording_files, run_gate_call, wait_until
from consent_gate_rig.harness import AsteriskLog, GateService
from consent_gate_rig.sandbox import AsteriskSandbox

pytestmark = pytest.mark.integration

HEX32 = re.compile(r"^[0-9a-f]{32}$")
CALLER_NAME = "Jane Example 4512345678"
PROJECT = Path(__file__).resolve().parents[2]


def envelope_distance_db(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of the LPC spectral envelopes (dB) over frames with speech."""
    size, distances = 320, []
    for start in range(0, min(len(a), len(b)) - size, size // 2):
        fa = a[start:start + size].astype(float) * np.hanning(size)
        fb = b[start:start + size].astype(float) * np.hanning(size)
        if audio.rms_dbfs(a[start:start + size].tolist()) < -40:
            continue
        ea = -20 * np.log10(np.abs(np.fft.rfft(an.lpc(fa, 12), 512)) + 1e-9)
        eb = -20 * np.log10(np.abs(np.fft.rfft(an.lpc(fb, 12), 512)) + 1e-9)
        distances.append(np.mean(np.abs((ea - ea.mean()) - (eb - eb.mean()))))
    assert distances, "no speech frames in the caller leg"
    return float(np.mean(distances))


async def test_training_copy_from_a_real_call(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, pg_dsn: str,
    speech_wav: Path, test_tag: str, recordings_before: set[str], tmp_path: Path,
) -> None:
    call = await run_gate_call(phones, asterisk_log, test_tag, exten="200", key="1", caller_name=CALLER_NAME)
    assert call.result.status == "granted" and HEX32.match(call.result.recording_id)
    recording_id = call.result.recording_id
    await call.caller.play_wav(speech_wav)          # the caller speaks ...
    assert call.agent is not None
    await call.agent.play_tone(1000, 1.5)           # ... the agent answers with a tone
    await call.caller.play_silence(0.3)
    await finish(call)

    files = training.RecordingFiles.of(asterisk.recordings_dir, recording_id)
    names = {p.name for p in files.all()}
    await wait_until(lambda: names <= recording_files(asterisk), 15, "the mixed file and both legs")
    settle = training.TrainingSettings().settle_seconds  # what the command waits for, too
    await wait_until(lambda: all(training.wav_is_closed(p, settle) for p in (files.caller, files.agent)), 20,
                     "Asterisk to close the legs")
    rate, caller_original = an.read_wav_mono(files.caller)
    _, agent_original = an.read_wav_mono(files.agent)
    assert rate == 8000
    assert audio.rms_dbfs(caller_original.tolist()) > -40, "the caller's speech is in the caller leg"
    assert audio.goertzel_dbfs(agent_original.tolist(), rate, 1000) > -30, "the agent's tone is in the agent leg"
    assert audio.goertzel_dbfs(caller_original.tolist(), rate, 1000) < -45, "the legs are apart"

    copies = tmp_path / "training"
    env = dict(os.environ, CONSENT_GATE_DSN=pg_dsn)
    env.pop("CONSENT_GATE_CONFIG", None)
    made = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "consent_gate.admin.training", "training", "make", "--recording-id", recording_id,
         "--recordings-dir", str(asterisk.recordings_dir), "--copies-dir", str(copies)],
        env=env, capture_output=True, text=True, timeout=120, cwd=PROJECT)
    assert made.returncode == 0, made.stdout + made.stderr
    assert "original deleted" in made.stdout
    assert recording_id not in made.stdout + made.stderr, "the command does not print the link"

    # The copy: one file, a random name, no metadata.
    [copy] = list(copies.iterdir())
    copy_id = copy.stem
    assert HEX32.match(copy_id) and copy.suffix == ".wav" and copy_id != recording_id
    assert audio.riff_chunks(copy) == ["fmt ", "data"]
    raw = copy.read_bytes()
    for secret in (recording_id, call.result.consent_id, test_tag, "4512345678", "Jane"):
        assert secret.encode() not in raw and secret not in copy.name
    assert copy.stat().st_mode & 0o777 == 0o600
    today = datetime.now(UTC)
    assert copy.stat().st_mtime == datetime(today.year, today.month, 1, tzinfo=UTC).timestamp()

    # The audio: caller leg changed, agent leg intact.
    import wave

    with wave.open(str(copy), "rb") as handle:
        assert (handle.getnchannels(), handle.getsampwidth(), handle.getframerate()) == (2, 2, 8000)
        stereo = np.frombuffer(handle.readframes(handle.getnframes()), "<i2").reshape(-1, 2)
    caller_copy, agent_copy = stereo[:, 0], stereo[:, 1]
    assert np.array_equal(agent_copy[: len(agent_original)], agent_original), "agent leg kept as recorded"
    n = len(caller_original)
    assert not np.array_equal(caller_copy[:n], caller_original)
    correlation = float(np.corrcoef(caller_copy[:n].astype(float), caller_original.astype(float))[0, 1])
    distance = envelope_distance_db(caller_original, caller_copy[:n])
    print(f"\ncaller leg: correlation with the original {correlation:.2f}, envelope distance {distance:.1f} dB")
    assert correlation < 0.95
    assert distance > 1.5
    level_in, level_out = audio.rms_dbfs(caller_original.tolist()), audio.rms_dbfs(caller_copy[:n].tolist())
    assert abs(level_in - level_out) < 1.0, "the caller's speech is still there, as loud"
    assert not caller_copy[max(n, len(agent_original)):].any(), "only silence after the legs"

    # The index row holds nothing that points to the call; the link is in the ledger only.
    connection = await asyncpg.connect(pg_dsn)
    try:
        row = dict(await connection.fetchrow("SELECT * FROM training_copies WHERE copy_id = $1", copy_id))
        link = await connection.fetchval("SELECT copy_id FROM training_copy_links WHERE recording_id = $1",
                                         recording_id)
    finally:
        await connection.close()
    assert set(row) == {"copy_id", "period", "purpose", "caller_leg", "agent_leg", "method", "delete_after"}
    assert row["period"] == f"{today.year:04d}-{today.month:02d}"
    assert (row["purpose"], row["caller_leg"], row["agent_leg"]) == ("training", "mcadams", "original")
    for value in map(str, row.values()):
        for secret in (recording_id, call.result.consent_id, test_tag, "4512345678"):
            assert secret not in value
    assert link == copy_id

    # The original is gone: only the copy remains.
    assert not any(p.exists() for p in files.all())
    assert recording_files(asterisk) == recordings_before

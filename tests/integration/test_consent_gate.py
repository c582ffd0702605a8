"""The consent gate through the real Asterisk with real SIP calls, on both paths.

Every test runs three times with identical expectations: through the ARI service (extension
200, ``Gosub(consent-gate,...)``), through the AGI script (extension 300,
``Gosub(consent-gate-agi,...)``) and through the FastAGI server (extension 350, the same
``Gosub(consent-gate-agi,...)`` with ``CONSENT_GATE_AGI`` an ``agi://`` URL).  Every case checks what the caller's choice must and must not
cause: a recording only after the consent key, the agent reached in every case but a hangup,
the ledger telling the truth.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from consent_gate_rig import audio
from consent_gate_rig.calls import (
    AGI_PATHS,
    HEX32,
    Phones,
    drain_incoming,
    finish,
    ledger_events,
    prompt_version,
    recording_files,
    recording_set,
    run_gate_call,
    wait_until,
)
from consent_gate_rig.harness import AsteriskLog, FastAgiService, GateService
from consent_gate_rig.sandbox import AsteriskSandbox
from consent_gate_rig.softphone import NoIncomingCall

pytestmark = pytest.mark.integration























# -- consent ------------------------------------------------------------------------------

async def test_consent_key_records_only_after_the_keypress(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService,
    pg_dsn: str, speech_wav: Path, test_tag: str, recordings_before: set[str], exten: str, gate_path: str,
    ledger_source: str,
) -> None:
    call = await run_gate_call(phones, asterisk_log, test_tag, exten=exten, key="1", key_after_prompt=2.0)
    assert call.result.status == "granted"
    assert HEX32.match(call.result.recording_id)
    agent_answered = time.monotonic()
    await call.caller.play_wav(speech_wav)
    await call.caller.play_silence(0.5)
    hung_up = time.monotonic()
    await finish(call)

    expected = f"{call.result.recording_id}.wav"
    await wait_until(lambda: expected in recording_files(asterisk), 10, "the recording file")
    await wait_until(lambda: recording_files(asterisk) - recordings_before == recording_set(call.result.recording_id),
                     10, "the mix and the two legs")
    assert recording_files(asterisk) - recordings_before == recording_set(call.result.recording_id), \
        "exactly one new recording (mix + legs)"
    for name in recording_set(call.result.recording_id):
        assert (asterisk.recordings_dir / name).stat().st_mode & 0o777 == 0o600
    path = asterisk.recordings_dir / expected
    rate, samples = audio.read_wav(path)
    length = len(samples) / rate
    # Nothing from before the keypress: the recording is no longer than keypress → hangup.
    assert call.keyed_at is not None
    assert length <= (hung_up - call.keyed_at) + 1.0, (length, hung_up - call.keyed_at)
    # The 25 s question is not in it either way: the file is shorter than prompt + speech.
    # ARI mode records from the keypress on; AGI mode only while bridged (MixMonitor's b
    # option: no *0 could be heard while the agent rings), so there the speech comes first.
    speech_start = 0.0 if gate_path in AGI_PATHS else agent_answered - call.keyed_at
    caller_speech = audio.segment(samples, rate, speech_start + 0.3, speech_start + 3.0)
    assert audio.rms_dbfs(caller_speech) > -35, "the caller's speech is in the recording"
    # The agent heard the caller too (the bridge works after the gate).
    assert audio.rms_dbfs(call.agent.heard_segment(0.5, 3.0)) > -35

    [event] = await ledger_events(pg_dsn, call.result.consent_id)
    assert event["event"] == "granted" and event["digit"] == "1"
    assert event["recording_id"] == call.result.recording_id
    assert event["prompt_version"] == prompt_version("en", "question-training")
    assert event["language"] == "en" and event["purpose"] == "training" and event["legal_basis"] == "consent"
    assert re.fullmatch(r"[0-9a-f]{64}", event["caller_ref"]) and event["caller_number"] is None
    assert event["prompt_started_at"] <= event["decided_at"] <= event["occurred_at"]
    assert not event["via_journal"] and event["source"] == ledger_source

    # Keypress → MixMonitor start, from Asterisk's own log timestamps (reported, not asserted).
    log_text = asterisk_log.text()
    dtmf = re.search(r"\[(\S+ \S+)\] DTMF\[.*DTMF end '1' received", log_text)
    started = re.search(r"\[(\S+ \S+)\] VERBOSE\[.*Begin MixMonitor Recording", log_text)
    if dtmf and started:
        from datetime import datetime
        fmt = "%Y-%m-%d %H:%M:%S.%f"
        delta = datetime.strptime(started.group(1), fmt) - datetime.strptime(dtmf.group(1), fmt)
        print(f"\nkeypress→MixMonitor: {delta.total_seconds() * 1000:.0f} ms")


@pytest.mark.parametrize("line_name, language", [("caller", "en"), ("caller_da", "da")])
async def test_prompt_in_the_channel_language(
    asterisk_log: AsteriskLog, phones: Phones, gate: GateService, pg_dsn: str, test_tag: str,
    line_name: str, language: str, exten: str,
) -> None:
    call = await run_gate_call(phones, asterisk_log, test_tag, exten=exten, line=getattr(phones, line_name), key="2")
    assert re.search(rf"Playing '[^']*/consent-gate/{language}/question-training\.", asterisk_log.text())
    # The caller heard the prompt (audio, not just a log line).
    assert audio.rms_dbfs(call.caller.heard_segment(0.2, 1.0)) > -40
    assert call.result.status == "declined"
    await finish(call)
    [event] = await ledger_events(pg_dsn, call.result.consent_id)
    assert event["language"] == language
    assert event["prompt_version"] == prompt_version(language, "question-training")


async def test_sip_info_dtmf_is_accepted_too(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, test_tag: str,
    exten: str,
) -> None:
    call = await run_gate_call(phones, asterisk_log, test_tag, exten=exten, line=phones.caller_info, key="1")
    assert call.result.status == "granted"
    await call.caller.play_silence(1.0)
    await finish(call)
    await wait_until(lambda: f"{call.result.recording_id}.wav" in recording_files(asterisk), 10, "recording")


# -- no consent: nothing recorded, same next step ----------------------------------------

async def test_decline_key_records_nothing(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, pg_dsn: str,
    speech_wav: Path, test_tag: str, recordings_before: set[str], exten: str,
) -> None:
    call = await run_gate_call(phones, asterisk_log, test_tag, exten=exten, key="2")
    assert call.result.status == "declined" and call.result.recording_id == ""
    await call.caller.play_wav(speech_wav)
    await finish(call)
    assert recording_files(asterisk) == recordings_before
    assert "MixMonitor(" not in asterisk_log.text()
    [event] = await ledger_events(pg_dsn, call.result.consent_id)
    assert event["event"] == "declined" and event["digit"] == "2" and event["recording_id"] is None


async def test_silence_is_not_consent(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, pg_dsn: str,
    test_tag: str, recordings_before: set[str], exten: str,
) -> None:
    # Question (≈25 s) + 5 s, asked twice: the result comes after about a minute.
    call = await run_gate_call(phones, asterisk_log, test_tag, exten=exten, result_timeout=90)
    assert call.result.status == "no-input"
    assert len(re.findall(r"Playing '[^']*/question-training\.", asterisk_log.text())) == 2
    await finish(call)
    assert recording_files(asterisk) == recordings_before
    [event] = await ledger_events(pg_dsn, call.result.consent_id)
    assert event["event"] == "no-input" and event["digit"] is None and event["detail"]
    assert '"attempts": 2' in event["detail"]


async def test_invalid_key_then_silence_records_nothing(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, pg_dsn: str,
    test_tag: str, recordings_before: set[str], exten: str,
) -> None:
    call = await run_gate_call(phones, asterisk_log, test_tag, exten=exten, key="7", result_timeout=90)
    assert call.result.status == "no-input"
    assert re.search(r"Playing '[^']*/invalid\.", asterisk_log.text())
    await finish(call)
    assert recording_files(asterisk) == recordings_before
    [event] = await ledger_events(pg_dsn, call.result.consent_id)
    assert event["event"] == "no-input" and '"invalid_keys": ["7"]' in event["detail"]


async def test_hangup_during_the_prompt_is_logged_as_abandoned(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, pg_dsn: str,
    test_tag: str, recordings_before: set[str], exten: str, ledger_source: str,
) -> None:
    await drain_incoming(phones.agent)
    call = await phones.caller.call(phones.uri(exten), headers={"X-Test-Call": test_tag})
    await call.wait_answered(10)
    await asterisk_log.wait_for(r"Playing '[^']*/question-training\.", 10)
    since = time.time()
    await call.hangup()
    connection = await asyncpg.connect(pg_dsn)
    try:
        query = ("SELECT * FROM consent_events WHERE event = 'abandoned' AND source = $1"
                 " AND stored_at >= to_timestamp($2)")
        rows: list = []

        async def stored() -> bool:
            rows[:] = await connection.fetch(query, ledger_source, since - 1)
            return bool(rows)

        with contextlib.suppress(TimeoutError):  # the count below says what was missing
            await wait_until(stored, 15, "the abandoned event", interval=0.1)
    finally:
        await connection.close()
    assert len(rows) == 1, "one abandoned event for the hung-up call"
    assert rows[0]["recording_id"] is None and rows[0]["digit"] is None
    with pytest.raises(NoIncomingCall):
        await phones.agent.wait_incoming(3)
    assert recording_files(asterisk) == recordings_before
    assert "consent-result: test=" + test_tag not in asterisk_log.text()


@contextlib.contextmanager
def agi_script_broken(asterisk: AsteriskSandbox) -> Iterator[None]:
    """The AGI equivalent of 'the app is down': Asterisk cannot execute the script."""
    launcher = asterisk.host_dir / "agi-bin" / "consent-gate-agi"
    launcher.chmod(0o600)
    try:
        yield
    finally:
        launcher.chmod(0o755)


async def test_gate_down_means_unavailable_and_the_call_goes_on(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService,
    fastagi: FastAgiService, test_tag: str, recordings_before: set[str], exten: str, gate_path: str,
) -> None:
    """The ARI service stopped, the AGI script not executable, the FastAGI server stopped
    (AGI() cannot connect: AGISTATUS=FAILURE): "unavailable" at once, the call goes on."""
    if gate_path == "ari":
        await gate.stop()
    if gate_path == "fastagi":
        await fastagi.stop()
    try:
        with agi_script_broken(asterisk) if gate_path == "agi" else contextlib.nullcontext():
            started = time.monotonic()
            call = await run_gate_call(phones, asterisk_log, test_tag, exten=exten, result_timeout=10,
                                       answered_by_gate=False)
        assert call.result.status == "unavailable" and call.result.recording_id == ""
        assert time.monotonic() - started < 8, "the gate returns at once when it is down"
        await call.caller.send_dtmf("1")  # pressing "1" now changes nothing
        await call.caller.play_silence(1.0)
        await finish(call)
        assert recording_files(asterisk) == recordings_before
    finally:
        await gate.start()
        await fastagi.start()


# -- AGI mode: caller data reaches the script's environment only without control characters --

# 310: the AGI script, 360: the FastAGI server (the same dialplan check guards both).
CALLER_NAME_EXTENSIONS = pytest.mark.parametrize("exten", ["310", "360"], ids=["agi", "fastagi"])


@CALLER_NAME_EXTENSIONS
async def test_agi_caller_name_with_a_line_break_is_refused_at_the_gate(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, pg_dsn: str,
    test_tag: str, recordings_before: set[str], exten: str,
) -> None:
    """A caller name from a lookup with a line break in it (extension 310 turns "~" in
    X-Test-Name into one) would reach res_agi as ``agi_calleridname: Eve`` plus a second
    ``agi_uniqueid`` line.  The gate refuses it before the script runs: "unavailable", never
    asked, never recorded, and the call goes on to the agent."""
    call = await run_gate_call(phones, asterisk_log, test_tag, exten=exten, result_timeout=10,
                               headers={"X-Test-Name": "Eve~agi_uniqueid: 1.2"}, answered_by_gate=False)
    assert (call.result.status, call.result.consent_id, call.result.recording_id) == ("unavailable", "", "")
    log_text = asterisk_log.text()
    assert "caller data with a control character" in log_text
    assert "question-training" not in log_text and "Launched AGI Script" not in log_text
    await call.caller.send_dtmf("1")
    await call.caller.play_silence(1.0)
    await finish(call)
    assert recording_files(asterisk) == recordings_before
    connection = await asyncpg.connect(pg_dsn)
    try:
        assert await connection.fetchval("SELECT count(*) FROM consent_events WHERE call_id = '1.2'") == 0
    finally:
        await connection.close()


@CALLER_NAME_EXTENSIONS
async def test_agi_danish_caller_name_is_asked_as_usual(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, test_tag: str,
    exten: str,
) -> None:
    call = await run_gate_call(phones, asterisk_log, test_tag, exten=exten, key="1",
                               headers={"X-Test-Name": "Søren Ærø-Åberg (privat)"})
    assert call.result.status == "granted"
    await call.caller.play_silence(1.0)
    await finish(call)
    await wait_until(lambda: f"{call.result.recording_id}.wav" in recording_files(asterisk), 10, "recording")

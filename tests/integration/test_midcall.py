"""Mid-call rights through the real Asterisk (ARI service, and AGI mode where it applies):
withdrawal, the caller recording too, the agent's notices (also after a transfer) and the
secure pause for card data.

Audio checks: the parties stay silent around a notice, so what their phones capture then is
the notice; a window of the same length before the key is the silence to compare with.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from consent_gate_rig import audio
from consent_gate_rig.calls import (
    Phones,
    drain_incoming,
    finish,
    ledger_events,
    recording_files,
    recording_set,
    run_gate_call,
    wait_for_event,
    wait_until,
)
from consent_gate_rig.harness import AsteriskLog, GateService
from consent_gate_rig.sandbox import AsteriskSandbox
from consent_gate_rig.softphone import PhoneCall

pytestmark = pytest.mark.integration

SILENT_DBFS = -55.0
HEARD_DBFS = -40.0




def level(call: PhoneCall, start: float, end: float) -> float:
    """What the phone heard between two moments (monotonic clock), in dBFS."""
    assert call.answered_at is not None
    return audio.rms_dbfs(call.heard_segment(start - call.answered_at, end - call.answered_at))


async def asyncio_log_end(log: AsteriskLog) -> None:
    """MixMonitor has closed its files (so nothing can re-create them after this)."""
    await log.wait_for(r"End MixMonitor Recording", 15)


async def hear_window(call: PhoneCall, seconds: float) -> tuple[float, float]:
    start = time.monotonic()
    await call.play_silence(seconds)
    return start, time.monotonic()


async def test_agent_hears_the_notice_and_caller_withdraws(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, pg_dsn: str,
    speech_wav: Path, test_tag: str, recordings_before: set[str],
) -> None:
    call = await run_gate_call(phones, asterisk_log, test_tag, key="1")
    assert call.result.status == "granted"
    agent = call.agent
    # Agent notice at answer: "this call is recorded for training" (the caller is silent).
    start, end = await hear_window(call.caller, 3.0)
    assert level(agent, start, end) > HEARD_DBFS, "the agent heard the recording notice"
    await call.caller.play_wav(speech_wav)
    await wait_until(lambda: (asterisk.recordings_dir / f"{call.result.recording_id}.wav").exists(), 5,
                     "the recording to exist before the withdrawal")
    quiet_start, quiet_end = await hear_window(call.caller, 1.5)
    await call.caller.send_dtmf("*0")
    withdrawn = await wait_for_event(pg_dsn, call.result.consent_id, "withdrawn")
    start, end = await hear_window(call.caller, 3.0)
    assert level(call.caller, start, end) > HEARD_DBFS, "the caller heard the confirmation"
    assert level(agent, start, end) > HEARD_DBFS, "the agent heard that recording stopped"
    assert level(call.caller, quiet_start, quiet_end) < SILENT_DBFS, "silence before the key"
    await finish(call)

    # Withdrawn means gone: no file of this recording remains, not even the legs.
    await asyncio_log_end(asterisk_log)
    assert not recording_set(call.result.recording_id) & recording_files(asterisk)
    events = [e["event"] for e in await ledger_events(pg_dsn, call.result.consent_id)]
    assert events == ["granted", "withdrawn"]
    assert withdrawn["recording_id"] == call.result.recording_id
    assert '"deleted_files": ' in withdrawn["detail"]


# ARI mode whispers the agent's notices; AGI mode (300 the script, 350 FastAGI) plays them with
# Dial's U(consent-gate-agent-notice) before the bridge.
BOTH_MODES = pytest.mark.parametrize("exten", ["200", "300", "350"], ids=["ari", "agi", "fastagi"])
# AGI mode only (features.conf codes): the script and the FastAGI server.
AGI_MODES = pytest.mark.parametrize("exten", ["300", "350"], ids=["agi", "fastagi"])
# The legal-obligation extensions with the AGI codes: 312 the script, 362 FastAGI.
AGI_LEGAL_MODES = pytest.mark.parametrize("exten", ["312", "362"], ids=["agi", "fastagi"])


@BOTH_MODES
async def test_caller_records_from_the_menu_without_our_recording(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, pg_dsn: str,
    test_tag: str, recordings_before: set[str], exten: str,
) -> None:
    await drain_incoming(phones.agent)
    caller = await phones.caller.call(phones.uri(exten), headers={"X-Test-Call": test_tag})
    await caller.wait_answered(10)
    await asterisk_log.wait_for(r"Playing '[^']*/question-training\.", 10)
    await caller.send_dtmf("3")
    await asterisk_log.wait_for(r"Playing '[^']*/caller-records-ack\.", 10)
    await asterisk_log.wait_for(r"(?s)caller-records-ack.*Playing '[^']*/question-training\.", 15)
    await caller.send_dtmf("2")
    result = await asterisk_log.gate_result(test_tag, 20)
    assert result.status == "declined"
    agent = await phones.agent.wait_incoming(20)
    await agent.answer()
    start, end = await hear_window(caller, 4.0)
    assert level(agent, start, end) > HEARD_DBFS, "the agent heard 'not recorded' and 'caller records'"
    await caller.hangup()
    await agent.wait_hangup(10)
    events = await ledger_events(pg_dsn, result.consent_id)
    assert [e["event"] for e in events] == ["caller-records", "declined"]
    assert '"consent-menu"' in events[0]["detail"]
    assert recording_files(asterisk) == recordings_before


async def test_caller_records_mid_call_while_we_record(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, pg_dsn: str,
    test_tag: str,
) -> None:
    call = await run_gate_call(phones, asterisk_log, test_tag, key="1")
    await hear_window(call.caller, 4.0)  # let the agent's answer notice finish
    quiet_start, quiet_end = await hear_window(call.caller, 1.0)
    await call.caller.send_dtmf("*3")
    event = await wait_for_event(pg_dsn, call.result.consent_id, "caller-records")
    start, end = await hear_window(call.caller, 2.5)
    assert level(call.agent, start, end) > HEARD_DBFS, "the agent was told the caller records"
    assert level(call.agent, quiet_start, quiet_end) < SILENT_DBFS
    assert level(call.caller, start, end) > HEARD_DBFS, "the caller heard the acknowledgement"
    assert '"mid-call"' in event["detail"]
    await finish(call)


async def test_secure_pause_keeps_speech_and_digits_out_of_the_recording(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, pg_dsn: str,
    speech_wav: Path, test_tag: str,
) -> None:
    call = await run_gate_call(phones, asterisk_log, test_tag, key="1")
    await hear_window(call.caller, 4.0)  # the agent's answer notice
    await call.caller.play_wav(speech_wav)  # recorded
    await call.agent.send_dtmf("*5")
    paused = await wait_for_event(pg_dsn, call.result.consent_id, "paused")
    await call.caller.play_wav(speech_wav)  # "my card number is ..." — must not be recorded
    await call.caller.send_dtmf("4111")
    await call.caller.play_silence(0.5)
    await call.agent.send_dtmf("*6")
    resumed = await wait_for_event(pg_dsn, call.result.consent_id, "resumed")
    await call.caller.play_silence(0.5)
    await call.caller.play_wav(speech_wav)  # recorded again
    await finish(call)

    granted = (await ledger_events(pg_dsn, call.result.consent_id))[0]
    path = asterisk.recordings_dir / f"{call.result.recording_id}.wav"
    await wait_until(path.exists, 10, "the recording")
    rate, samples = audio.read_wav(path)
    origin = granted["occurred_at"]  # MixMonitor starts right after the grant is stored
    pause_at = (paused["occurred_at"] - origin).total_seconds()
    resume_at = (resumed["occurred_at"] - origin).total_seconds()
    assert resume_at - pause_at > 3.0
    during = audio.segment(samples, rate, pause_at + 0.3, resume_at - 0.3)
    after = audio.segment(samples, rate, resume_at + 0.8, resume_at + 3.0)
    before = audio.segment(samples, rate, max(0.0, pause_at - 2.5), pause_at - 0.3)
    assert audio.rms_dbfs(during) < SILENT_DBFS, "speech and DTMF during the pause are not in the file"
    assert audio.rms_dbfs(after) > HEARD_DBFS and audio.rms_dbfs(before) > HEARD_DBFS
    assert '"by": "agent"' in resumed["detail"]


@BOTH_MODES
async def test_agent_and_transferred_agent_hear_the_recording_notice(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, pg_dsn: str,
    test_tag: str, exten: str,
) -> None:
    await drain_incoming(phones.agent2)
    call = await run_gate_call(phones, asterisk_log, test_tag, exten=exten, key="1")
    assert call.result.status == "granted"
    start, end = await hear_window(call.caller, 4.0)
    assert level(call.agent, start, end) > HEARD_DBFS, "the first agent heard that the call is recorded"
    transfer = asyncio.ensure_future(call.agent.transfer(f"sip:agent2@{phones.domain}"))
    second = await phones.agent2.wait_incoming(20)
    await second.answer()
    start, end = await hear_window(call.caller, 4.0)
    assert level(second, start, end) > HEARD_DBFS, "the new agent heard that the call is recorded"
    await call.caller.hangup()
    assert await second.wait_hangup(10)
    await asyncio.wait([transfer], timeout=10)
    if not transfer.done():
        transfer.cancel()


async def test_pause_resumes_by_itself_after_the_limit(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, pg_dsn: str,
    test_tag: str, tmp_path: Path,
) -> None:
    config = tmp_path / "consent-gate.toml"
    config.write_text("[dialog]\npause_limit = 10\n")
    await gate.stop()
    gate.config_path = config
    try:
        await gate.start()
        call = await run_gate_call(phones, asterisk_log, test_tag, key="1")
        await call.agent.send_dtmf("*5")
        paused = await wait_for_event(pg_dsn, call.result.consent_id, "paused")
        resumed = await wait_for_event(pg_dsn, call.result.consent_id, "resumed", timeout=20)
        await finish(call)
        assert '"by": "auto"' in resumed["detail"]
        span = (resumed["occurred_at"] - paused["occurred_at"]).total_seconds()
        assert 9.5 <= span <= 12.0
    finally:
        await gate.stop()
        gate.config_path = None
        await gate.start()


# -- AGI mode: the same codes through features.conf (dialplan/consent-gate-features.conf) ---

@AGI_MODES
async def test_agi_mode_withdrawal_and_pause_through_features(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, pg_dsn: str,
    speech_wav: Path, test_tag: str, exten: str,
) -> None:
    call = await run_gate_call(phones, asterisk_log, test_tag, exten=exten, key="1")
    assert call.result.status == "granted"
    await hear_window(call.caller, 4.0)  # the agent's notice before the bridge (U())
    await call.caller.play_wav(speech_wav)
    await call.agent.send_dtmf("*5")
    paused = await wait_for_event(pg_dsn, call.result.consent_id, "paused")
    await call.caller.play_wav(speech_wav)
    await call.agent.send_dtmf("*6")
    resumed = await wait_for_event(pg_dsn, call.result.consent_id, "resumed")
    assert paused["source"] == resumed["source"] == "agi"
    await call.caller.play_wav(speech_wav)
    await call.caller.send_dtmf("*0")
    withdrawn = await wait_for_event(pg_dsn, call.result.consent_id, "withdrawn")
    start, end = await hear_window(call.caller, 3.0)
    assert level(call.caller, start, end) > HEARD_DBFS, "the caller heard the confirmation"
    await finish(call)
    await asyncio_log_end(asterisk_log)
    assert not recording_set(call.result.recording_id) & recording_files(asterisk)
    assert [e["event"] for e in await ledger_events(pg_dsn, call.result.consent_id)] == [
        "granted", "paused", "resumed", "withdrawn"]
    assert withdrawn["source"] == "agi"


@AGI_LEGAL_MODES
async def test_agi_mode_pause_of_a_legal_obligation_recording(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, pg_dsn: str,
    test_tag: str, exten: str,
) -> None:
    """PCI DSS: a recording made by law ("notified", extension 312 / 362) is paused for card data
    like a consented one; the resume appends to the same file."""
    call = await run_gate_call(phones, asterisk_log, test_tag, exten=exten, result_timeout=60)
    assert call.result.status == "notified"
    await asterisk_log.wait_for(r"Begin MixMonitor Recording", 10)
    await hear_window(call.caller, 2.0)
    await call.agent.send_dtmf("*5")
    paused = await wait_for_event(pg_dsn, call.result.consent_id, "paused")
    await asterisk_log.wait_for(r"End MixMonitor Recording", 10)
    await call.caller.play_silence(1.0)
    await call.agent.send_dtmf("*6")
    resumed = await wait_for_event(pg_dsn, call.result.consent_id, "resumed")
    await asterisk_log.wait_for(r"(?s)End MixMonitor Recording.*Begin MixMonitor Recording", 10)
    await finish(call)
    assert paused["source"] == resumed["source"] == "agi"
    assert paused["recording_id"] == resumed["recording_id"] == call.result.recording_id
    assert [e["event"] for e in await ledger_events(pg_dsn, call.result.consent_id)] == [
        "notified", "paused", "resumed"]
    await wait_until(lambda: f"{call.result.recording_id}.wav" in recording_files(asterisk), 10, "the recording")


# Needs [consent-gate-apply] to play the confirmation with Read() when ARG1 is "agi" (the
# snippet is in dialplan/README.md "Withdrawal before the bridge"): Playback() hears no key.
@AGI_MODES
async def test_agi_mode_withdrawal_during_the_confirmation(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, pg_dsn: str,
    speech_wav: Path, test_tag: str, exten: str,
) -> None:
    """``*0`` while "this call is recorded" plays (before the bridge, where features.conf does
    not listen): withdrawn, the files deleted, nothing recorded afterwards."""
    await drain_incoming(phones.agent)
    caller = await phones.caller.call(phones.uri(exten), headers={"X-Test-Call": test_tag})
    await caller.wait_answered(10)
    await asterisk_log.wait_for(r"Playing '[^']*/question-training\.", 10)
    await caller.send_dtmf("1")
    await asterisk_log.wait_for(r"Playing '[^']*/granted\.", 15)
    await caller.send_dtmf("*0")
    result = await asterisk_log.gate_result(test_tag, 20)
    assert result.status == "granted"
    withdrawn = await wait_for_event(pg_dsn, result.consent_id, "withdrawn", timeout=5)
    agent = await phones.agent.wait_incoming(20)
    await agent.answer()
    await caller.play_wav(speech_wav)  # after the withdrawal: must not be recorded
    await caller.hangup()
    await agent.wait_hangup(10)
    await asyncio_log_end(asterisk_log)
    assert not recording_set(result.recording_id) & recording_files(asterisk)
    assert withdrawn["source"] == "agi" and withdrawn["recording_id"] == result.recording_id
    assert [e["event"] for e in await ledger_events(pg_dsn, result.consent_id)] == ["granted", "withdrawn"]


@AGI_MODES
@pytest.mark.parametrize("gap", [0.2, 0.6])
async def test_agi_mode_consent_then_quick_withdrawal_leaves_no_recording(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, pg_dsn: str,
    speech_wav: Path, test_tag: str, gap: float, exten: str,
) -> None:
    """``1``, then ``*0`` ``gap`` s later: whether the code lands while the grant is stored
    (the script hears it) or during the confirmation (apply hears it), nothing is recorded."""
    await drain_incoming(phones.agent)
    caller = await phones.caller.call(phones.uri(exten), headers={"X-Test-Call": test_tag})
    await caller.wait_answered(10)
    await asterisk_log.wait_for(r"Playing '[^']*/question-training\.", 10)
    await caller.send_dtmf("1")
    await caller.play_silence(gap)  # a caller's timing, not synchronisation
    await caller.send_dtmf("*0")
    result = await asterisk_log.gate_result(test_tag, 20)
    assert result.status == "granted"
    await wait_for_event(pg_dsn, result.consent_id, "withdrawn", timeout=5)
    agent = await phones.agent.wait_incoming(20)
    await agent.answer()
    await caller.play_wav(speech_wav)
    await caller.hangup()
    await agent.wait_hangup(10)
    if "Begin MixMonitor Recording" in asterisk_log.text():
        await asyncio_log_end(asterisk_log)
    assert not recording_set(result.recording_id) & recording_files(asterisk)
    assert [e["event"] for e in await ledger_events(pg_dsn, result.consent_id)] == ["granted", "withdrawn"]

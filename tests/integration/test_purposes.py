"""Purposes through the real Asterisk, on both paths: a legal obligation (notice, no question,
always recorded) and granular consent (one question and one key per purpose)."""

from __future__ import annotations

import re

import pytest

from consent_gate_rig.calls import (
    Phones,
    finish,
    ledger_events,
    prompt_version,
    recording_files,
    recording_set,
    run_gate_call,
    wait_until,
)
from consent_gate_rig.harness import AsteriskLog, GateService
from consent_gate_rig.sandbox import AsteriskSandbox

pytestmark = pytest.mark.integration

EXTENSIONS = {"ari": {"legal": "202", "granular": "203"}, "agi": {"legal": "302", "granular": "303"},
              "fastagi": {"legal": "352", "granular": "353"}}


async def test_legal_obligation_informs_and_records_without_asking(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, pg_dsn: str,
    test_tag: str, recordings_before: set[str], gate_path: str,
) -> None:
    call = await run_gate_call(phones, asterisk_log, test_tag, exten=EXTENSIONS[gate_path]["legal"],
                               result_timeout=40)
    assert call.result.status == "notified"
    log_text = asterisk_log.text()
    assert re.search(r"Playing '[^']*/notice-legal-obligation\.", log_text)
    assert not re.search(r"Playing '[^']*/question-", log_text), "nothing is asked"
    await call.caller.play_silence(1.0)
    await finish(call)
    expected = f"{call.result.recording_id}.wav"
    await wait_until(lambda: expected in recording_files(asterisk), 10, "the recording")
    [event] = await ledger_events(pg_dsn, call.result.consent_id)
    assert event["event"] == "notified" and event["legal_basis"] == "legal-obligation"
    assert event["purpose"] == "securities" and event["digit"] is None
    assert event["prompt_version"] == prompt_version("en", "notice-legal-obligation")
    assert event["recording_id"] == call.result.recording_id


async def test_granular_consent_a_no_to_one_purpose_does_not_block_another(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, pg_dsn: str,
    test_tag: str, recordings_before: set[str], gate_path: str,
) -> None:
    exten = EXTENSIONS[gate_path]["granular"]
    # Documentation is asked first: decline it; then training: grant it.
    call = await run_gate_call(phones, asterisk_log, test_tag, exten=exten, result_timeout=30,
                               answers=[("question-documentation", "2"), ("question-training", "1")])
    assert call.result.status == "granted"
    await call.caller.play_silence(1.0)
    await finish(call)
    events = await ledger_events(pg_dsn, call.result.consent_id)
    by_purpose = {e["purpose"]: e for e in events}
    assert by_purpose["documentation"]["event"] == "declined"
    assert by_purpose["documentation"]["recording_id"] is None
    assert by_purpose["training"]["event"] == "granted"
    assert by_purpose["training"]["recording_id"] == call.result.recording_id
    # One recording, kept for the granted purpose only (training makes legs for its copies).
    await wait_until(lambda: recording_set(call.result.recording_id) <= recording_files(asterisk), 10,
                     "the recording")

"""Consent promises at the edges, through the real Asterisk, PostgreSQL and SIP phones (issue 16):

* case 1 -- a withdrawal while AMI is down or refuses us: the files are gone, the ledger has
  ``withdrawn``, nothing of the call is left;
* case 2 -- ``1`` then ``*0`` at once, with a fast and a slow ledger: the recorder is blocked
  before it starts (or stopped right after), nothing of the call is left;
* case 3 -- two purposes and a fast second key: it does not answer a question not yet heard.

A slow ledger is a real one: another session holds a lock on ``consent_events`` for a moment,
so the grant's INSERT waits (as under load), well inside the 2 s write timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import asyncpg
import pytest

from consent_gate_rig.calls import (
    Phones,
    drain_incoming,
    ledger_events,
    recording_files,
    recording_set,
    wait_for_event,
    wait_until,
)
from consent_gate_rig.harness import AsteriskLog, GateService
from consent_gate_rig.sandbox import AsteriskSandbox

pytestmark = pytest.mark.integration

LOCK_HELD_AFTER_LAST_KEY = 0.6


@contextlib.asynccontextmanager
async def ledger_lock(dsn: str, held: bool) -> AsyncIterator[None]:
    """While inside (if ``held``): INSERTs into the ledger wait, as behind a slow database."""
    if not held:
        yield
        return
    connection = await asyncpg.connect(dsn)
    transaction = connection.transaction()
    await transaction.start()
    await connection.execute("LOCK TABLE consent_events IN SHARE ROW EXCLUSIVE MODE")
    try:
        yield
    finally:
        await transaction.rollback()
        await connection.close()


async def keyed_later(seconds: float) -> None:
    await asyncio.sleep(seconds)  # the caller's timing between keys, not synchronisation


async def call_ended_in_service(gate: GateService, call_id: str) -> None:
    """The service has finished the call (its last file sweep included)."""
    await wait_until(lambda: f'"call_id": "{call_id}"' in gate.log_text() and any(
        f'"call_id": "{call_id}"' in line and '"to_state": "ended"' in line for line in gate.log_text().splitlines()),
        15, f"the service to end call {call_id}")


async def dial(phones: Phones, asterisk_log: AsteriskLog, tag: str, exten: str, prompt: str):  # noqa: ANN201
    await drain_incoming(phones.agent)
    caller = await phones.caller.call(phones.uri(exten), headers={"X-Test-Call": tag})
    await caller.wait_answered(10)
    await asterisk_log.wait_for(rf"Playing '[^']*/{prompt}\.", 15)
    await keyed_later(1.0)
    return caller


async def recorded_call(asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, tag: str):  # noqa: ANN201
    """A consenting caller bridged to the agent, once the recording exists."""
    caller = await dial(phones, asterisk_log, tag, "200", "question-training")
    await caller.send_dtmf("1")
    result = await asterisk_log.gate_result(tag, 20)
    agent = await phones.agent.wait_incoming(20)
    await agent.answer()
    await caller.wait_answered(10)
    await wait_until(lambda: (asterisk.recordings_dir / f"{result.recording_id}.wav").exists(), 10,
                     "the recording to exist")
    return caller, agent, result


# -- case 2 -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("slow_ledger", [False, True], ids=["fast-ledger", "slow-ledger"])
@pytest.mark.parametrize("gap", [0.2, 0.6])
async def test_consent_then_withdrawal_at_once_leaves_no_recording(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, pg_dsn: str,
    test_tag: str, slow_ledger: bool, gap: float,
) -> None:
    caller = await dial(phones, asterisk_log, test_tag, "200", "question-training")
    async with ledger_lock(pg_dsn, slow_ledger):
        await caller.send_dtmf("1")
        await keyed_later(gap)
        await caller.send_dtmf("*0")
        if slow_ledger:
            await keyed_later(LOCK_HELD_AFTER_LAST_KEY)
    result = await asterisk_log.gate_result(test_tag, 20)
    agent = await phones.agent.wait_incoming(20)
    await agent.answer()
    await caller.wait_answered(10)
    await caller.play_silence(2.0)  # the conversation that must not be recorded
    withdrawn = await wait_for_event(pg_dsn, result.consent_id, "withdrawn")
    await caller.hangup()
    await agent.wait_hangup(10)
    events = await ledger_events(pg_dsn, result.consent_id)
    assert [e["event"] for e in events] == ["granted", "withdrawn"]
    recording_id = events[0]["recording_id"]
    assert recording_id and withdrawn["recording_id"] == recording_id
    await call_ended_in_service(gate, events[0]["call_id"])
    assert not recording_set(recording_id) & recording_files(asterisk), "nothing of the call may remain"


# -- case 3 -----------------------------------------------------------------------------------------

async def test_a_fast_second_key_does_not_answer_the_next_purpose(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, pg_dsn: str,
    test_tag: str,
) -> None:
    caller = await dial(phones, asterisk_log, test_tag, "203", "question-documentation")
    async with ledger_lock(pg_dsn, True):
        await caller.send_dtmf("1")
        await keyed_later(0.2)
        await caller.send_dtmf("1")  # before the training question was heard
        await keyed_later(LOCK_HELD_AFTER_LAST_KEY)
    await asterisk_log.wait_for(r"Playing '[^']*/question-training\.", 15)
    await keyed_later(1.0)
    await caller.send_dtmf("2")  # the answer to the training question, once heard
    result = await asterisk_log.gate_result(test_tag, 30)
    agent = await phones.agent.wait_incoming(20)
    await agent.answer()
    await caller.hangup()
    await agent.wait_hangup(10)
    events = {e["purpose"]: e for e in await ledger_events(pg_dsn, result.consent_id)}
    assert events["documentation"]["event"] == "granted"
    assert events["training"]["event"] == "declined", "the early key must not answer the training question"
    assert events["training"]["digit"] == "2"


# -- case 1 -----------------------------------------------------------------------------------------

def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("ami_fault", ["down", "refusing"])
async def test_withdrawal_without_ami_still_leaves_no_recording(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, pg_dsn: str,
    test_tag: str, ami_fault: str,
) -> None:
    fault = {"down": {"CONSENT_GATE_AMI_PORT": str(closed_port())},
             "refusing": {"CONSENT_GATE_AMI_SECRET": "not-the-secret"}}[ami_fault]
    await gate.stop()
    saved = dict(gate.extra_env)
    gate.extra_env.update(fault)
    try:
        await gate.start()
        caller, agent, result = await recorded_call(asterisk, asterisk_log, phones, test_tag)
        await caller.play_silence(1.0)
        await caller.send_dtmf("*0")
        withdrawn = await wait_for_event(pg_dsn, result.consent_id, "withdrawn")
        assert '"recorder_stopped": false' in withdrawn["detail"]
        await wait_until(lambda: not recording_set(result.recording_id) & recording_files(asterisk), 5,
                         "the files deleted while the call goes on")
        await caller.play_silence(2.0)  # MixMonitor still runs (AMI cannot stop it): into nothing
        await caller.hangup()
        await agent.wait_hangup(10)
        events = await ledger_events(pg_dsn, result.consent_id)
        assert [e["event"] for e in events] == ["granted", "withdrawn"]
        await call_ended_in_service(gate, events[0]["call_id"])
        assert not recording_set(result.recording_id) & recording_files(asterisk)
    finally:
        await gate.stop()
        gate.extra_env.clear()
        gate.extra_env.update(saved)
        await gate.start()


# -- case 10 ----------------------------------------------------------------------------------------

async def test_a_call_in_progress_keeps_its_withdrawal_across_a_service_restart(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, pg_dsn: str,
    test_tag: str,
) -> None:
    caller, agent, result = await recorded_call(asterisk, asterisk_log, phones, test_tag)
    await gate.stop(kill=True)  # a crash while the call is recorded
    await gate.start()
    await wait_until(lambda: '"ari.call_adopted"' in gate.log_text(), 15, "the call adopted by the new process")
    await caller.send_dtmf("*0")
    await wait_for_event(pg_dsn, result.consent_id, "withdrawn")
    await wait_until(lambda: not recording_set(result.recording_id) & recording_files(asterisk), 5,
                     "the files deleted")
    await caller.hangup()
    await agent.wait_hangup(10)
    events = await ledger_events(pg_dsn, result.consent_id)
    assert [e["event"] for e in events] == ["granted", "withdrawn"]
    await call_ended_in_service(gate, events[0]["call_id"])
    assert not recording_set(result.recording_id) & recording_files(asterisk)


# -- case 2, the ringing phase (ARI mode: the channel subscription hears keys during Dial) ----------

async def test_a_withdrawal_while_the_agent_rings_leaves_no_recording(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, pg_dsn: str,
    test_tag: str,
) -> None:
    caller = await dial(phones, asterisk_log, test_tag, "200", "question-training")
    await caller.send_dtmf("1")
    result = await asterisk_log.gate_result(test_tag, 20)
    agent = await phones.agent.wait_incoming(20)  # ringing: not answered yet
    await caller.send_dtmf("*0")
    withdrawn = await wait_for_event(pg_dsn, result.consent_id, "withdrawn")
    await agent.answer()
    await caller.wait_answered(10)
    await caller.play_silence(2.0)  # the conversation that must not be recorded
    await caller.hangup()
    await agent.wait_hangup(10)
    assert withdrawn["recording_id"] == result.recording_id
    await call_ended_in_service(gate, withdrawn["call_id"])
    assert not recording_set(result.recording_id) & recording_files(asterisk)

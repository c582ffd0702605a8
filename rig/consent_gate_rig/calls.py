"""Helpers of the integration tests: calls through the sandbox Asterisk with the softphone,
what the ledger and the recordings directory say afterwards, and bounded waits."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from consent_gate.prompts.catalog import packaged_sounds_dir
from consent_gate_rig.harness import AsteriskLog, GateResult
from consent_gate_rig.sandbox import AsteriskSandbox, SandboxSettings
from consent_gate_rig.softphone import Line, NoIncomingCall, PhoneCall, Softphone


@dataclass
class Phones:
    softphone: Softphone
    caller: Line
    caller_da: Line
    caller_info: Line
    agent: Line
    agent2: Line
    domain: str

    def uri(self, exten: str) -> str:
        return f"sip:{exten}@{self.domain}"


def recording_files(asterisk: AsteriskSandbox) -> set[str]:
    return {p.name for p in asterisk.recordings_dir.iterdir()}


def recording_set(recording_id: str, *, legs: bool = True) -> set[str]:
    """The files one consented recording makes: the mix, and for training-copy purposes
    (the default "training") the caller and agent legs too."""
    names = {f"{recording_id}.wav"}
    if legs:
        names |= {f"{recording_id}-caller.wav", f"{recording_id}-agent.wav"}
    return names


async def wait_until(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll a condition with a bound (for state outside our process: files, logs, the ledger).
    ``predicate`` may be a plain function or a coroutine function."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        outcome = predicate()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


def journal_entries(directory: Path) -> list[dict]:
    """Every event in a journal directory, read straight from its JSONL files."""
    events = []
    for path in sorted(directory.glob("*.jsonl")):
        events += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return events


PROMPTS = packaged_sounds_dir()


HEX32 = re.compile(r"^[0-9a-f]{32}$")


def prompt_version(lang: str, name: str) -> str:
    return hashlib.sha256((PROMPTS / lang / f"{name}.wav").read_bytes()).hexdigest()


async def ledger_events(dsn: str, consent_id: str) -> list[dict]:
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT * FROM consent_events WHERE consent_id = $1::uuid ORDER BY occurred_at, seq", consent_id)
    finally:
        await connection.close()
    return [dict(row) for row in rows]


async def drain_incoming(line: Line) -> None:
    """Calls left ringing by an earlier failed test must not be taken for this test's call."""
    while True:
        try:
            stale = await line.wait_incoming(0.05)
        except NoIncomingCall:
            return
        await stale.hangup()


@dataclass
class GateCall:
    caller: PhoneCall
    result: GateResult
    agent: PhoneCall | None
    keyed_at: float | None


async def run_gate_call(
    phones: Phones, log: AsteriskLog, tag: str, *, line: Line | None = None, exten: str = "200",
    key: str | None = None, key_after_prompt: float = 1.0, prompt: str = "question-training",
    headers: dict[str, str] | None = None, caller_name: str | None = None, result_timeout: float = 20,
    answered_by_gate: bool = True, answers: list[tuple[str, str]] | None = None,
) -> GateCall:
    """Dial the gate, press ``key`` ``key_after_prompt`` s into the question, answer as agent.

    ``answered_by_gate=False``: the service is down, so nobody answers before the agent does.
    """
    await drain_incoming(phones.agent)
    call = await (line or phones.caller).call(
        phones.uri(exten), headers={"X-Test-Call": tag, **(headers or {})}, caller_name=caller_name)
    if answered_by_gate:
        await call.wait_answered(10)
    keyed_at = None
    # One (prompt, key) per question: several for granular consent.
    for answer_prompt, answer_key in answers or ([(prompt, key)] if key is not None else []):
        await log.wait_for(rf"Playing '[^']*/{answer_prompt}\.", 40)
        await _pause(key_after_prompt)
        await call.send_dtmf(answer_key)
        keyed_at = time.monotonic()
    result = await log.gate_result(tag, result_timeout)
    agent_call = await phones.agent.wait_incoming(20)
    await agent_call.answer()
    await call.wait_answered(10)
    return GateCall(call, result, agent_call, keyed_at)


async def _pause(seconds: float) -> None:
    # Timing of a human keypress within the prompt, not synchronisation.
    import asyncio

    await asyncio.sleep(seconds)


async def finish(call: GateCall) -> None:
    await call.caller.hangup()
    if call.agent is not None:
        await call.agent.wait_hangup(10)


async def wait_for_event(dsn: str, consent_id: str, kind: str, timeout: float = 15) -> dict:
    found: list[dict] = []

    async def stored() -> bool:
        found[:] = [e for e in await ledger_events(dsn, consent_id) if e["event"] == kind]
        return bool(found)

    await wait_until(stored, timeout, f"a {kind!r} event for {consent_id}", interval=0.1)
    return found[0]


# Ports of the test sandbox: away from 5060/8088 and from the demo's defaults.  Two test runs
# on one machine (two developers, two sessions) set CONSENT_GATE_SANDBOX_NAME and the
# CONSENT_GATE_SANDBOX_*_PORT variables (and CONSENT_GATE_TEST_PG_PORT) to stay apart.
TEST_SANDBOX = dict(name="test", sip_port=25160, http_port=28188, ami_port=25138, rtp_start=26400, rtp_end=26799,
                    fastagi_port=25173)


_ENV_NAMES = dict(name="NAME", sip_port="SIP_PORT", http_port="HTTP_PORT", ami_port="AMI_PORT",
                  rtp_start="RTP_START", rtp_end="RTP_END", fastagi_port="FASTAGI_PORT")


def sandbox_settings_for_tests() -> SandboxSettings:
    defaults = {key: value for key, value in TEST_SANDBOX.items()
                if not os.environ.get(f"CONSENT_GATE_SANDBOX_{_ENV_NAMES[key]}")}
    return SandboxSettings.from_env(**defaults)


# The AGI paths (features.conf mid-call codes, MixMonitor only while bridged).
AGI_PATHS = ("agi", "fastagi")

"""Integration fixtures: a real Asterisk 22 (sandbox), a real PostgreSQL, real SIP phones and the
consent-gate ARI service as a real process.

Nothing here skips: if Asterisk, PostgreSQL or the SIP stack cannot start, the tests error.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from consent_gate.rig.harness import AsteriskLog, GateService
from consent_gate.rig.sandbox import AsteriskSandbox, SandboxSettings
from consent_gate.rig.softphone import Line, Softphone

pytestmark = pytest.mark.integration

# Ports of the test sandbox: away from 5060/8088 and from the demo's defaults.  Two test runs
# on one machine (two developers, two sessions) set CONSENT_GATE_SANDBOX_NAME and the
# CONSENT_GATE_SANDBOX_*_PORT variables (and CONSENT_GATE_TEST_PG_PORT) to stay apart.
TEST_SANDBOX = dict(name="test", sip_port=25160, http_port=28188, ami_port=25138, rtp_start=26400, rtp_end=26799)
_ENV_NAMES = dict(name="NAME", sip_port="SIP_PORT", http_port="HTTP_PORT", ami_port="AMI_PORT",
                  rtp_start="RTP_START", rtp_end="RTP_END")


def sandbox_settings_for_tests() -> SandboxSettings:
    defaults = {key: value for key, value in TEST_SANDBOX.items()
                if not os.environ.get(f"CONSENT_GATE_SANDBOX_{_ENV_NAMES[key]}")}
    return SandboxSettings.from_env(**defaults)


@pytest.fixture(scope="session")
def asterisk() -> Iterator[AsteriskSandbox]:
    sandbox = AsteriskSandbox(sandbox_settings_for_tests())
    sandbox.up()
    try:
        yield sandbox
    finally:
        sandbox.down()


@pytest.fixture
def asterisk_log(asterisk: AsteriskSandbox) -> AsteriskLog:
    """The Asterisk log from the start of this test on."""
    return AsteriskLog(asterisk.full_log)


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


@pytest.fixture(scope="session")
async def phones(asterisk: AsteriskSandbox) -> AsyncIterator[Phones]:
    password = asterisk.state.sip_password
    domain = asterisk.sip_domain
    async with Softphone(listen="127.0.0.1:0", max_calls=32) as softphone:
        lines = {}
        for user in ("caller", "caller-da", "caller-info", "agent", "agent2"):
            dtmf = "info" if user == "caller-info" else "rfc4733"
            lines[user.replace("-", "_")] = await softphone.register(user, password, domain, dtmf_method=dtmf)
        yield Phones(softphone=softphone, domain=domain, **lines)


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real speech (espeak-ng), 8 kHz mono 16-bit: what the caller says after consenting."""
    out = tmp_path_factory.mktemp("speech") / "caller-speech.wav"
    raw = out.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(raw),
                    "Hello, I would like to ask about my order. The number is four two seven."], check=True)
    subprocess.run(["sox", str(raw), "-r", "8000", "-c", "1", "-b", "16", str(out)], check=True)
    return out


@pytest.fixture(scope="session")
async def gate_service(asterisk: AsteriskSandbox, pg_dsn: str,
                       tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GateService]:
    service = GateService(asterisk, pg_dsn, tmp_path_factory.mktemp("gate"))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@pytest.fixture
async def gate(gate_service: GateService) -> GateService:
    """The running service (restarted if an earlier test stopped it)."""
    await gate_service.start()
    return gate_service


@pytest.fixture
def test_tag() -> str:
    return uuid.uuid4().hex[:12]


def recording_files(asterisk: AsteriskSandbox) -> set[str]:
    return {p.name for p in asterisk.recordings_dir.iterdir()}


def recording_set(recording_id: str, *, legs: bool = True) -> set[str]:
    """The files one consented recording makes: the mix, and for training-copy purposes
    (the default "training") the caller and agent legs too."""
    names = {f"{recording_id}.wav"}
    if legs:
        names |= {f"{recording_id}-caller.wav", f"{recording_id}-agent.wav"}
    return names


@pytest.fixture
def recordings_before(asterisk: AsteriskSandbox) -> set[str]:
    return recording_files(asterisk)


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


def have_tools() -> None:
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is required by the integration tests (apt-get install {tool})")

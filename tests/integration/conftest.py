"""Integration fixtures: a real Asterisk 22 (sandbox), a real PostgreSQL, real SIP phones and the
consent-gate ARI service as a real process.

Nothing here skips: if Asterisk, PostgreSQL or the SIP stack cannot start, the tests error.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from consent_gate_rig.calls import (
    Phones,
    recording_files,
    sandbox_settings_for_tests,
)
from consent_gate_rig.harness import AsteriskLog, FastAgiService, GateService
from consent_gate_rig.sandbox import AsteriskSandbox
from consent_gate_rig.softphone import Softphone

pytestmark = pytest.mark.integration





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


@pytest.fixture(scope="session")
async def fastagi_service(gate_service: GateService) -> AsyncIterator[FastAgiService]:
    service = FastAgiService(gate_service)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@pytest.fixture
async def fastagi(fastagi_service: FastAgiService) -> FastAgiService:
    """The running FastAGI server (restarted if an earlier test stopped it)."""
    await fastagi_service.start()
    return fastagi_service


@pytest.fixture
async def gate(gate_service: GateService, fastagi: FastAgiService) -> GateService:
    """The running services -- the ARI service and the FastAGI server -- (restarted if an
    earlier test stopped one)."""
    await gate_service.start()
    return gate_service


@pytest.fixture
def test_tag() -> str:
    return uuid.uuid4().hex[:12]






@pytest.fixture
def recordings_before(asterisk: AsteriskSandbox) -> set[str]:
    return recording_files(asterisk)






def have_tools() -> None:
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is required by the integration tests (apt-get install {tool})")


# The gate paths every case of the matrix runs on: the ARI service, the AGI script (one process
# per call) and the FastAGI server (consent-gate-fastagi); extension in the sandbox dialplan.
GATE_EXTENSIONS = {"ari": "200", "agi": "300", "fastagi": "350"}
# What each path writes to the ledger's source column: FastAGI is AGI mode.
LEDGER_SOURCE = {"ari": "ari", "agi": "agi", "fastagi": "agi"}


@pytest.fixture(params=sorted(GATE_EXTENSIONS))
def gate_path(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def exten(gate_path: str) -> str:
    return GATE_EXTENSIONS[gate_path]


@pytest.fixture
def ledger_source(gate_path: str) -> str:
    return LEDGER_SOURCE[gate_path]

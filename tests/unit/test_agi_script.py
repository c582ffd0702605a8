"""consent-gate-agi without Asterisk: the real entry point as a subprocess on pipes, exactly as
Asterisk runs it.  The test plays Asterisk's side of the AGI protocol: it writes the AGI
environment, reads each command the script writes to stdout, checks it, and answers with
scripted replies (``200 result=49`` for key "1", ``200 result=0`` for a timeout,
``200 result=-1`` / ``HANGUP`` / end of input for a hangup).  Decisions land in the real
PostgreSQL ledger of the ``pg_dsn`` fixture.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from consent_gate.dialog import DTMF_STOP_KEYS, RESULT_FIELDS, RESULT_SEPARATOR
from consent_gate.journal import Journal

ROOT = Path(__file__).resolve().parents[2]
SOUNDS = "/snd/consent-gate"  # as Asterisk would see the prompts: only a string here
HMAC_KEY = "agi-test-hmac-key-0123456789abcdef"
STEP_TIMEOUT = 20.0  # seconds for the script to write its next command (includes start-up)



def _entry_point() -> list[str]:
    """The installed console script, as Asterisk's AGI() would run it."""
    beside = Path(sys.executable).with_name("consent-gate-agi")
    found = str(beside) if beside.exists() else shutil.which("consent-gate-agi")
    assert found, "consent-gate-agi is not installed (pip install -e .)"
    return [found]


@dataclass
class AgiSession:
    """Asterisk's end of one AGI session."""

    process: subprocess.Popen[bytes]
    stderr_path: Path
    commands: list[str] = field(default_factory=list)
    _lines: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self._lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self._lines.put(None)

    def send(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode())
        self.process.stdin.flush()

    def command(self) -> str:
        """The next command the script writes (fails after STEP_TIMEOUT or at end of output)."""
        try:
            line = self._lines.get(timeout=STEP_TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"no AGI command within {STEP_TIMEOUT} s; so far {self.commands}\n{self.stderr()}") from None
        assert line is not None, f"the script ended; commands so far {self.commands}\n{self.stderr()}"
        self.commands.append(line)
        return line

    def expect(self, pattern: str, reply: str) -> re.Match[str]:
        line = self.command()
        match = re.fullmatch(pattern, line)
        assert match, f"expected {pattern!r}, got {line!r}"
        self.send(reply + "\n")
        return match

    def hang_up_pipe(self) -> None:
        """Asterisk closes the script's stdin (the channel and the AGI are gone)."""
        assert self.process.stdin is not None
        self.process.stdin.close()

    def finish(self) -> tuple[int, list[str]]:
        """Wait for the script to exit; return its exit code and any commands it still wrote."""
        try:
            code = self.process.wait(timeout=STEP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
            raise AssertionError(f"consent-gate-agi did not exit; commands {self.commands}") from None
        rest = []
        while (line := self._lines.get(timeout=5)) is not None:
            rest.append(line)
        return code, rest

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@dataclass
class AgiRig:
    config: Path
    journal: Path
    env: dict[str, str]

    def start(self, purpose: str = "training", *, call_id: str, number: str = "+4520304050",
              language: str = "en") -> AgiSession:
        stderr_path = self.config.parent / f"{call_id}.stderr"
        with open(stderr_path, "wb") as stderr:
            process = subprocess.Popen(
                _entry_point() + [purpose], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                env=self.env, cwd=self.config.parent,
            )
        session = AgiSession(process, stderr_path)
        # The environment Asterisk writes first (res_agi), then a blank line.
        environment = {
            "agi_request": "/usr/local/bin/consent-gate-agi",
            "agi_channel": "PJSIP/caller-00000001",
            "agi_language": language,
            "agi_type": "PJSIP",
            "agi_uniqueid": call_id,
            "agi_version": "22.10.1",
            "agi_callerid": number,
            "agi_calleridname": "Test Caller",
            "agi_context": "consent-gate-agi",
            "agi_extension": "s",
            "agi_priority": "5",
            "agi_arg_1": purpose,
        }
        session.send("".join(f"{key}: {value}\n" for key, value in environment.items()) + "\n")
        return session


@pytest.fixture
def agi_rig(pg_dsn: str, tmp_path: Path) -> AgiRig:
    return _rig(pg_dsn, tmp_path)


def _rig(dsn: str, tmp_path: Path) -> AgiRig:
    journal = tmp_path / "journal"
    config = tmp_path / "consent-gate.toml"
    recordings = tmp_path / "recordings"  # the script refuses to start unless it is private
    recordings.mkdir(mode=0o700)
    config.write_text(
        f"[ledger]\ndsn = {json.dumps(dsn)}\njournal_dir = {json.dumps(str(journal))}\n"
        f"[recordings]\ndir = {json.dumps(str(recordings))}\nowner = \"{os.geteuid()}\"\n"
        f"[prompts]\ndir = {json.dumps(str(ROOT / 'prompts' / 'sounds'))}\nasterisk_dir = \"{SOUNDS}\"\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONSENT_GATE_")}
    env.update(CONSENT_GATE_CONFIG=str(config), CONSENT_GATE_HMAC_KEY=HMAC_KEY)
    return AgiRig(config, journal, env)


@pytest_asyncio.fixture(loop_scope="session")
async def ledger_rows(pg_dsn: str) -> AsyncIterator[Callable[[str], object]]:
    connection = await asyncpg.connect(pg_dsn, timeout=10)

    async def rows(call_id: str) -> list[asyncpg.Record]:
        return await connection.fetch("SELECT * FROM consent_events WHERE call_id = $1 ORDER BY seq", call_id)

    try:
        yield rows
    finally:
        await connection.close()


def _call_id() -> str:
    return f"agi-{uuid.uuid4().hex[:16]}"


QUESTION = re.escape(f'STREAM FILE {SOUNDS}/en/question-training "{DTMF_STOP_KEYS}" 0')
WAIT = "WAIT FOR DIGIT 5000"


def _results(session: AgiSession) -> dict[str, str]:
    """Answer the one SET VARIABLE of the packed result (unpacked here as the dialplan does),
    then the inherited agent notice for Dial's U() routine."""
    match = session.expect(r'SET VARIABLE "CONSENT_RESULT" "(.*)"', "200 result=1")
    fields = match[1].split(RESULT_SEPARATOR)
    assert len(fields) == len(RESULT_FIELDS), f"one field per result variable: {match[1]!r}"
    values = dict(zip(RESULT_FIELDS, fields, strict=True))
    notice = session.expect(r'SET VARIABLE "__CONSENT_AGENT_NOTICE" "(.*)"', "200 result=1")
    values["CONSENT_AGENT_NOTICE"] = notice[1]
    return values


def _answer(session: AgiSession) -> None:
    session.expect("ANSWER", "200 result=0")


async def test_key_during_the_prompt_grants(agi_rig: AgiRig, ledger_rows) -> None:
    call_id = _call_id()
    session = agi_rig.start(call_id=call_id)
    _answer(session)
    session.expect(QUESTION, "200 result=49 endpos=12000")  # '1' pressed during the prompt
    values = _results(session)
    code, rest = session.finish()
    assert (code, rest) == (0, [])
    assert values["CONSENT_STATUS"] == "granted"
    assert re.fullmatch(r"[0-9a-f]{32}", values["CONSENT_RECORDING_ID"])
    assert values["CONSENT_CONFIRMATION"] == f"{SOUNDS}/en/granted"
    assert values["CONSENT_AGENT_NOTICE"] == f"{SOUNDS}/en/agent-recorded-training"
    [row] = await ledger_rows(call_id)
    assert (row["event"], row["digit"], row["source"], row["purpose"]) == ("granted", "1", "agi", "training")
    assert str(row["consent_id"]) == values["CONSENT_ID"]
    assert row["recording_id"] == values["CONSENT_RECORDING_ID"]
    assert row["language"] == "en" and re.fullmatch(r"[0-9a-f]{64}", row["prompt_version"])
    # The number is stored only as its keyed pseudonym.
    assert row["caller_number"] is None
    assert row["caller_ref"] == hmac.new(HMAC_KEY.encode(), b"+4520304050", hashlib.sha256).hexdigest()


async def test_key_after_the_prompt_declines(agi_rig: AgiRig, ledger_rows) -> None:
    call_id = _call_id()
    session = agi_rig.start(call_id=call_id)
    _answer(session)
    session.expect(QUESTION, "200 result=0 endpos=40000")  # played to the end
    session.expect(WAIT, "200 result=50")  # '2'
    values = _results(session)
    assert session.finish() == (0, [])
    assert (values["CONSENT_STATUS"], values["CONSENT_RECORDING_ID"]) == ("declined", "")
    assert values["CONSENT_CONFIRMATION"] == f"{SOUNDS}/en/declined"
    assert values["CONSENT_AGENT_NOTICE"] == f"{SOUNDS}/en/agent-not-recorded"
    assert [(r["event"], r["digit"]) for r in await ledger_rows(call_id)] == [("declined", "2")]


async def test_silence_asks_twice_then_no_input(agi_rig: AgiRig, ledger_rows) -> None:
    call_id = _call_id()
    session = agi_rig.start(call_id=call_id)
    _answer(session)
    for _ in range(2):  # the question and one repeat (repeats = 1)
        session.expect(QUESTION, "200 result=0 endpos=40000")
        session.expect(WAIT, "200 result=0")  # 5 s without a key
    values = _results(session)
    assert session.finish() == (0, [])
    assert (values["CONSENT_STATUS"], values["CONSENT_RECORDING_ID"]) == ("no-input", "")
    [row] = await ledger_rows(call_id)
    assert (row["event"], row["digit"], row["recording_id"]) == ("no-input", None, None)


async def test_invalid_key_plays_the_invalid_prompt_then_asks_again(agi_rig: AgiRig, ledger_rows) -> None:
    call_id = _call_id()
    session = agi_rig.start(call_id=call_id)
    _answer(session)
    session.expect(QUESTION, "200 result=57 endpos=9000")  # '9'
    session.expect(re.escape(f'STREAM FILE {SOUNDS}/en/invalid "" 0'), "200 result=0 endpos=8000")
    session.expect(QUESTION, "200 result=49 endpos=3000")
    values = _results(session)
    assert session.finish() == (0, [])
    assert values["CONSENT_STATUS"] == "granted"
    [row] = await ledger_rows(call_id)
    assert row["event"] == "granted" and json.loads(row["detail"])["invalid_keys"] == ["9"]


async def test_channel_language_picks_the_danish_prompts(agi_rig: AgiRig, ledger_rows) -> None:
    call_id = _call_id()
    session = agi_rig.start(call_id=call_id, language="da_DK")
    _answer(session)
    session.expect(re.escape(f'STREAM FILE {SOUNDS}/da/question-training "{DTMF_STOP_KEYS}" 0'),
                   "200 result=50 endpos=100")
    values = _results(session)
    assert session.finish() == (0, [])
    assert values["CONSENT_CONFIRMATION"] == f"{SOUNDS}/da/declined"
    [row] = await ledger_rows(call_id)
    assert (row["event"], row["language"]) == ("declined", "da")


@pytest.mark.parametrize("hangup", ["result=-1", "HANGUP line", "end of input"])
@pytest.mark.parametrize("during", ["STREAM FILE", "WAIT FOR DIGIT"])
async def test_hangup_is_abandoned_and_sets_nothing(agi_rig: AgiRig, ledger_rows, hangup: str, during: str) -> None:
    """However Asterisk reports the hangup -- ``200 result=-1`` (pyst2: AGIAppError, not
    AGIHangup), a bare ``HANGUP`` line, or the pipe closing -- the dialog ends as "abandoned",
    the ledger says so, no variable is set and the script exits cleanly."""
    call_id = _call_id()
    session = agi_rig.start(call_id=call_id)
    _answer(session)
    if during == "WAIT FOR DIGIT":
        session.expect(QUESTION, "200 result=0 endpos=40000")
    line = session.command()
    assert line.startswith(during), line
    if hangup == "result=-1":
        session.send("200 result=-1 endpos=0\n")
    elif hangup == "HANGUP line":
        session.send("HANGUP\n")
    else:
        session.hang_up_pipe()
    code, rest = session.finish()
    assert rest == [], "nothing may be written after the hangup"
    assert code == 0, session.stderr()
    assert "Traceback" not in session.stderr(), session.stderr()
    assert [r["event"] for r in await ledger_rows(call_id)] == ["abandoned"]


async def test_dead_channel_while_setting_results_keeps_the_decision(agi_rig: AgiRig, ledger_rows) -> None:
    """The caller hangs up right after the key: Asterisk answers 511 to SET VARIABLE."""
    call_id = _call_id()
    session = agi_rig.start(call_id=call_id)
    _answer(session)
    session.expect(QUESTION, "200 result=50 endpos=100")
    session.expect(r'SET VARIABLE "CONSENT_RESULT" ".*"', "511 Command Not Permitted on a dead channel or intercept routine")
    assert session.finish() == (0, [])
    assert [r["event"] for r in await ledger_rows(call_id)] == ["declined"]


async def test_unknown_purpose_sends_no_command(agi_rig: AgiRig, ledger_rows) -> None:
    call_id = _call_id()
    session = agi_rig.start("no-such-purpose", call_id=call_id)
    assert session.finish() == (0, [])
    assert session.commands == []  # CONSENT_STATUS stays "unavailable" (set by the dialplan)
    assert await ledger_rows(call_id) == []


async def test_database_down_fails_closed_and_journals(tmp_path: Path) -> None:
    """Key '1' pressed while PostgreSQL is unreachable: nothing may be recorded, and the
    journal gets the truth (the caller pressed the key, the gate was unavailable)."""
    rig = _rig("postgresql://consent_gate@127.0.0.1:1/consent_gate", tmp_path)
    call_id = _call_id()
    session = rig.start(call_id=call_id)
    _answer(session)
    session.expect(QUESTION, "200 result=49 endpos=100")
    values = _results(session)
    assert session.finish() == (0, [])
    assert (values["CONSENT_STATUS"], values["CONSENT_RECORDING_ID"]) == ("unavailable", "")
    [event] = Journal(rig.journal).pending()
    assert (event.call_id, str(event.event), event.recording_id) == (call_id, "unavailable", None)
    assert event.detail["pressed"] == "granted"


async def test_caller_records_from_the_menu_is_in_the_agent_notice(agi_rig: AgiRig, ledger_rows) -> None:
    call_id = _call_id()
    session = agi_rig.start(call_id=call_id)
    _answer(session)
    session.expect(QUESTION, "200 result=51 endpos=100")  # '3': I record this call too
    session.expect(rf'STREAM FILE {re.escape(SOUNDS)}/en/caller-records-ack ".*" 0', "200 result=0 endpos=8000")
    session.expect(QUESTION, "200 result=50 endpos=100")  # then '2'
    values = _results(session)
    assert session.finish() == (0, [])
    assert (values["CONSENT_STATUS"], values["CONSENT_CALLER_RECORDS"]) == ("declined", "1")
    # Dial's U(consent-gate-agent-notice) plays both files to the agent, in this order.
    assert values["CONSENT_AGENT_NOTICE"] == f"{SOUNDS}/en/agent-not-recorded&{SOUNDS}/en/agent-caller-records"
    assert [r["event"] for r in await ledger_rows(call_id)] == ["caller-records", "declined"]


async def test_legal_obligation_without_an_agent_prompt_still_hands_back_notified(
    pg_dsn: str, tmp_path: Path, ledger_rows
) -> None:
    """A purpose shipped without an agent notice prompt: the notice is left out, the decision
    is handed back and the script exits 0 (a failing script would make the dialplan drop the
    result, and with it a legally required recording)."""
    from consent_gate.rig.harness import SANDBOX_PURPOSES

    rig = _rig(pg_dsn, tmp_path)
    rig.config.write_text(rig.config.read_text() + SANDBOX_PURPOSES)
    call_id = _call_id()
    session = rig.start("securities", call_id=call_id)
    _answer(session)
    session.expect(rf'STREAM FILE {re.escape(SOUNDS)}/en/notice-legal-obligation "" 0', "200 result=0 endpos=80000")
    values = _results(session)
    assert session.finish() == (0, [])
    assert values["CONSENT_STATUS"] == "notified" and re.fullmatch(r"[0-9a-f]{32}", values["CONSENT_RECORDING_ID"])
    assert values["CONSENT_AGENT_NOTICE"] == ""  # no agent-recorded-securities prompt is shipped
    assert [r["event"] for r in await ledger_rows(call_id)] == ["notified"]

"""The AGI gate without Asterisk, on both transports: ``script`` runs the real consent-gate-agi
entry point as a subprocess on pipes, exactly as Asterisk runs it; ``fastagi`` runs the real
consent-gate-fastagi server as a process and opens one TCP connection per session, as
``AGI(agi://...)`` does.  The test plays Asterisk's side of the AGI protocol: it writes the AGI
environment, reads each command the gate writes, checks it, and answers with scripted replies
(``200 result=49`` for key "1", ``200 result=0`` for a timeout, ``200 result=-1`` / ``HANGUP`` /
end of input for a hangup).  Every behaviour test runs on both with the same expectations.
Decisions land in the real PostgreSQL ledger of the ``pg_dsn`` fixture.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from consent_gate.core.dialog import DTMF_STOP_KEYS, RESULT_FIELDS, RESULT_SEPARATOR
from consent_gate.ledger.journal import Journal
from consent_gate.prompts.catalog import packaged_sounds_dir
from consent_gate_rig.agidata import DISCARD, HMAC_KEY, LISTEN, SOUNDS, agi_environment

ROOT = Path(__file__).resolve().parents[2]
STEP_TIMEOUT = 20.0  # seconds for the script to write its next command (includes start-up)



def _entry_point(name: str = "consent-gate-agi") -> list[str]:
    """The installed console script, as Asterisk's AGI() (or systemd, for the server) would run it."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed (pip install -e .)"
    return [found]


@dataclass
class AgiSession:
    """Asterisk's end of one AGI session: the script's pipes, or one FastAGI connection."""

    process: subprocess.Popen[bytes] | None
    stderr_path: Path
    sock: socket.socket | None = None
    commands: list[str] = field(default_factory=list)
    listened: int = 0
    discarded: int = 0
    _lines: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        stream = self.process.stdout if self.process is not None else self.sock.makefile("rb")  # type: ignore[union-attr]
        assert stream is not None
        with contextlib.suppress(OSError):
            for raw in stream:
                self._lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self._lines.put(None)

    def send(self, text: str) -> None:
        if self.sock is not None:
            self.sock.sendall(text.encode())
            return
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(text.encode())
        self.process.stdin.flush()

    def command(self, *, answer_listening: bool = True) -> str:
        """The next command the script writes (fails after STEP_TIMEOUT or at end of output).
        The port's listening between commands (``WAIT FOR DIGIT 50`` after a key) is answered
        "no key" here unless ``answer_listening`` is False."""
        while True:
            try:
                line = self._lines.get(timeout=STEP_TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"no AGI command within {STEP_TIMEOUT} s; so far {self.commands}\n{self.stderr()}") from None
            assert line is not None, f"the script ended; commands so far {self.commands}\n{self.stderr()}"
            if answer_listening and line == LISTEN:
                self.listened += 1
                self.send("200 result=0\n")
                continue
            if answer_listening and line == DISCARD:
                self.discarded += 1  # no key queued before the question
                self.send("200 result=0\n")
                continue
            self.commands.append(line)
            return line

    def next_command(self) -> str | None:
        """The next command, or None once the script has closed its output."""
        try:
            line = self._lines.get(timeout=STEP_TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"no AGI command within {STEP_TIMEOUT} s; so far {self.commands}\n{self.stderr()}") from None
        if line is None:
            self._lines.put(None)  # finish() still sees the end
        else:
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
        if self.sock is not None:
            self.sock.shutdown(socket.SHUT_WR)
            return
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.close()

    def finish(self) -> tuple[int, list[str]]:
        """Wait for the script to exit (FastAGI: for the server to close the connection); return
        its exit code (0 for a closed connection) and any commands it still wrote."""
        if self.sock is not None:
            rest = []
            try:
                while (line := self._lines.get(timeout=STEP_TIMEOUT)) is not None:
                    rest.append(line)
            except queue.Empty:
                raise AssertionError(f"the FastAGI server did not close the session; commands {self.commands}") from None
            self.sock.close()
            return 0, rest
        assert self.process is not None
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
    transport: str = "script"  # or "fastagi"
    server: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def server_log(self) -> Path:
        return self.config.parent / "fastagi.log"

    def start(self, purpose: str = "training", *, call_id: str, number: str = "+4520304050",
              language: str = "en", name: str = "Test Caller", raw_environment: str | None = None) -> AgiSession:
        network = self.transport == "fastagi"
        if raw_environment is None:
            raw_environment = agi_environment(purpose, call_id=call_id, number=number, language=language, name=name,
                                              network=network)
        if network:
            self._start_server()
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=STEP_TIMEOUT)
            sock.settimeout(None)
            session = AgiSession(None, self.server_log, sock=sock)
        else:
            stderr_path = self.config.parent / f"{call_id}.stderr"
            with open(stderr_path, "wb") as stderr:
                process = subprocess.Popen(
                    _entry_point() + [purpose], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                    env=self.env, cwd=self.config.parent,
                )
            session = AgiSession(process, stderr_path)
        # The environment Asterisk 22 writes first (res_agi), then a blank line.
        session.send(raw_environment)
        return session

    def _start_server(self) -> None:
        """consent-gate-fastagi as systemd would run it, on a free loopback port it picks itself."""
        if self.server is not None:
            return
        env = dict(self.env, CONSENT_GATE_FASTAGI_LISTEN="127.0.0.1:0")
        with open(self.server_log, "wb") as log:
            self.server = subprocess.Popen(_entry_point("consent-gate-fastagi") + ["--config", str(self.config)],
                                           stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + STEP_TIMEOUT
        while time.monotonic() < deadline:
            started = re.search(r'"listen": "127\.0\.0\.1:([0-9]+)"', self.server_log.read_text(errors="replace"))
            if started:
                self.port = int(started[1])
                return
            if self.server.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"consent-gate-fastagi did not start:\n{self.server_log.read_text(errors='replace')}")

    def close(self) -> None:
        if self.server is not None:
            self.server.terminate()
            try:
                self.server.wait(15)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait(5)
            self.server = None




TRANSPORTS = ["script", "fastagi"]


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_rig(transport: str) -> Iterator[Callable[[str, Path], AgiRig]]:
    """A rig for the test's transport; a FastAGI server it starts is stopped afterwards."""
    rigs: list[AgiRig] = []

    def make(dsn: str, tmp_path: Path) -> AgiRig:
        rig = _rig(dsn, tmp_path, transport)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


@pytest.fixture
def agi_rig(make_rig: Callable[[str, Path], AgiRig], pg_dsn: str, tmp_path: Path) -> AgiRig:
    return make_rig(pg_dsn, tmp_path)


def _rig(dsn: str, tmp_path: Path, transport: str = "script") -> AgiRig:
    journal = tmp_path / "journal"
    config = tmp_path / "consent-gate.toml"
    recordings = tmp_path / "recordings"  # the script refuses to start unless it is private
    recordings.mkdir(mode=0o700, exist_ok=True)
    config.write_text(
        f"[ledger]\ndsn = {json.dumps(dsn)}\njournal_dir = {json.dumps(str(journal))}\n"
        f"[recordings]\ndir = {json.dumps(str(recordings))}\nowner = \"{os.geteuid()}\"\n"
        f"[prompts]\ndir = {json.dumps(str(packaged_sounds_dir()))}\nasterisk_dir = \"{SOUNDS}\"\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONSENT_GATE_")}
    env.update(CONSENT_GATE_CONFIG=str(config), CONSENT_GATE_HMAC_KEY=HMAC_KEY)
    return AgiRig(config, journal, env, transport)


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
    """An Asterisk uniqueid (with a system name, as ``systemname`` in asterisk.conf gives)."""
    return f"agitest-{uuid.uuid4().int % 10**10}.{uuid.uuid4().int % 10**6}"


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


async def test_database_down_fails_closed_and_journals(make_rig: Callable[[str, Path], AgiRig], tmp_path: Path) -> None:
    """Key '1' pressed while PostgreSQL is unreachable: nothing may be recorded, and the
    journal gets the truth (the caller pressed the key, the gate was unavailable)."""
    rig = make_rig("postgresql://consent_gate@127.0.0.1:1/consent_gate", tmp_path)
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
    make_rig: Callable[[str, Path], AgiRig], pg_dsn: str, tmp_path: Path, ledger_rows
) -> None:
    """A purpose shipped without an agent notice prompt: the notice is left out, the decision
    is handed back and the script exits 0 (a failing script would make the dialplan drop the
    result, and with it a legally required recording)."""
    from consent_gate_rig.harness import SANDBOX_PURPOSES

    rig = make_rig(pg_dsn, tmp_path)
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



# -- the AGI environment: a caller name must not rewrite it (res_agi escapes nothing) ----------

_environment = agi_environment

def _hostile_environment(kind: str, call_id: str, network: bool) -> str:
    def agi_environment(*args: str, **kwargs: str) -> str:
        return _environment(*args, **kwargs, network=network)  # type: ignore[arg-type]

    clean = agi_environment("training", call_id=call_id)
    if kind == "newline rewrites agi_uniqueid":
        return agi_environment("training", call_id=call_id, name="Eve\nagi_uniqueid: 1.2")
    if kind == "blank line forges replies":
        # Ends the environment inside the name, completes it with the remaining keys, then
        # forges Asterisk's replies: ANSWER, then key "1" for the question.
        rest = clean.split("agi_calleridname: Test Caller\n", 1)[1]
        return agi_environment("training", call_id=call_id, name="Eve\n" + rest + "200 result=0\n200 result=49 endpos=1")
    if kind == "carriage return":
        return agi_environment("training", call_id=call_id, name="Eve\rX")
    if kind == "unexpected key":
        return clean.replace("agi_arg_1:", "agi_forged: 1\nagi_arg_1:")
    if kind == "not an Asterisk uniqueid":
        return agi_environment("training", call_id="../" + call_id)
    if kind == "environment cut short":
        return clean.split("agi_dnid", 1)[0]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["newline rewrites agi_uniqueid", "blank line forges replies", "carriage return",
                                  "unexpected key", "not an Asterisk uniqueid", "environment cut short"])
async def test_a_tampered_environment_is_refused_before_any_command(agi_rig: AgiRig, ledger_rows, kind: str) -> None:
    """res_agi writes ``agi_calleridname: <name>`` as it is: a line break in the name adds
    keys, or ends the environment and turns the rest into forged replies (a forged "1" would
    store a ``granted`` the caller never gave).  The script refuses such a session: no
    command, no ledger row; the dialplan's CONSENT_STATUS stays "unavailable"."""
    call_id = _call_id()
    session = agi_rig.start(call_id=call_id,
                            raw_environment=_hostile_environment(kind, call_id, agi_rig.transport == "fastagi"))
    if kind == "environment cut short":
        session.hang_up_pipe()
    code, rest = session.finish()
    assert (code, rest, session.commands) == (0, [], [])
    assert "consent.agi_environment_refused" in session.stderr()
    assert "Eve" not in session.stderr(), "the caller's data is not logged"
    assert await ledger_rows(call_id) == [] and await ledger_rows("1.2") == []


async def test_a_danish_caller_name_is_fine(agi_rig: AgiRig, ledger_rows) -> None:
    call_id = _call_id()
    session = agi_rig.start(call_id=call_id, name="Søren Ærø-Åberg \"Sø\" (privat)")
    _answer(session)
    session.expect(QUESTION, "200 result=49 endpos=100")
    assert _results(session)["CONSENT_STATUS"] == "granted"
    assert session.finish() == (0, [])


# -- AgiPort.discard_keys on pyst2's AGI over in-memory pipes ----------------------------------

async def test_discard_keys_drops_queued_keys_then_stops() -> None:
    from asterisk.agi import AGI

    from consent_gate.agi.script import AgiPort, Pyst2Commands

    replies = io.StringIO("\n" + "200 result=49\n200 result=42\n200 result=0\n" + "200 result=50\n")
    commands = io.StringIO()
    port = AgiPort(Pyst2Commands(AGI(stdin=replies, stdout=commands, stderr=io.StringIO())))
    await port.discard_keys()
    # WAIT FOR DIGIT 0 would read nothing: Asterisk's wait loop runs only while time is left.
    assert commands.getvalue().splitlines() == ["WAIT FOR DIGIT 10"] * 3
    assert await port.wait_key(5) == "2", "the key after the drained ones is still there"
    await port.stop_listening()


async def test_discard_keys_is_bounded() -> None:
    from asterisk.agi import AGI

    from consent_gate.agi.script import AgiPort, Pyst2Commands
    from consent_gate.agi.session import MAX_DISCARDED_KEYS

    replies = io.StringIO("\n" + "200 result=49\n" * (MAX_DISCARDED_KEYS + 5))
    commands = io.StringIO()
    await AgiPort(Pyst2Commands(AGI(stdin=replies, stdout=commands, stderr=io.StringIO()))).discard_keys()
    assert len(commands.getvalue().splitlines()) == MAX_DISCARDED_KEYS


# -- mid-call codes: the channel's CONSENT_* variables are checked before use --------------------

GET = re.compile(r'GET VARIABLE "([A-Z_]+)"')
SET = re.compile(r'SET VARIABLE "([A-Z_]+)" "(.*)"')
EXEC = re.compile(r'EXEC (\w+) "(.*)"')


@dataclass
class Channel:
    """The caller's channel as the mid-call script sees it: variables, and what it executed."""

    variables: dict[str, str]
    exec_replies: dict[str, str] = field(default_factory=dict)  # app -> reply (default "200 result=0")
    executed: list[tuple[str, str]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)  # GET/SET/EXEC in order
    after_first_read: dict[str, str] = field(default_factory=dict)  # changes once a variable is read
    _read: set[str] = field(default_factory=set)

    def serve(self, session: AgiSession) -> int:
        while (line := session.next_command()) is not None:
            if match := GET.fullmatch(line):
                name = match[1]
                if name in self._read and name in self.after_first_read:
                    self.variables[name] = self.after_first_read[name]
                self._read.add(name)
                value = self.variables.get(name, "")
                self.log.append(f"GET {name}")
                session.send(f"200 result=1 ({value})\n" if value else "200 result=0\n")
            elif match := SET.fullmatch(line):
                self.variables[match[1]] = match[2]
                self.log.append(f"SET {match[1]}={match[2]}")
                session.send("200 result=1\n")
            elif match := EXEC.fullmatch(line):
                self.executed.append((match[1], match[2]))
                self.log.append(f"EXEC {match[1]}")
                session.send(self.exec_replies.get(match[1], "200 result=0") + "\n")
            elif line.startswith("STREAM FILE"):
                session.send("200 result=0 endpos=8000\n")
            else:
                raise AssertionError(f"unexpected command {line!r}")
        code, _ = session.finish()
        return code


def _recorded_channel(rig: AgiRig, status: str = "granted", **overrides: str) -> tuple[Channel, str, str]:
    recording_id = uuid.uuid4().hex
    consent_id = str(uuid.uuid4())
    variables = {
        "CONSENT_PURPOSE": "training", "CONSENT_ID": consent_id, "CONSENT_STATUS": status,
        "CONSENT_RECORDING_ID": recording_id, "CONSENT_RECORD_LEGS": "1",
        "CONSENT_MIXMONITOR_ID": str(uuid.uuid4()),
        "MIXMONITOR_FILENAME": str(rig.config.parent / "recordings" / f"{recording_id}.wav"),
    }
    variables.update(overrides)
    return Channel(variables), recording_id, consent_id


def _make_files(rig: AgiRig, recording_id: str) -> list[Path]:
    paths = [rig.config.parent / "recordings" / f"{recording_id}{suffix}" for suffix in (".wav", "-caller.wav", "-agent.wav")]
    for path in paths:
        path.write_bytes(b"RIFF")
    return paths


def _midcall(rig: AgiRig, argument: str) -> tuple[AgiSession, str]:
    call_id = _call_id()
    return rig.start(argument, call_id=call_id), call_id


async def test_withdrawal_deletes_and_logs_even_when_stopmixmonitor_fails(agi_rig: AgiRig, ledger_rows) -> None:
    channel, recording_id, consent_id = _recorded_channel(agi_rig)
    channel.exec_replies["StopMixMonitor"] = "200 result=-2"  # app_mixmonitor not loaded: pyst2 raises
    files = _make_files(agi_rig, recording_id)
    session, call_id = _midcall(agi_rig, "midcall-withdraw-caller")
    assert channel.serve(session) == 0, session.stderr()
    assert "Traceback" not in session.stderr()
    assert not any(path.exists() for path in files), "withdrawn means gone, also when the stop failed"
    [row] = await ledger_rows(call_id)
    assert (row["event"], str(row["consent_id"]), row["recording_id"]) == ("withdrawn", consent_id, recording_id)
    detail = json.loads(row["detail"])
    assert detail["deleted_files"] == 3 and detail["recorder_stopped"] is False
    # Blocked before anything else: apply's MixMonitor and any resume see it.
    assert channel.log.index("SET CONSENT_WITHDRAWN=1") < channel.log.index("EXEC StopMixMonitor")
    assert channel.variables["CONSENT_WITHDRAWN"] == "1"
    assert channel.executed[0] == ("StopMixMonitor", channel.variables["CONSENT_MIXMONITOR_ID"])


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "0" * 31 + ",", uuid.uuid4().hex.upper(), ""])
async def test_withdrawal_with_a_malformed_recording_id_still_withdraws(agi_rig: AgiRig, ledger_rows, bad_id: str) -> None:
    """The id on the channel is unusable: MixMonitor's own MIXMONITOR_FILENAME (checked: our
    directory, 32 hex) names the files; the ledger gets ``withdrawn`` either way."""
    channel, recording_id, _ = _recorded_channel(agi_rig, CONSENT_RECORDING_ID=bad_id)
    files = _make_files(agi_rig, recording_id)
    session, call_id = _midcall(agi_rig, "midcall-withdraw-caller")
    assert channel.serve(session) == 0, session.stderr()
    assert not any(path.exists() for path in files)
    [row] = await ledger_rows(call_id)
    assert (row["event"], row["recording_id"]) == ("withdrawn", recording_id)
    assert json.loads(row["detail"])["recording_id_invalid"] is True
    assert channel.variables["CONSENT_WITHDRAWN"] == "1"
    assert [app for app, _ in channel.executed] == ["StopMixMonitor"]


async def test_withdrawal_without_any_usable_recording_id_still_logs_withdrawn(agi_rig: AgiRig, ledger_rows) -> None:
    channel, _, _ = _recorded_channel(agi_rig, CONSENT_RECORDING_ID="x,y", MIXMONITOR_FILENAME="/etc/passwd")
    session, call_id = _midcall(agi_rig, "midcall-withdraw-caller")
    assert channel.serve(session) == 0, session.stderr()
    [row] = await ledger_rows(call_id)
    assert (row["event"], row["recording_id"]) == ("withdrawn", None)
    assert channel.variables["CONSENT_WITHDRAWN"] == "1"


async def test_a_comma_in_the_recording_id_never_reaches_mixmonitor(agi_rig: AgiRig, ledger_rows) -> None:
    """32 characters, but not hex: as a MixMonitor argument the comma would start MixMonitor's
    command argument (run by a shell when recording ends)."""
    channel, _, _ = _recorded_channel(
        agi_rig, CONSENT_RECORDING_ID="a" * 18 + ",,touch /tmp/x", MIXMONITOR_FILENAME="",
        CONSENT_PAUSED_AT="2026-12-01T10:00:00+00:00")
    session, call_id = _midcall(agi_rig, "midcall-resume-agent")
    assert channel.serve(session) == 0, session.stderr()
    assert "MixMonitor" not in [app for app, _ in channel.executed]
    assert await ledger_rows(call_id) == [], "a resume that did not happen is not logged"


@pytest.mark.parametrize("paused_at", ["garbage", "2026-12-01T10:00:00", "2026-13-45T99:00:00+00:00", "9" * 200])
async def test_a_bad_paused_at_is_taken_as_not_paused(agi_rig: AgiRig, ledger_rows, paused_at: str) -> None:
    channel, _, _ = _recorded_channel(agi_rig, CONSENT_PAUSED_AT=paused_at)
    session, call_id = _midcall(agi_rig, "midcall-pause-agent")
    assert channel.serve(session) == 0, session.stderr()
    assert "Traceback" not in session.stderr()
    assert "consent.channel_variable_refused" in session.stderr()
    assert [r["event"] for r in await ledger_rows(call_id)] == ["paused"]
    assert datetime.fromisoformat(channel.variables["CONSENT_PAUSED_AT"]).tzinfo is not None


async def test_a_legal_obligation_recording_can_be_paused_for_card_data(agi_rig: AgiRig, ledger_rows) -> None:
    """PCI DSS: a "notified" (legal-obligation) recording must not capture card data either."""
    channel, recording_id, _ = _recorded_channel(agi_rig, status="notified", CONSENT_RECORD_LEGS="")
    session, call_id = _midcall(agi_rig, "midcall-pause-agent")
    assert channel.serve(session) == 0, session.stderr()
    assert [app for app, _ in channel.executed] == ["StopMixMonitor"]
    [row] = await ledger_rows(call_id)
    assert (row["event"], row["recording_id"]) == ("paused", recording_id)
    channel.variables["CONSENT_MIXMONITOR_ID"] = ""
    session, call_id = _midcall(agi_rig, "midcall-resume-agent")
    assert channel.serve(session) == 0, session.stderr()
    recordings = agi_rig.config.parent / "recordings"
    assert channel.executed[-1] == ("MixMonitor", f"{recordings}/{recording_id}.wav,abi(CONSENT_MIXMONITOR_ID)")
    assert [r["event"] for r in await ledger_rows(call_id)] == ["resumed"]


async def test_a_failed_pause_is_not_logged(agi_rig: AgiRig, ledger_rows) -> None:
    channel, _, _ = _recorded_channel(agi_rig)
    channel.exec_replies["StopMixMonitor"] = "200 result=-2"
    session, call_id = _midcall(agi_rig, "midcall-pause-agent")
    assert channel.serve(session) == 0, session.stderr()
    assert "Traceback" not in session.stderr()
    assert await ledger_rows(call_id) == []
    assert "CONSENT_PAUSED_AT" not in channel.variables


async def test_a_resume_after_a_withdrawal_never_starts_mixmonitor(agi_rig: AgiRig, ledger_rows) -> None:
    """The withdrawal lands between the resume's first read and its MixMonitor: the resume
    reads CONSENT_WITHDRAWN again right before starting it."""
    channel, _, _ = _recorded_channel(agi_rig, CONSENT_PAUSED_AT="2026-12-01T10:00:00+00:00")
    channel.after_first_read["CONSENT_WITHDRAWN"] = "1"
    session, call_id = _midcall(agi_rig, "midcall-resume-agent")
    assert channel.serve(session) == 0, session.stderr()
    assert "MixMonitor" not in [app for app, _ in channel.executed]
    assert await ledger_rows(call_id) == []


@pytest.mark.parametrize("variable, value", [("CONSENT_ID", "not-a-uuid"), ("CONSENT_PURPOSE", "training+x"),
                                             ("CONSENT_STATUS", "granted\\")])
async def test_unusable_variables_are_refused_and_named(agi_rig: AgiRig, ledger_rows, variable: str, value: str) -> None:
    channel, _, _ = _recorded_channel(agi_rig, **{variable: value})
    session, call_id = _midcall(agi_rig, "midcall-caller-records-caller")
    assert channel.serve(session) == 0, session.stderr()
    assert f'"variable": "{variable}"' in session.stderr()
    if variable == "CONSENT_STATUS":  # an unknown status is not a reason to lose the caller's word
        assert [r["event"] for r in await ledger_rows(call_id)] == ["caller-records"]
    else:
        assert await ledger_rows(call_id) == []


async def test_star0_while_the_grant_is_stored_withdraws_before_any_recording(
    agi_rig: AgiRig, ledger_rows, pg_dsn: str
) -> None:
    """res_agi reads and drops every frame between two commands, so a ``*0`` pressed while a
    slow ledger stores the "1" would be lost and MixMonitor would record the call.  The port
    listens after the key: CONSENT_WITHDRAWN=1 is set before the result ([consent-gate-apply]
    then never starts MixMonitor), the caller's confirmation is "withdrawn", the agent hears
    "not recorded", the ledger has granted, then withdrawn."""
    locker = await asyncpg.connect(pg_dsn)
    try:
        transaction = locker.transaction()
        await transaction.start()
        await locker.execute("LOCK TABLE consent_events IN SHARE MODE")  # the grant's INSERT waits
        call_id = _call_id()
        session = agi_rig.start(call_id=call_id)
        _answer(session)
        session.expect(QUESTION, "200 result=49 endpos=100")  # "1"
        assert session.command(answer_listening=False) == LISTEN
        session.send("200 result=42\n")  # "*"
        assert session.command(answer_listening=False) == LISTEN
        session.send("200 result=48\n")  # "0"
        await transaction.rollback()  # the ledger answers now
    finally:
        await locker.close()
    session.expect(r'SET VARIABLE "CONSENT_WITHDRAWN" "1"', "200 result=1")
    values = _results(session)
    assert session.finish() == (0, [])
    assert values["CONSENT_STATUS"] == "granted" and values["CONSENT_CONFIRMATION"] == f"{SOUNDS}/en/withdrawn"
    assert values["CONSENT_AGENT_NOTICE"] == f"{SOUNDS}/en/agent-not-recorded"
    granted, withdrawn = await ledger_rows(call_id)
    assert (granted["event"], withdrawn["event"]) == ("granted", "withdrawn")
    assert withdrawn["recording_id"] == granted["recording_id"] == values["CONSENT_RECORDING_ID"]
    assert json.loads(withdrawn["detail"])["when"] == "before-recording"


async def test_other_keys_heard_while_storing_change_nothing(agi_rig: AgiRig, ledger_rows) -> None:
    call_id = _call_id()
    session = agi_rig.start(call_id=call_id)
    _answer(session)
    session.expect(QUESTION, "200 result=49 endpos=100")
    line = session.command(answer_listening=False)
    if line == LISTEN:  # the ledger may already have answered
        session.send("200 result=53\n")  # "5"
        line = session.command()
    assert line.startswith('SET VARIABLE "CONSENT_RESULT"'), line
    session.send("200 result=1\n")
    session.expect(r'SET VARIABLE "__CONSENT_AGENT_NOTICE" ".*"', "200 result=1")
    assert session.finish() == (0, [])
    assert [r["event"] for r in await ledger_rows(call_id)] == ["granted"]


async def test_a_resume_once_the_recordings_directory_is_no_longer_private_records_nothing(
    pg_dsn: str, tmp_path: Path, ledger_rows
) -> None:
    """The FastAGI server checked the directory when it started; a resume may come hours later
    (the script checks at its own start, per call): it refuses MixMonitor then too."""
    rig = _rig(pg_dsn, tmp_path, "fastagi")
    try:
        channel, _, _ = _recorded_channel(rig, CONSENT_PAUSED_AT="2026-12-01T10:00:00+00:00")
        rig._start_server()  # while the directory is private
        (tmp_path / "recordings").chmod(0o750)
        session, call_id = _midcall(rig, "midcall-resume-agent")
        assert channel.serve(session) == 0, session.stderr()
        assert "MixMonitor" not in [app for app, _ in channel.executed]
        assert await ledger_rows(call_id) == [], "a resume that did not happen is not logged"
        assert "consent.resume_refused" in session.stderr()
    finally:
        rig.close()

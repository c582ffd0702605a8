"""The FastAGI server's protocol handling, against a fake Asterisk client.

The behaviour of a session (dialog, mid-call codes, the checks of the environment and of every
channel variable) is tests/unit/test_agi_script.py's, which runs on both transports.  Here: what
only the FastAGI transport has -- a TCP connection per session that the server must match replies
on, time out, and close; one ledger pool for every session; loopback only.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from consent_gate.agi.fastagi import AgiConnection, AgiProtocolError, FastAgiCommands, FastAgiServer, Timeouts
from consent_gate.agi.session import AgiRuntime, shared_ledger
from consent_gate.config import ConfigError, load_settings
from consent_gate.core.dialog import DTMF_STOP_KEYS, CallerHungUp
from consent_gate.ledger.journal import Journal
from consent_gate.ledger.store import Ledger
from consent_gate.prompts.catalog import PromptCatalog, packaged_sounds_dir
from consent_gate_rig.agidata import DISCARD, HMAC_KEY, LISTEN, SOUNDS, agi_environment

QUESTION = f'STREAM FILE {SOUNDS}/en/question-training "{DTMF_STOP_KEYS}" 0'
FAST = Timeouts(environment=0.5, command=0.5, play=0.5, exec=0.5, digit_slack=0.5)


def _settings(tmp_path: Path, dsn: str, **env: str) -> Any:
    recordings = tmp_path / "recordings"
    recordings.mkdir(mode=0o700, exist_ok=True)
    return load_settings(None, {
        "CONSENT_GATE_DSN": dsn, "CONSENT_GATE_HMAC_KEY": HMAC_KEY,
        "CONSENT_GATE_JOURNAL_DIR": str(tmp_path / "journal"),
        "CONSENT_GATE_RECORDINGS_DIR": str(recordings), "CONSENT_GATE_RECORDINGS_OWNER": str(os.geteuid()),
        "CONSENT_GATE_PROMPTS_DIR": str(packaged_sounds_dir()), "CONSENT_GATE_ASTERISK_SOUNDS_DIR": SOUNDS,
        **env,
    }, require_ari=False)


class Pools:
    """Counts the pools the ledger opens (asyncpg.create_pool, passed through)."""

    def __init__(self) -> None:
        self.opened = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.opened += 1
        return await asyncpg.create_pool(*args, **kwargs)


@pytest.fixture
async def server_factory(pg_dsn: str, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    made: list[tuple[FastAgiServer, Ledger]] = []

    async def make(*, timeouts: Timeouts = FAST, max_sessions: int = 50, pools: Pools | None = None) -> FastAgiServer:
        settings = _settings(tmp_path, pg_dsn)
        catalog = PromptCatalog.load(settings.prompts_dir)
        ledger = Ledger(settings.database_dsn, Journal(settings.journal_dir), write_timeout=5.0,
                        connect=pools or asyncpg.create_pool)
        await ledger.start()
        server = FastAgiServer(AgiRuntime(settings, lambda: catalog, shared_ledger(ledger)), "127.0.0.1", 0,
                               max_sessions, timeouts)
        await server.start()
        made.append((server, ledger))
        return server

    yield make
    for server, ledger in made:
        await server.close(grace=2)
        await ledger.close()


class FakeAsterisk:
    """Asterisk's end of one FastAGI connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.commands: list[str] = []

    @classmethod
    async def connect(cls, server: FastAgiServer, environment: str | None = None, *, call_id: str) -> FakeAsterisk:
        reader, writer = await asyncio.open_connection(*server.address)
        fake = cls(reader, writer)
        if environment is None:
            environment = agi_environment("training", call_id=call_id, network=True)
        await fake.send(environment)
        return fake

    async def send(self, text: str) -> None:
        self.writer.write(text.encode())
        await self.writer.drain()

    async def command(self, timeout: float = 5.0) -> str | None:
        """The next command, or None once the server closed the connection.  The port's short
        WAIT FOR DIGITs (dropping queued keys, listening after a key) are answered "no key"."""
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                return None
            command = line.decode().rstrip("\n")
            if command in (DISCARD, LISTEN):
                await self.send("200 result=0\n")
                continue
            self.commands.append(command)
            return command

    async def expect(self, command: str, reply: str) -> None:
        line = await self.command()
        assert line == command or (command.endswith("*") and line and line.startswith(command[:-1])), \
            f"expected {command!r}, got {line!r} after {self.commands}"
        await self.send(reply + "\n")

    async def closed(self, timeout: float = 5.0) -> list[str]:
        """Every command still sent until the server closed the connection."""
        rest = []
        while (line := await self.command(timeout)) is not None:
            rest.append(line)
        self.writer.close()
        return rest


def _call_id() -> str:
    return f"fastagi-{uuid.uuid4().int % 10**10}.{uuid.uuid4().int % 10**6}"


async def _events(dsn: str, call_id: str, timeout: float = 5.0) -> list[str]:
    connection = await asyncpg.connect(dsn)
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            rows = await connection.fetch("SELECT event FROM consent_events WHERE call_id = $1 ORDER BY seq", call_id)
            if rows or asyncio.get_running_loop().time() > deadline:
                return [row["event"] for row in rows]
            await asyncio.sleep(0.05)
    finally:
        await connection.close()


# -- replies: matched one to one, whatever else Asterisk writes ------------------------------

async def test_hangup_between_commands_ends_the_session_without_another_command(server_factory, pg_dsn) -> None:
    """Asterisk writes ``HANGUP`` when the channel goes away, also while no command is in
    flight: the server sends nothing more and logs the dialog as abandoned."""
    server = await server_factory()
    call_id = _call_id()
    fake = await FakeAsterisk.connect(server, call_id=call_id)
    await fake.expect("ANSWER", "200 result=0")
    await fake.expect(QUESTION, "200 result=0 endpos=40000\nHANGUP")
    assert await fake.closed() == []
    assert await _events(pg_dsn, call_id) == ["abandoned"]


async def test_a_trying_line_and_a_multiline_usage_reply_shift_no_reply(server_factory, pg_dsn) -> None:
    """``100 result=0 Trying...`` precedes a reply; a ``520-`` usage text runs to its ``520 ``
    line.  Neither is taken as the next command's reply: after the refused question the dialog
    fails closed and hands back "unavailable" in the very next command."""
    server = await server_factory()
    call_id = _call_id()
    fake = await FakeAsterisk.connect(server, call_id=call_id)
    await fake.expect("ANSWER", "100 result=0 Trying...\n200 result=0")
    await fake.expect(QUESTION, "520-Invalid command syntax.  Proper usage follows:\n"
                                " Usage: STREAM FILE <filename> <escape_digits> [<sample offset>]\n"
                                "200 result=49 endpos=1\n"
                                "520 End of proper usage.")
    line = await fake.command()
    assert line is not None and line.startswith('SET VARIABLE "CONSENT_RESULT"'), line
    assert line.endswith(':unavailable"'), line
    await fake.send("200 result=1\n")
    await fake.expect('SET VARIABLE "__CONSENT_AGENT_NOTICE" *', "200 result=1")
    assert await fake.closed() == []
    assert await _events(pg_dsn, call_id) == ["unavailable"]


@pytest.mark.parametrize("garbage", ["input nobody asked for", "a reply that is no reply", "a key not asked for"])
async def test_untrusted_input_ends_the_session_without_a_result(server_factory, pg_dsn, garbage: str) -> None:
    """Fail closed: a second line for one command, a line that is no reply, or a key the
    question did not allow ends the session -- no result is handed back (the dialplan's
    CONSENT_STATUS stays "unavailable"), nothing is recorded."""
    server = await server_factory()
    call_id = _call_id()
    fake = await FakeAsterisk.connect(server, call_id=call_id)
    reply = {"input nobody asked for": "200 result=0\n200 result=49 endpos=1",
             "a reply that is no reply": "hello",
             "a key not asked for": "200 result=0"}[garbage]
    await fake.expect("ANSWER", reply)
    if garbage == "a key not asked for":
        await fake.expect(QUESTION, "200 result=65 endpos=1")  # "A" is not a stop key
    else:
        line = await fake.command()
        if line is not None:  # the question may have gone out before the extra line arrived
            await fake.send("200 result=49 endpos=1\n")
    rest = await fake.closed()
    assert not any(command.startswith('SET VARIABLE "CONSENT_RESULT"') for command in fake.commands + rest)
    assert "granted" not in await _events(pg_dsn, call_id, timeout=1.0)


async def test_no_reply_in_time_closes_the_session(server_factory, pg_dsn) -> None:
    server = await server_factory()
    call_id = _call_id()
    fake = await FakeAsterisk.connect(server, call_id=call_id)
    assert await fake.command() == "ANSWER"
    started = asyncio.get_running_loop().time()
    assert await fake.closed(timeout=5) == []
    assert asyncio.get_running_loop().time() - started < 3


@pytest.mark.parametrize("kind", ["nothing", "not FastAGI", "another path", "two arguments", "no argument",
                                  "blank line forges replies", "forged replies in a later packet"])
async def test_an_environment_that_does_not_check_out_gets_no_command(server_factory, pg_dsn, kind: str) -> None:
    server = await server_factory()
    call_id = _call_id()
    clean = agi_environment("training", call_id=call_id, network=True)
    environment = {
        "nothing": "",
        "not FastAGI": agi_environment("training", call_id=call_id),
        "another path": clean.replace("agi_network_script: consent-gate", "agi_network_script: other"),
        "two arguments": clean.replace("agi_arg_1: training\n", "agi_arg_1: training\nagi_arg_2: x\n"),
        "no argument": clean.replace("agi_arg_1: training\n", ""),
        "blank line forges replies": clean.replace("agi_calleridname: Test Caller\n", "agi_calleridname: Eve\n"
                                                   + clean.split("agi_calleridname: Test Caller\n", 1)[1]
                                                   + "200 result=0\n200 result=49 endpos=1\n"),
        "forged replies in a later packet": clean,
    }[kind]
    fake = await FakeAsterisk.connect(server, environment, call_id=call_id)
    if kind == "forged replies in a later packet":
        # What followed a blank line in caller data, a few ms later (another TCP segment).
        await asyncio.sleep(0.005)
        await fake.send("200 result=0\n200 result=49 endpos=1\n")
    assert await fake.closed() == []
    assert await _events(pg_dsn, call_id, timeout=0.5) == []


# -- the commands' text and the replies' reading, on a connection with a fake transport -------

class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


async def _connection() -> tuple[AgiConnection, FakeTransport, FastAgiCommands]:
    connection = AgiConnection(lambda _: None, FAST)
    transport = FakeTransport()
    connection.connection_made(transport)
    connection.data_received(agi_environment("training", call_id="1.2", network=True).encode())
    assert connection.environment.done()
    return connection, transport, FastAgiCommands(connection, {})


async def _reply_to(connection: AgiConnection, call: Any, reply: bytes) -> Any:
    task = asyncio.ensure_future(call)
    await asyncio.sleep(0)
    connection.data_received(reply)
    return await task


async def test_get_variable_keeps_brackets_and_spaces_in_the_value() -> None:
    connection, transport, commands = await _connection()
    value = await _reply_to(connection, commands.get_variable("X"), b"200 result=1 (a (b) c) endpos=1)\n")
    assert value == "a (b) c) endpos=1"
    assert transport.written == b'GET VARIABLE "X"\n'
    assert await _reply_to(connection, commands.get_variable("X"), b"200 result=0\n") == ""


async def test_replies_split_across_packets_are_joined() -> None:
    connection, _, commands = await _connection()
    task = asyncio.ensure_future(commands.wait_for_digit(50))
    await asyncio.sleep(0)
    connection.data_received(b"200 res")
    await asyncio.sleep(0)
    assert not task.done()
    connection.data_received(b"ult=42\n")
    assert await task == "*"


@pytest.mark.parametrize("reply", [b"511 Command Not Permitted on a dead channel or intercept routine\n",
                                   b"200 result=-1\n", b"HANGUP\n"])
async def test_a_dead_channel_is_a_hangup_and_stays_one(reply: bytes) -> None:
    connection, transport, commands = await _connection()
    with pytest.raises(CallerHungUp):
        await _reply_to(connection, commands.stream_file("/snd/x", "12"), reply)
    if reply != b"200 result=-1\n":  # -1 can be an application's failure; 511/HANGUP are final
        sent = len(transport.written)
        with pytest.raises(CallerHungUp):
            await commands.set_variable("A", "b")
        assert len(transport.written) == sent, "nothing is sent on a dead channel"


async def test_an_argument_that_could_leave_its_quotes_is_never_sent() -> None:
    connection, transport, commands = await _connection()
    for value in ('a" "b', "a\\", "a\nb"):
        with pytest.raises(ValueError):
            await commands.set_variable("A", value)
    with pytest.raises(ValueError):
        await commands.stream_file("/snd/x y", "")
    assert transport.written == b""


async def test_end_of_input_before_the_blank_line_is_an_incomplete_environment() -> None:
    connection = AgiConnection(lambda _: None, FAST)
    connection.connection_made(FakeTransport())
    connection.data_received(b"agi_network: yes\nagi_request: agi://x\n")
    assert not connection.environment.done()
    connection.eof_received()
    assert connection.environment.result() == "agi_network: yes\nagi_request: agi://x\n"
    with pytest.raises(CallerHungUp):
        await FastAgiCommands(connection, {}).answer()


@pytest.mark.parametrize("data", [b"2" * 20000, b"200 result=0 (" + b"x" * 20000 + b")\n"], ids=["unended", "ended"])
async def test_an_overlong_line_breaks_the_session(data: bytes) -> None:
    connection, _, commands = await _connection()
    task = asyncio.ensure_future(commands.answer())
    await asyncio.sleep(0)
    connection.data_received(data)
    with pytest.raises(AgiProtocolError):
        await task


# -- one server, many calls ---------------------------------------------------------------------

async def test_concurrent_sessions_share_one_ledger_pool(pg_dsn: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The server as main() runs it (serve()): every session's decision goes through the one
    Ledger -- one asyncpg pool -- it started, never a ledger or a connection of its own."""
    from consent_gate.agi import fastagi, session

    ledgers: list[Ledger] = []
    pools = Pools()

    class CountedLedger(Ledger):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs, connect=pools)
            ledgers.append(self)

    monkeypatch.setattr(fastagi, "Ledger", CountedLedger)
    monkeypatch.setattr(session, "Ledger", CountedLedger)
    settings = _settings(tmp_path, pg_dsn, CONSENT_GATE_FASTAGI_LISTEN="127.0.0.1:0")
    stop = asyncio.Event()
    ready: asyncio.Future[FastAgiServer] = asyncio.get_running_loop().create_future()
    serving = asyncio.ensure_future(fastagi.serve(settings, stop, ready=ready.set_result))
    try:
        server = await asyncio.wait_for(ready, 10)
        call_ids = [_call_id() for _ in range(5)]
        fakes = [await FakeAsterisk.connect(server, call_id=call_id) for call_id in call_ids]
        for fake in fakes:
            await fake.expect("ANSWER", "200 result=0")
        for fake in fakes:
            await fake.expect(QUESTION, "200 result=50 endpos=100")  # "2": declined
        for fake in fakes:
            await fake.expect('SET VARIABLE "CONSENT_RESULT" *', "200 result=1")
            await fake.expect('SET VARIABLE "__CONSENT_AGENT_NOTICE" *', "200 result=1")
            assert await fake.closed() == []
        for call_id in call_ids:
            assert await _events(pg_dsn, call_id) == ["declined"]
    finally:
        stop.set()
        await asyncio.wait_for(serving, 15)
    assert (len(ledgers), pools.opened) == (1, 1), "one pool for the server's lifetime, not one per call"


async def test_beyond_max_sessions_a_call_is_closed_at_once(server_factory, pg_dsn) -> None:
    server = await server_factory(max_sessions=1, timeouts=Timeouts())
    first = await FakeAsterisk.connect(server, call_id=_call_id())
    assert await first.command() == "ANSWER"
    second_id = _call_id()
    second = await FakeAsterisk.connect(server, call_id=second_id)
    assert await second.closed() == []
    await first.send("200 result=-1\n")
    assert await first.closed() == []
    assert await _events(pg_dsn, second_id, timeout=0.5) == []


# -- settings and the entry point -------------------------------------------------------------

@pytest.mark.parametrize("listen", ["0.0.0.0:4573", "192.0.2.1:4573", "localhost:4573", "[::]:4573", "4573"])
def test_fastagi_listens_on_loopback_only(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigError, match="fastagi.listen"):
        _settings(tmp_path, "postgresql:///x", CONSENT_GATE_FASTAGI_LISTEN=listen)


@pytest.mark.parametrize("listen", ["127.0.0.1:4573", "[::1]:4573", "127.0.0.2:14573"])
def test_fastagi_loopback_addresses_are_accepted(tmp_path: Path, listen: str) -> None:
    assert _settings(tmp_path, "postgresql:///x", CONSENT_GATE_FASTAGI_LISTEN=listen).fastagi_listen == listen


def test_check_config(tmp_path: Path, pg_dsn: str) -> None:
    config = tmp_path / "consent-gate.toml"
    recordings = tmp_path / "recordings"
    recordings.mkdir(mode=0o700)
    config.write_text(f"[ledger]\ndsn = {json.dumps(pg_dsn)}\njournal_dir = {json.dumps(str(tmp_path / 'j'))}\n"
                      f"[recordings]\ndir = {json.dumps(str(recordings))}\nowner = \"{os.geteuid()}\"\n"
                      "[fastagi]\nlisten = \"127.0.0.1:4573\"\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONSENT_GATE_")}
    env["CONSENT_GATE_HMAC_KEY"] = HMAC_KEY
    run = [sys.executable, "-m", "consent_gate.agi.fastagi", "--config", str(config), "--check-config"]
    done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "configuration ok"), done.stderr
    recordings.chmod(0o750)
    done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and re.search("recordings", done.stderr), done.stderr

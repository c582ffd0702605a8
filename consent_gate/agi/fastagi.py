"""consent-gate-fastagi: the AGI gate as one long-lived FastAGI server (asyncio, TCP, loopback).

    [globals]
    CONSENT_GATE_AGI=agi://127.0.0.1:4573/consent-gate

    exten => _X.,1,Gosub(consent-gate-agi,s,1(training))      ; unchanged

Asterisk's ``AGI(agi://...)`` opens one TCP connection per session and speaks the same AGI
protocol over it as over a script's stdin/stdout: the environment (``agi_network: yes``,
``agi_network_script: <path>``, then the ``agi_*`` lines, then a blank line), then one command at
a time, each answered by one ``200 result=...`` line (``HANGUP`` when the channel goes away,
``511`` for a command on a dead channel).  Each connection is one task here; the session itself
(the dialog, the mid-call codes, every check of what the channel says) is
``consent_gate.agi.session`` -- the code the process-per-call script runs -- over one PostgreSQL
pool and one prompt catalogue for the server's lifetime, so a call costs no Python start, no
imports and no database connection.

Fail closed, never fail the call: anything the server does not trust (an environment that does
not check out, input nobody asked for, a reply that is no reply, no reply in time) ends the
session without a result, so ``[consent-gate-agi]`` leaves ``CONSENT_STATUS=unavailable`` and the
call goes on unrecorded.  If the server is down, ``AGI()`` fails at once (``AGISTATUS=FAILURE``):
the same.  Listening beyond loopback is refused: AGI has no authentication, and whoever could
reach the port could hand the dialplan a consent nobody gave.

pyst2's own FastAGI server does not run on Python 3.11+; ``panoramisk`` 1.4 was evaluated and not
used (docs/performance.md, "FastAGI"): it reads the environment without bounds or checks, keeps
no command timeouts, and a ``HANGUP`` line or a multi-line ``520`` reply shifts every later reply
by one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from consent_gate.agi.session import (
    EARLY_INPUT_GRACE_S,
    MAX_ENVIRONMENT_LINES,
    AgiInputError,
    AgiRuntime,
    read_agi_environment,
    run_session,
    shared_ledger,
)
from consent_gate.config import ConfigError, Settings, load_settings
from consent_gate.contract import CONTROL_CHARACTERS
from consent_gate.core.dialog import CallerHungUp
from consent_gate.ledger.journal import Journal
from consent_gate.ledger.store import Ledger
from consent_gate.log import configure_logging
from consent_gate.prompts.catalog import PromptCatalog, PromptError
from consent_gate.service import (
    add_service_arguments,
    check_journal_writable,
    check_prompts,
    check_recordings_dir,
    run_until_signalled,
)

log = structlog.get_logger(__name__)

# The URL's path: AGI(agi://127.0.0.1:4573/consent-gate,<purpose>).  Anything else is refused.
SCRIPT = "consent-gate"
DEFAULT_PORT = 4573

MAX_LINE = 16384  # one environment line or reply (GET VARIABLE returns a value in it)
MAX_USAGE_LINES = 64  # a "520-" usage text ends with its "520 " line

# Keys Asterisk reports: STREAM FILE stops only on the escape digits it was given.
DTMF_KEYS = frozenset("0123456789*#ABCD")
# The shape of every reply the gate's commands get (the data in brackets for GET VARIABLE;
# STREAM FILE adds endpos).  Anything else is refused, never guessed at.
_REPLY = re.compile(r"200 result=(-?[0-9]{1,10})(?: \((.*)\))?(?: endpos=-?[0-9]{1,20})?", re.DOTALL)
# An argument is sent inside double quotes (as pyst2 sends it); these could end or escape them.
_UNQUOTABLE = re.compile(r'["\\]')
_MEDIA = re.compile(r"/?[A-Za-z0-9/_.&-]{1,800}")


class AgiProtocolError(Exception):
    """The session cannot be trusted any more (no reply in time, a reply that is no reply,
    input nobody asked for).  The message names what, never a value."""


class AgiCommandError(Exception):
    """Asterisk refused a command (510 unknown, 520 usage): a bug here, not the caller's doing."""


@dataclass(frozen=True)
class Timeouts:
    """How long the server waits for Asterisk (seconds)."""

    environment: float = 5.0  # from the connection to the environment's blank line
    command: float = 10.0  # ANSWER, SET/GET VARIABLE
    play: float = 300.0  # STREAM FILE: the longest prompt, with room to spare
    exec: float = 30.0  # EXEC MixMonitor / StopMixMonitor
    digit_slack: float = 10.0  # WAIT FOR DIGIT: its own timeout plus this


class AgiConnection(asyncio.Protocol):
    """One FastAGI connection: splits Asterisk's input into lines, hands the environment over
    once complete, then matches each reply to the one command in flight."""

    def __init__(self, on_open: Callable[[AgiConnection], None], timeouts: Timeouts) -> None:
        self._on_open = on_open
        self.timeouts = timeouts
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.environment: asyncio.Future[str] = loop.create_future()
        self._environment_lines: list[bytes] = []
        self._buffer = bytearray()
        self._pending: asyncio.Future[str] | None = None
        self._usage: list[str] | None = None
        self.commands_sent = 0
        self.hung_up = False  # Asterisk said HANGUP (or 511, or closed its side)
        self.broken: str | None = None  # why the session cannot be trusted any more
        self.early_input = False  # input after the environment, before any command

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._on_open(self)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[:end + 1]
            if len(line) > MAX_LINE:
                self._break("a line longer than the limit")
                return
            self._line(line)
        if len(self._buffer) > MAX_LINE:
            self._break("a line longer than the limit")

    def eof_received(self) -> bool | None:
        self._gone()
        return True  # the session closes the connection once it is done (the ledger first)

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()

    # -- input ------------------------------------------------------------------------------

    def _line(self, line: bytes) -> None:
        if not self.environment.done():
            self._environment_lines.append(line + b"\n")
            if line == b"" or len(self._environment_lines) > MAX_ENVIRONMENT_LINES:
                self.environment.set_result(self._environment_text())
            return
        text = line.decode("utf-8", "replace")
        if text == "HANGUP":  # the channel is gone; a reply may still follow, or not
            self.hung_up = True
            self._settle(exception=CallerHungUp())
            return
        pending = self._pending
        if pending is None or pending.done():
            if self.hung_up or self.broken:
                return  # the reply to a command already given up on, after the hangup
            if self.commands_sent == 0:
                self.early_input = True
            self._break("input nobody asked for")
            return
        if self._usage is not None:  # a multi-line "520-" usage text, up to its "520 " line
            self._usage.append(text)
            if text.startswith("520 ") or len(self._usage) > MAX_USAGE_LINES:
                self._usage = None
                pending.set_result("520")
            return
        if text.startswith("520-"):
            self._usage = [text]
            return
        if text.startswith("100 "):  # "100 result=0 Trying...": the real reply follows
            return
        pending.set_result(text)

    def _environment_text(self) -> str:
        return b"".join(self._environment_lines).decode("utf-8", "replace")

    def _gone(self) -> None:
        if not self.environment.done():
            self.environment.set_result(self._environment_text())  # incomplete: refused
        self.hung_up = True
        self._settle(exception=CallerHungUp())

    def _break(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
        self._settle(exception=AgiProtocolError(reason))
        if not self.environment.done():
            self.environment.set_result(self._environment_text())

    def _settle(self, *, exception: BaseException) -> None:
        if self._pending is not None and not self._pending.done():
            self._pending.set_exception(exception)

    # -- commands ---------------------------------------------------------------------------

    async def command(self, text: str, timeout: float) -> str:
        """Send one command; its reply line (``100`` and ``520-`` lines are taken care of)."""
        if self.broken is not None:
            raise AgiProtocolError(self.broken)
        if self.hung_up or self.transport is None or self.transport.is_closing():
            raise CallerHungUp()
        if self._pending is not None:
            raise AgiProtocolError("a command while another is in flight")  # a bug, never Asterisk's
        pending = self._pending = asyncio.get_running_loop().create_future()
        self.commands_sent += 1
        self.transport.write(text.encode() + b"\n")
        try:
            async with asyncio.timeout(timeout):
                return await pending
        except TimeoutError:
            verb = " ".join(word for word in text.split(" ")[:3] if word.isalpha() and word.isupper())
            self._break(f"no reply to {verb} within {timeout:g} s")
            raise AgiProtocolError(self.broken or "timeout") from None
        finally:
            self._pending = None

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def _quoted(value: str) -> str:
    """An argument as pyst2 sends it, in double quotes; refused if it could leave them."""
    if _UNQUOTABLE.search(value) or CONTROL_CHARACTERS.search(value):
        raise ValueError("an AGI argument with a quote, a backslash or a control character")
    return f'"{value}"'


@dataclass
class FastAgiCommands:
    """:class:`~consent_gate.agi.session.AgiCommands` over one FastAGI connection, with the
    same command text and the same reading of the replies as pyst2 (``result=-1``, ``511`` and
    EXEC's ``-2`` count as the channel gone)."""

    connection: AgiConnection
    env: dict[str, str] = field(default_factory=dict)

    async def _result(self, command: str, timeout: float) -> tuple[int, str]:
        line = await self.connection.command(command, timeout)
        if line.startswith("511"):
            self.connection.hung_up = True
            raise CallerHungUp()
        if line.startswith(("510", "520")):
            raise AgiCommandError(f"{command.split(' ', 1)[0]}: Asterisk answered {line[:3]}")
        match = _REPLY.fullmatch(line)
        if match is None:
            self.connection._break("a reply that is not '200 result=...'")
            raise AgiProtocolError("a reply that is not '200 result=...'")
        result = int(match[1])
        if result == -1:  # the application failed, or the channel hung up
            raise CallerHungUp()
        return result, match[2] or ""

    def _key(self, result: int, allowed: frozenset[str] | str) -> str:
        if result == 0:
            return ""
        key = chr(result) if 0 < result < 0x110000 else ""
        if key not in allowed or key not in DTMF_KEYS:
            self.connection._break("a key that was not asked for")
            raise AgiProtocolError("a key that was not asked for")
        return key

    async def answer(self) -> None:
        await self._result("ANSWER", self.connection.timeouts.command)

    async def stream_file(self, media: str, escape_digits: str) -> str:
        if not _MEDIA.fullmatch(media):
            raise ValueError("a prompt path the AGI command line cannot carry")
        result, _ = await self._result(f"STREAM FILE {media} {_quoted(escape_digits)} 0",
                                       self.connection.timeouts.play)
        return self._key(result, escape_digits)

    async def wait_for_digit(self, timeout_ms: int) -> str:
        timeout_ms = max(0, int(timeout_ms))
        result, _ = await self._result(f"WAIT FOR DIGIT {timeout_ms}",
                                       timeout_ms / 1000 + self.connection.timeouts.digit_slack)
        return self._key(result, DTMF_KEYS)

    async def set_variable(self, name: str, value: str) -> None:
        await self._result(f"SET VARIABLE {_quoted(name)} {_quoted(value)}", self.connection.timeouts.command)

    async def get_variable(self, name: str) -> str:
        result, data = await self._result(f"GET VARIABLE {_quoted(name)}", self.connection.timeouts.command)
        return data if result == 1 else ""

    async def appexec(self, application: str, options: str) -> str:
        if not application.isalnum():
            raise ValueError("not an application name")
        result, _ = await self._result(f"EXEC {application} {_quoted(options)}", self.connection.timeouts.exec)
        if result == -2:  # no such application (pyst2: AGIAppError)
            raise CallerHungUp()
        return str(result)


@dataclass
class FastAgiServer:
    """The listening socket and its sessions: one task per connection, at most ``max_sessions``."""

    runtime: AgiRuntime
    host: str
    port: int
    max_sessions: int = 500
    timeouts: Timeouts = field(default_factory=Timeouts)
    sessions: set[asyncio.Task[None]] = field(default_factory=set)
    _server: asyncio.Server | None = None
    served: int = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: AgiConnection(self._open, self.timeouts),
                                                self.host, self.port, reuse_address=True)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    def _open(self, connection: AgiConnection) -> None:
        if len(self.sessions) >= self.max_sessions:
            # The call goes on unrecorded ([consent-gate-agi]: no result, "unavailable").
            log.warning("consent.fastagi_busy", sessions=len(self.sessions))
            connection.close()
            return
        task = asyncio.get_running_loop().create_task(self._serve(connection), name="fastagi-session")
        self.sessions.add(task)
        task.add_done_callback(self.sessions.discard)

    async def _serve(self, connection: AgiConnection) -> None:
        self.served += 1
        try:
            env = await self._environment(connection)
            if env is None:
                return
            await run_session(self.runtime, FastAgiCommands(connection, env), env["agi_arg_1"])
        except CallerHungUp:
            log.info("consent.fastagi_hung_up")
        except AgiProtocolError as error:
            log.error("consent.fastagi_session_broken", reason=str(error))
        except PromptError as error:
            log.error("consent.prompt_missing", error=str(error))
        except Exception as error:  # noqa: BLE001 -- one session's bug never takes the server down
            log.error("consent.fastagi_session_failed", error=f"{type(error).__name__}: {error}"[:200],
                      exc_info=error)
        finally:
            connection.close()

    async def _environment(self, connection: AgiConnection) -> dict[str, str] | None:
        """The checked environment, or None (logged) -- then no command is sent at all."""
        try:
            async with asyncio.timeout(self.timeouts.environment):
                text = await connection.environment
            # newline="\n": a "\r" in caller data stays inside its line (and is refused there).
            env = read_agi_environment(io.StringIO(text, newline="\n"), None, network_script=SCRIPT)
            # Asterisk writes nothing between the environment and the first reply: input here
            # means the environment ended early (a blank line in caller data) and the rest
            # would be forged replies.
            await asyncio.sleep(EARLY_INPUT_GRACE_S)
            if connection.early_input or connection.broken is not None:
                raise AgiInputError("AGI environment: input after its end before any command "
                                    "(a line break in caller data?)")
            return env
        except TimeoutError:
            log.error("consent.agi_environment_refused", error="AGI environment: not complete in time")
        except AgiInputError as error:
            log.error("consent.agi_environment_refused", error=str(error))
        return None

    async def close(self, grace: float = 10.0) -> None:
        """Stop listening; let the sessions in flight finish for up to ``grace`` seconds."""
        if self._server is not None:
            self._server.close()
        if self.sessions:
            _, left = await asyncio.wait(set(self.sessions), timeout=grace)
            for task in left:
                task.cancel()
            if left:
                await asyncio.wait(left, timeout=2)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None


def listen_address(settings: Settings) -> tuple[str, int]:
    host, _, port = settings.fastagi_listen.rpartition(":")
    return host.strip("[]"), int(port)


async def serve(settings: Settings, stop: asyncio.Event, *, ready: Callable[[FastAgiServer], None] | None = None
                ) -> None:
    catalog = PromptCatalog.load(settings.prompts_dir)
    check_prompts(settings, catalog)
    ledger = Ledger(settings.database_dsn, Journal(settings.journal_dir), write_timeout=settings.ledger_write_timeout)
    await ledger.start()
    host, port = listen_address(settings)
    server = FastAgiServer(AgiRuntime(settings, lambda: catalog, shared_ledger(ledger)), host, port,
                           settings.fastagi_max_sessions)
    try:
        await server.start()
        log.info("consent_gate.fastagi_started", listen=f"{host}:{server.address[1]}", script=SCRIPT,
                 purposes=sorted(settings.purposes))
        if ready is not None:
            ready(server)
        await stop.wait()
    finally:
        await server.close()
        await ledger.close()
        log.info("consent_gate.fastagi_stopped", sessions=server.served)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="consent-gate-fastagi",
        description="FastAGI server for the AGI gate: CONSENT_GATE_AGI=agi://127.0.0.1:4573/consent-gate. "
        "Reads the same settings as consent-gate-ari (--config or $CONSENT_GATE_CONFIG; [fastagi] listen).",
    )
    add_service_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_format, getattr(logging, args.log_level.upper()))
    try:
        settings = load_settings(args.config, require_ari=False)
        check_recordings_dir(settings)
        if args.check_config:
            check_prompts(settings, PromptCatalog.load(settings.prompts_dir))
            check_journal_writable(settings.journal_dir)
            print("configuration ok")
            return 0
    except (ConfigError, PromptError) as error:
        print(f"consent-gate-fastagi: {error}", file=sys.stderr)
        return 2

    try:
        return run_until_signalled(serve, settings, "consent-gate-fastagi")
    except OSError as error:  # the port is taken, or not ours to bind
        print(f"consent-gate-fastagi: cannot listen on {settings.fastagi_listen}: {error.strerror}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

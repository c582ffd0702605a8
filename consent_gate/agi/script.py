"""consent-gate-agi: the consent dialog as a classic AGI script (pyst2 ``asterisk.agi``).

    exten => _X.,1,Gosub(consent-gate-agi,s,1(training))

One process per call, on Asterisk's stdin/stdout.  The dialog and the mid-call codes are
``consent_gate.agi.session`` -- the same code the FastAGI server (``consent_gate.agi.fastagi``)
runs, over the same core as the ARI service; this file only carries the AGI commands through
pyst2.  pyst2 is blocking, so each command runs in a worker thread while the event loop keeps
the ledger's connection alive.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import select
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from consent_gate.agi.session import (
    EARLY_INPUT_GRACE_S,
    MAX_ENVIRONMENT_LINE,
    MAX_ENVIRONMENT_LINES,
    AgiInputError,
    AgiPort,
    AgiRuntime,
    ledger_per_call,
    parse_midcall,
    read_agi_environment,
    run_session,
)
from consent_gate.config import ConfigError, load_settings
from consent_gate.core.dialog import CallerHungUp
from consent_gate.core.midcall import Action
from consent_gate.log import configure_logging
from consent_gate.prompts.catalog import PromptCatalog, PromptError
from consent_gate.recordings import check_private_dir

log = structlog.get_logger(__name__)

__all__ = ["AgiPort", "Pyst2Commands", "main"]


def _agi_errors() -> tuple[type[BaseException], ...]:
    from asterisk.agi import AGIAppError, AGIHangup, AGIUnknownError  # type: ignore[import-untyped]

    # pyst2 raises AGIAppError (not an AGIHangup) for "result=-1", which is how Asterisk
    # reports a hangup during STREAM FILE / WAIT FOR DIGIT, and AGIUnknownError for
    # "511 Command Not Permitted on a dead channel".  For the bare "HANGUP" line Asterisk
    # writes when the channel goes away, and for the end of its input (Asterisk closed the
    # pipe), pyst2 fails to parse a result code and raises ValueError.  All mean the caller
    # is gone.
    return (AGIHangup, AGIAppError, AGIUnknownError, BrokenPipeError, EOFError, ValueError)


@dataclass
class Pyst2Commands:
    """:class:`~consent_gate.agi.session.AgiCommands` over pyst2's blocking ``AGI`` object."""

    agi: Any

    @property
    def env(self) -> dict[str, str]:
        return self.agi.env

    async def _run(self, func: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.to_thread(func, *args)
        except _agi_errors() as error:
            raise CallerHungUp() from error

    async def answer(self) -> None:
        await self._run(self.agi.answer)

    async def stream_file(self, media: str, escape_digits: str) -> str:
        return str(await self._run(self.agi.stream_file, media, escape_digits) or "")

    async def wait_for_digit(self, timeout_ms: int) -> str:
        return str(await self._run(self.agi.wait_for_digit, timeout_ms) or "")

    async def set_variable(self, name: str, value: str) -> None:
        await self._run(self.agi.set_variable, name, value)

    async def get_variable(self, name: str) -> str:
        return str(await self._run(self.agi.get_variable, name) or "")

    async def appexec(self, application: str, options: str) -> str:
        return str(await self._run(self.agi.appexec, application, options))


def read_environment_text(fd: int) -> str:
    """The environment as Asterisk wrote it, read byte by byte so that nothing after its blank
    line is buffered here (see :func:`input_waiting`)."""
    data = bytearray()
    limit = MAX_ENVIRONMENT_LINES * (MAX_ENVIRONMENT_LINE + 1)
    while not data.endswith(b"\n\n") and data != b"\n" and len(data) < limit:
        byte = os.read(fd, 1)
        if not byte:
            break
        data += byte
    return data.decode("utf-8", "replace")


def input_waiting(fd: int, timeout: float) -> bool:
    ready, _, _ = select.select([fd], [], [], timeout)
    return bool(ready)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="consent-gate-agi",
        description="Consent dialog as an AGI script: AGI(consent-gate-agi,<purpose>). "
        "Reads the same settings as consent-gate-ari (--config or $CONSENT_GATE_CONFIG).",
    )
    parser.add_argument("purpose", help="purpose name from the purpose catalogue, or midcall-<action>-<caller|agent> "
                        "(action: withdraw, caller-records, pause, resume) from the features.conf routines")
    parser.add_argument("--config", type=Path)
    args = parser.parse_args(argv)
    # AGI speaks on stdout; logs go to stderr (Asterisk's console), never caller data to a shell.
    configure_logging("json")
    midcall = parse_midcall(args.purpose)
    try:
        settings = load_settings(args.config, require_ari=False)
        if midcall is None or midcall[0] is Action.RESUME:
            # Only what may start MixMonitor is refused: withdrawing and pausing always work.
            # The script runs as the Asterisk user, so the directory must be its own.
            check_private_dir(settings.recordings_dir, os.geteuid())
    except ConfigError as error:
        print(f"consent-gate-agi: {error}", file=sys.stderr)
        return 2
    from asterisk.agi import AGI

    fd = sys.stdin.fileno()
    try:
        # newline="\n": a "\r" in caller data stays inside its line (and is refused there)
        # instead of splitting it into a line of its own.
        env = read_agi_environment(io.StringIO(read_environment_text(fd), newline="\n"), args.purpose)
        if input_waiting(fd, EARLY_INPUT_GRACE_S):
            raise AgiInputError("AGI environment: input after its end before any command "
                                "(a line break in caller data?)")
    except AgiInputError as error:
        # No command is sent: the dialplan's CONSENT_STATUS stays "unavailable".
        log.error("consent.agi_environment_refused", error=str(error))
        return 0
    # pyst2 reads the environment itself: hand it an empty one, then the checked one and the
    # real input.  It also echoes what it reads to stderr: silence it.
    stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace", newline="\n")
    agi = AGI(stdin=io.StringIO("\n"), stdout=sys.stdout, stderr=open(os.devnull, "w"))  # noqa: SIM115 -- open for the process's life
    agi.stdin, agi.env = stdin, env
    runtime = AgiRuntime(settings, lambda: PromptCatalog.load(settings.prompts_dir), ledger_per_call(settings))
    try:
        asyncio.run(run_session(runtime, Pyst2Commands(agi), args.purpose))
    except PromptError as error:
        log.error("consent.prompt_missing", error=str(error))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

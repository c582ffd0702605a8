"""What the long-running services share -- the ARI service and the FastAGI server, which must
not import each other: their command-line options, what they check before serving (and
``--check-config`` reports), and running until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from consent_gate.config import ConfigError, Settings
from consent_gate.prompts.catalog import PromptCatalog, PromptError
from consent_gate.recordings import check_private_dir, owner_uid


def check_prompts(settings: Settings, catalog: PromptCatalog) -> None:
    """Every purpose's prompt and the shared prompts must exist in the default language."""
    needed = {p.prompt for p in settings.purposes.values()} | {"invalid", "granted", "declined"}
    for name in sorted(needed):
        catalog.version(settings.default_language, name)


def check_recordings_dir(settings: Settings) -> None:
    """Refuse to run unless MixMonitor's directory is private to the Asterisk user."""
    check_private_dir(settings.recordings_dir, owner_uid(settings.recordings_owner))


def check_journal_writable(directory: Path) -> None:
    """The journal is the fallback while PostgreSQL is down: prove now that a write reaches the
    disk there (create, fsync, remove a probe file), not on the first outage."""
    probe = directory / f".check-config-{os.getpid()}"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, b"probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"ledger.journal_dir {directory}: not writable ({error.strerror})") from None


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file (default: $CONSENT_GATE_CONFIG)")
    parser.add_argument("--check-config", action="store_true", help="validate settings and prompts, then exit")
    parser.add_argument("--log-format", choices=("json", "console"), default="json")
    parser.add_argument("--log-level", choices=("debug", "info", "warning"),
                        default=os.environ.get("CONSENT_GATE_LOG_LEVEL", "info"))


def run_until_signalled(serve: Callable[[Settings, asyncio.Event], Awaitable[None]], settings: Settings,
                        prog: str) -> int:
    """Run ``serve`` until SIGTERM or SIGINT sets its stop event; the exit code."""

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    try:
        asyncio.run(run())
    except PromptError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    return 0

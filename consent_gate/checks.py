"""What a long-running service checks before it serves (and ``--check-config`` reports):
shared by the ARI service and the FastAGI server, which must not import each other."""

from __future__ import annotations

import os
from pathlib import Path

from consent_gate.config import ConfigError, Settings
from consent_gate.prompts.catalog import PromptCatalog
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

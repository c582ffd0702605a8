"""The recordings directory must be private: owned by the Asterisk user, mode 0700, a real directory.

MixMonitor creates missing directories 0777 and files ``0666 & ~umask``: on a default host
(umask 022) recordings would be world-readable.  The service and the AGI script refuse to
start when the directory is not private, and every grant is checked again before it is handed
back (a directory changed while the service runs), so nothing is recorded where others can read.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from consent_gate.config import ConfigError, Settings
from consent_gate.contract import recording_file_names

log = structlog.get_logger(__name__)


class RecordingsDirError(ConfigError):
    """The recordings directory is missing, not private, or cannot be inspected."""


def owner_uid(owner: str) -> int:
    """The uid of ``recordings.owner`` (a user name or a numeric uid)."""
    if owner.isdigit():
        return int(owner)
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        raise RecordingsDirError(
            f"recordings.owner: no user {owner!r} on this host (the user Asterisk runs as)") from None


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _who(uid: int) -> str:
    name = _user(uid)
    return f"uid {uid}" if name == str(uid) else f"{name} (uid {uid})"


def _create_hint(path: Path, uid: int) -> str:
    user = _user(uid)
    try:
        group = grp.getgrgid(pwd.getpwuid(uid).pw_gid).gr_name
    except KeyError:
        group = user
    return f"install -d -m 0700 -o {user} -g {group} {path}"


def private_dir_problem(path: Path, uid: int) -> str | None:
    """Why ``path`` is not a private recordings directory for ``uid``, or None if it is.

    lstat, not stat: a symbolic link could be pointed anywhere by whoever owns it."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return f"recordings.dir {path}: does not exist; create it: {_create_hint(path, uid)}"
    except OSError as error:
        return (f"recordings.dir {path}: cannot inspect it ({error.strerror}); uid {os.geteuid()} "
                "needs search permission on every parent directory")
    if stat.S_ISLNK(info.st_mode):
        return f"recordings.dir {path}: is a symbolic link; name the real directory (and the same in the dialplan)"
    if not stat.S_ISDIR(info.st_mode):
        return f"recordings.dir {path}: is not a directory"
    if info.st_uid != uid:
        return (f"recordings.dir {path}: owned by {_who(info.st_uid)}, not by the Asterisk user {_who(uid)}; "
                f"chown {_user(uid)} {path}")
    mode = stat.S_IMODE(info.st_mode)
    if mode != 0o700:
        return f"recordings.dir {path}: mode {mode:04o} is not 0700 (group and others must have no access); " \
               f"chmod 0700 {path}"
    return None


def check_private_dir(path: Path, uid: int) -> None:
    """Raise :class:`RecordingsDirError` naming the directory unless it is private to ``uid``."""
    problem = private_dir_problem(path, uid)
    if problem is not None:
        raise RecordingsDirError(problem)


def recordings_dir_problem(settings: Settings) -> str | None:
    """The per-grant check (one lstat): why nothing may be recorded now, or None."""
    try:
        uid = owner_uid(settings.recordings_owner)
    except RecordingsDirError as error:
        return str(error)
    return private_dir_problem(settings.recordings_dir, uid)


def fsync_dir(directory: Path) -> None:
    """Make a create, rename or unlink in ``directory`` survive a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the files of one recording -------------------------------------------------------------

def recording_files(directory: Path, recording_id: str) -> list[Path]:
    """All files of one recording that exist: ``<id>.wav`` and its legs (``<id>-caller.wav``,
    ``<id>-agent.wav``), as the shipped dialplan names them.

    Names are built from the validated id and fixed suffixes only (nothing from caller data),
    and looked up one by one, so the cost does not grow with the size of the directory.
    """
    found = []
    for name in recording_file_names(recording_id):
        path = Path(directory) / name
        try:
            os.lstat(path)
        except FileNotFoundError:
            continue
        found.append(path)
    return sorted(found)


@dataclass
class FileDeletion:
    """What an unlink pass did: the names removed, and those that could not be (with why)."""

    removed: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)


def remove_files(paths: Iterable[Path]) -> FileDeletion:
    """Unlink (never follow) the given files, going on past a failure; fsync their directories
    so a removal reported is a removal that survives a crash."""
    outcome = FileDeletion()
    directories = set()
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as error:
            outcome.failed.append({"name": path.name, "error": error.strerror or type(error).__name__})
            continue
        outcome.removed.append(path.name)
        directories.add(path.parent)
    for directory in directories:
        try:
            fsync_dir(directory)
        except OSError as error:
            log.error("recordings.fsync_failed", dir=str(directory), error=error.strerror)
    return outcome


def delete_recording_files(paths: Iterable[Path]) -> list[str]:
    """Unlink (never follow) the given files; returns the names that were removed.  Raises the
    first error after trying them all."""
    outcome = remove_files(paths)
    if outcome.failed:
        raise OSError(f"could not delete {outcome.failed[0]['name']}: {outcome.failed[0]['error']}")
    return outcome.removed


def dir_mode_problem(directory: Path) -> str | None:
    """Why the recordings directory is not private, or None.  Private is what the gate itself
    requires (issue 16, case 7): a real directory with mode exactly 0700 -- no group or other
    bits, no setgid left over from a shared-group setup.  The tools need no group access: they
    reach it with CAP_DAC_OVERRIDE (deploy/consent-gate-retention.service).  A missing directory
    is not a problem here (nothing to delete); the gate refuses to start without one."""
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        return None
    fix = f"install -d -m 0700 -o asterisk -g asterisk {directory}"
    if stat.S_ISLNK(info.st_mode):
        return f"{directory} is a symbolic link; name the real directory (and the same in the dialplan)"
    if not stat.S_ISDIR(info.st_mode):
        return f"{directory} is not a directory; create it: {fix}"
    mode = stat.S_IMODE(info.st_mode)
    if mode != 0o700:
        # "00700": GNU chmod keeps a directory's setgid bit on "chmod 0700".
        return f"mode {mode:04o} is not 0700 (group and others must have no access); fix: chmod 00700 {directory}"
    return None

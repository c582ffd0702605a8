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
from pathlib import Path

from .config import ConfigError, Settings


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

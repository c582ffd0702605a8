"""Durable local journal: where consent events go when the database cannot take them.

One JSON object per line, appended with O_APPEND and fsync'd before ``append`` returns, so an
event the caller's decision depends on survives a crash.  Several processes (the ARI service,
AGI scripts) may append at once: each append holds an exclusive ``flock``.  ``drain`` hands the
pending events to a callback and removes them only after the callback succeeded, so a failed
replay loses nothing and a repeated one is harmless (the ledger ignores known event ids).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from pathlib import Path
from typing import Awaitable, Callable, Iterator

from .events import ConsentEvent


class JournalError(OSError):
    pass


class Journal:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "pending.jsonl"
        self.lock_path = directory / "journal.lock"

    def _ensure_dir(self) -> None:
        if not self.directory.is_dir():
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            _fsync_dir(self.directory.parent)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self._ensure_dir()
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def append(self, event: ConsentEvent) -> None:
        """Write one event and fsync it; raises JournalError if it is not on disk."""
        line = (json.dumps(event.to_json(), separators=(",", ":")) + "\n").encode()
        try:
            with self._lock():
                created = not self.path.exists()
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    data = line
                    size = os.fstat(fd).st_size
                    if size and os.pread(fd, 1, size - 1) != b"\n":
                        # A crash left a torn line: end it, or this event would be glued onto it.
                        data = b"\n" + line
                    written = os.write(fd, data)
                    if written != len(data):
                        raise JournalError(f"short write to {self.path}")
                    os.fsync(fd)
                finally:
                    os.close(fd)
                if created:
                    _fsync_dir(self.directory)
        except OSError as error:
            raise JournalError(f"cannot write the journal {self.path}: {error}") from error

    def _files(self) -> list[Path]:
        """Batches claimed by an earlier (maybe failed) drain first, then the open file."""
        claimed = sorted(self.directory.glob("replaying-*.jsonl")) if self.directory.is_dir() else []
        return [*claimed, *([self.path] if self.path.exists() else [])]

    @staticmethod
    def _read(path: Path) -> list[ConsentEvent]:
        events = []
        try:
            raw = path.read_text()
        except FileNotFoundError:
            return []
        for line in raw.splitlines():
            # A torn last line (crash mid-write, never fsync'd) was never acknowledged: skip it.
            with contextlib.suppress(ValueError, KeyError, TypeError):
                events.append(ConsentEvent.from_json(json.loads(line)))
        return events

    def pending(self) -> list[ConsentEvent]:
        return [event for path in self._files() for event in self._read(path)]

    def backlog(self) -> int:
        return len(self.pending())

    async def drain(self, store: Callable[[list[ConsentEvent]], Awaitable[None]]) -> int:
        """Give pending events to ``store``; on success remove exactly those.  Returns the count.

        The open file is renamed to a claimed batch under the lock (appends go on into a new
        file at once); the lock is not held while ``store`` awaits the database.
        """
        with self._lock():
            if self.path.exists():
                self.path.rename(self.directory / f"replaying-{uuid.uuid4().hex}.jsonl")
                _fsync_dir(self.directory)
            batches = sorted(self.directory.glob("replaying-*.jsonl"))
        stored = 0
        for batch in batches:
            events = self._read(batch)
            if events:
                await store(events)
            batch.unlink(missing_ok=True)
            stored += len(events)
        if batches:
            _fsync_dir(self.directory)
        return stored


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

"""Durable local journal: where consent events go when the database cannot take them.

One JSON object per line, appended with O_APPEND and fsync'd before ``append`` returns, so an
event the caller's decision depends on survives a crash.  Several processes (the ARI service,
AGI scripts) may append at once: each append holds an exclusive ``flock``.  ``drain`` hands the
pending events to a callback and removes them only after the callback succeeded, so a failed
replay loses nothing and a repeated one is harmless (the ledger ignores known event ids).

A line that can never be replayed -- not UTF-8, not JSON, not a well-formed event, rejected by
the database, or torn by a crash -- is moved byte for byte into ``quarantine.jsonl`` (with a
record of why in ``quarantine.reasons.jsonl``) instead of blocking the lines behind it or being
dropped.  ``requeue_quarantine`` puts the lines back once an admin has fixed the cause.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from consent_gate.core.events import ConsentEvent, EventKind, utcnow

log = structlog.get_logger(__name__)

# The store callback of ``drain``: stores the events, returns those the database refused for
# good (event id -> reason) and raises for anything that may pass on a later try.
Store = Callable[[list[ConsentEvent]], Awaitable[Mapping[uuid.UUID, str] | None]]

# Why a line was quarantined: the ``kind`` of a reason record and the metric's label.
TORN = "torn-line"
INVALID_UTF8 = "invalid-utf8"
INVALID_JSON = "invalid-json"
INVALID_EVENT = "invalid-event"
DATABASE_REJECTED = "database-rejected"
QUARANTINE_KINDS = (TORN, INVALID_UTF8, INVALID_JSON, INVALID_EVENT, DATABASE_REJECTED)


class JournalError(OSError):
    pass


class InvalidLine(ValueError):
    """A complete journal line that is not a consent event; ``kind`` is one of QUARANTINE_KINDS."""

    def __init__(self, kind: str, reason: str, event_id: str | None = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.event_id = event_id


@dataclasses.dataclass(frozen=True)
class Quarantined:
    """One line on its way to the quarantine, with where it came from and why."""

    kind: str
    reason: str
    batch: str
    line: int
    raw: bytes
    event_id: str | None


# -- parsing: every field ConsentEvent.to_json writes, of the type it writes -----------------

def _text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidLine(INVALID_EVENT, f"{name}: expected a string, got {type(value).__name__}")
    return value


def _optional_text(name: str, value: object) -> str | None:
    return None if value is None else _text(name, value)


def _uuid(name: str, value: object) -> uuid.UUID:
    try:
        return uuid.UUID(_text(name, value))
    except ValueError:
        raise InvalidLine(INVALID_EVENT, f"{name}: not a UUID") from None


def _time(name: str, value: object) -> datetime:
    try:
        parsed = datetime.fromisoformat(_text(name, value))
    except ValueError:
        raise InvalidLine(INVALID_EVENT, f"{name}: not an ISO 8601 time") from None
    if parsed.tzinfo is None:
        raise InvalidLine(INVALID_EVENT, f"{name}: a time without a UTC offset is ambiguous")
    return parsed


def _optional_time(name: str, value: object) -> datetime | None:
    return None if value is None else _time(name, value)


def _event_kind(name: str, value: object) -> EventKind:
    try:
        return EventKind(_text(name, value))
    except ValueError:
        raise InvalidLine(INVALID_EVENT, f"{name}: not a known event kind") from None


def _detail(name: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidLine(INVALID_EVENT, f"{name}: expected an object, got {type(value).__name__}")
    return value


_FIELDS: dict[str, Callable[[str, object], object]] = {
    "consent_id": _uuid, "call_id": _text, "event": _event_kind, "purpose": _text,
    "legal_basis": _text, "occurred_at": _time, "source": _text, "language": _optional_text,
    "prompt_version": _optional_text, "digit": _optional_text, "caller_ref": _optional_text,
    "caller_number": _optional_text, "recording_id": _optional_text,
    "prompt_started_at": _optional_time, "decided_at": _optional_time, "detail": _detail,
    "event_id": _uuid,
}


def _field_name(key: str) -> str:
    """A field name for a reason: short and printable (the line itself is in the quarantine)."""
    return repr(key[:40]) if key.isprintable() else "(unprintable)"


def parse_line(raw: bytes) -> ConsentEvent:
    """One complete journal line (without its newline) -> the event; InvalidLine says why not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidLine(INVALID_UTF8, f"not UTF-8 (byte offset {error.start})") from None
    try:
        data = json.loads(text)
    except ValueError as error:
        reason = f"not JSON ({error.msg}, column {error.colno})" if isinstance(error, json.JSONDecodeError) \
            else "not JSON"
        raise InvalidLine(INVALID_JSON, reason) from None
    if not isinstance(data, dict):
        raise InvalidLine(INVALID_JSON, f"not a JSON object but {type(data).__name__}")
    event_id = data.get("event_id")
    known_id: str | None = None
    if isinstance(event_id, str):
        with contextlib.suppress(ValueError):
            known_id = str(uuid.UUID(event_id))
    unknown = sorted(set(data) - set(_FIELDS))
    missing = [name for name in _FIELDS if name not in data]
    if unknown or missing:
        parts = [f"unknown field {_field_name(name)}" for name in unknown[:3]]
        parts += [f"missing field {name!r}" for name in missing[:3]]
        raise InvalidLine(INVALID_EVENT, "; ".join(parts), known_id)
    try:
        values = {name: check(name, data[name]) for name, check in _FIELDS.items()}
    except InvalidLine as error:
        error.event_id = known_id
        raise
    return ConsentEvent(**values)  # type: ignore[arg-type]  # each value checked above


def _split(raw: bytes, batch: str) -> tuple[list[tuple[int, bytes, ConsentEvent]], list[Quarantined]]:
    """Complete lines -> (good events, bad lines); a last line without newline is torn."""
    *lines, tail = raw.split(b"\n")
    good: list[tuple[int, bytes, ConsentEvent]] = []
    bad: list[Quarantined] = []
    for number, line in enumerate(lines, 1):
        if not line:
            continue  # an empty line holds nothing to keep
        try:
            good.append((number, line, parse_line(line)))
        except InvalidLine as error:
            bad.append(Quarantined(error.kind, error.reason, batch, number, line, error.event_id))
    if tail:
        bad.append(Quarantined(TORN, "last line without a newline: a write cut off by a crash, never "
                               "acknowledged", batch, len(lines) + 1, tail, None))
    return good, bad


# -- files -----------------------------------------------------------------------------------

def _append_synced(path: Path, data: bytes) -> bool:
    """Append ``data`` (complete lines) and fsync; returns whether the file was created.

    Callers hold the lock that guards ``path``.  A torn last line left by a crash is ended
    first, or the new data would be glued onto it.
    """
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        written = os.write(fd, data)
        if written != len(data):
            raise JournalError(f"short write to {path}")
        os.fsync(fd)
    finally:
        os.close(fd)
    return created


def _count_lines(path: Path) -> int:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return 0
    return raw.count(b"\n") + (1 if raw and not raw.endswith(b"\n") else 0)


class Journal:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "pending.jsonl"
        self.lock_path = directory / "journal.lock"
        # Held for a whole drain (and a requeue): one replayer per directory, across processes.
        self.replay_lock_path = directory / "replay.lock"
        self.quarantine_path = directory / "quarantine.jsonl"
        self.reasons_path = directory / "quarantine.reasons.jsonl"
        # Lines this object quarantined, by kind (the service exports them as a counter).
        self.quarantined_by_kind: collections.Counter[str] = collections.Counter()

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

    def _replay_lock(self, *, wait: bool) -> int | None:
        """The replay lock's fd, or None if another replayer holds it and ``wait`` is false."""
        self._ensure_dir()
        fd = os.open(self.replay_lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def append(self, event: ConsentEvent) -> None:
        """Write one event and fsync it; raises JournalError if it is not on disk."""
        line = (json.dumps(event.to_json(), separators=(",", ":")) + "\n").encode()
        try:
            with self._lock():
                if _append_synced(self.path, line):
                    _fsync_dir(self.directory)
        except OSError as error:
            raise JournalError(f"cannot write the journal {self.path}: {error}") from error

    def _batches(self) -> list[Path]:
        return sorted(self.directory.glob("replaying-*.jsonl")) if self.directory.is_dir() else []

    def _files(self) -> list[Path]:
        """Batches claimed by an earlier (maybe failed) drain first, then the open file."""
        return [*self._batches(), *([self.path] if self.path.exists() else [])]

    @staticmethod
    def _read(path: Path) -> list[ConsentEvent]:
        """The replayable events of one file.  Bad lines wait for the next drain's quarantine;
        a torn last line of the open file may be an append still being written."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return []
        good, _bad = _split(raw, path.name)
        return [event for _number, _line, event in good]

    def pending(self) -> list[ConsentEvent]:
        return [event for path in self._files() for event in self._read(path)]

    def backlog(self) -> int:
        return len(self.pending())

    def quarantined_lines(self) -> int:
        """Lines in the quarantine file, waiting for an admin."""
        return _count_lines(self.quarantine_path)

    def quarantine_reasons(self) -> list[dict[str, Any]]:
        """The reason records, one per quarantined line (a torn record is skipped)."""
        try:
            raw = self.reasons_path.read_bytes()
        except FileNotFoundError:
            return []
        records = []
        for line in raw.splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return records

    async def drain(self, store: Store) -> int:
        """Give pending events to ``store``; on success remove exactly those.  Returns the count.

        The open file is renamed to a claimed batch under the append lock (appends go on into a
        new file at once); that lock is not held while ``store`` awaits the database.  The
        replay lock is: if another process is replaying this directory, this drain does nothing.
        Lines that can never be stored go to the quarantine; if ``store`` raises, the batch's
        storable lines stay pending.
        """
        replay_fd = self._replay_lock(wait=False)
        if replay_fd is None:
            return 0
        try:
            with self._lock():
                if self.path.exists():
                    # Time-ordered names: older batches are replayed first.
                    claimed = f"replaying-{time.time_ns():020d}-{uuid.uuid4().hex}.jsonl"
                    self.path.rename(self.directory / claimed)
                    _fsync_dir(self.directory)
                batches = self._batches()
            for leftover in self.directory.glob("replaying-*.jsonl.tmp"):
                leftover.unlink(missing_ok=True)  # a rewrite cut off by a crash; its batch is intact
            stored = 0
            for batch in batches:
                stored += await self._replay_batch(batch, store)
            return stored
        finally:
            os.close(replay_fd)

    async def _replay_batch(self, batch: Path, store: Store) -> int:
        try:
            raw = batch.read_bytes()
        except FileNotFoundError:
            return 0
        good, bad = _split(raw, batch.name)
        if bad:
            # Into the quarantine first (fsync'd), only then out of the batch.
            self._quarantine(bad)
            self._rewrite(batch, [line for _number, line, _event in good])
        if not good:
            return 0
        rejected = await store([event for _number, _line, event in good]) or {}
        if rejected:
            self._quarantine([
                Quarantined(DATABASE_REJECTED, rejected[event.event_id], batch.name, number, line,
                            str(event.event_id))
                for number, line, event in good if event.event_id in rejected])
        batch.unlink(missing_ok=True)
        _fsync_dir(self.directory)
        return sum(1 for _number, _line, event in good if event.event_id not in rejected)

    def _rewrite(self, batch: Path, lines: list[bytes]) -> None:
        """Replace a claimed batch by ``lines``, atomically: a crash leaves the old or the new one."""
        if not lines:
            batch.unlink(missing_ok=True)
        else:
            temporary = batch.with_name(batch.name + ".tmp")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                data = b"".join(line + b"\n" for line in lines)
                if os.write(fd, data) != len(data):
                    raise JournalError(f"short write to {temporary}")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, batch)
        _fsync_dir(self.directory)

    def _quarantine(self, entries: list[Quarantined]) -> None:
        """Append the lines byte for byte to the quarantine, then why; both fsync'd.  The
        caller holds the replay lock."""
        first = _count_lines(self.quarantine_path) + 1
        created = _append_synced(self.quarantine_path, b"".join(entry.raw + b"\n" for entry in entries))
        at = utcnow().isoformat()
        records = []
        for offset, entry in enumerate(entries):
            record = {
                "quarantined_at": at, "kind": entry.kind, "reason": entry.reason,
                "quarantine_line": first + offset, "batch": entry.batch, "line": entry.line,
                "event_id": entry.event_id, "bytes": len(entry.raw),
                "sha256": hashlib.sha256(entry.raw).hexdigest(),
            }
            records.append(json.dumps(record, separators=(",", ":")) + "\n")
        created = _append_synced(self.reasons_path, "".join(records).encode()) or created
        if created:
            _fsync_dir(self.directory)
        for offset, entry in enumerate(entries):
            self.quarantined_by_kind[entry.kind] += 1
            # The alert.  Reason and ids only: the line itself stays in the 0600 file.
            log.error("journal.quarantined", kind=entry.kind, reason=entry.reason,
                      event_id=entry.event_id, batch=entry.batch, line=entry.line,
                      quarantine=str(self.quarantine_path), quarantine_line=first + offset)

    def requeue_quarantine(self) -> int:
        """Move every quarantined line back into pending (after an admin fixed the cause);
        returns how many.  Lines still bad come back into the quarantine at the next drain."""
        replay_fd = self._replay_lock(wait=True)
        assert replay_fd is not None
        try:
            try:
                raw = self.quarantine_path.read_bytes()
            except FileNotFoundError:
                return 0
            lines = [line for line in raw.split(b"\n") if line]
            if lines:
                with self._lock():
                    if _append_synced(self.path, b"".join(line + b"\n" for line in lines)):
                        _fsync_dir(self.directory)
            # Only once the lines are safely pending.  A crash in between queues them twice:
            # harmless for stored events (known ids are ignored), visible twice if still bad.
            self.quarantine_path.unlink()
            self.reasons_path.unlink(missing_ok=True)
            _fsync_dir(self.directory)
            return len(lines)
        finally:
            os.close(replay_fd)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

"""Training copies: de-identified copies of consented recordings, and the commands around them.

A recording made for a purpose with ``training_copy = true`` has three files (MixMonitor in
``dialplan/consent-gate.conf``): ``<id>.wav`` (mixed), ``<id>-caller.wav`` (what the caller
says) and ``<id>-agent.wav`` (what the caller hears).  :func:`make_training_copy` turns them
into one copy:

* ``<copies_dir>/<copy_id>.wav``: 8 kHz 16-bit **stereo** WAV; channel 1 is the caller's leg
  after McAdams anonymisation (:mod:`consent_gate.admin.anonymise`, a fresh secret coefficient per
  copy), channel 2 the agent's leg (kept as is unless ``anonymise_agent``);
* ``copy_id`` is 32 random hex digits, unrelated to the recording id; the file holds only the
  RIFF ``fmt``/``data`` chunks; its modification time is set to the first day of the month
  (the copy's coarse ``period``); its length gets 0..``pad_max_seconds`` of random trailing
  silence, so it does not equal the call's length; in-band DTMF tones in the caller's leg
  (card or account digits keyed by the caller) are silenced before anonymisation;
* the index row (``training_copies``) has the id, the period, the purpose, what was done to
  each leg and the deletion date; the link to the recording is ``training_copy_links``, the
  only place that joins the two;
* the original files are deleted once the copy exists, with a tombstone in ``data_erasures``,
  unless :func:`keeps_original` names a reason to keep them (another purpose of the recording
  still holds it, a legal hold).  Every decision is per (consent id, purpose): a granular gate
  gives all purposes of a call one consent id and one recording.

Nothing here logs or stores the anonymisation parameters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import structlog

from consent_gate.admin import anonymise as an
from consent_gate.admin.retention import (
    KEYS_BY_RECORDINGS,
    RECORDING_DELETED,
    Group,
    fetch_groups,
    lock_recording,
    share_hold_lock,
    write_erasure,
)
from consent_gate.config import DEFAULT_PURPOSES, Purpose, add_settings_arguments, dsn_for_command, settings_for_command
from consent_gate.contract import recording_file_names
from consent_gate.core.events import utcnow
from consent_gate.recordings import delete_recording_files, fsync_dir, recording_files

__all__ = [
    "CopyOutcome",
    "NotEligible",
    "NotReady",
    "RecordingFiles",
    "TrainingSettings",
    "coarse_period",
    "erase_training_copy",
    "keeps_original",
    "make_pending",
    "make_training_copy",
    "pending_recordings",
    "register_cli",
    "sweep_expired",
    "wav_is_closed",
    "write_copy",
]

log = structlog.get_logger(__name__)

METHOD = "mcadams-lpc-v1"


class NotEligible(Exception):
    """No granted (and not withdrawn) training-copy decision names this recording."""


class NotReady(Exception):
    """The recording's files are missing or still being written."""


@dataclass(frozen=True)
class TrainingSettings:
    anonymiser: an.AnonymiserSettings = field(default_factory=an.AnonymiserSettings)
    anonymise_agent: bool = False
    pad_max_seconds: float = 3.0
    settle_seconds: float = 2.0  # a leg untouched this long (and with a closed header) is complete
    silence_dtmf: bool = True  # keyed digits (in-band DTMF in the caller's leg) become silence

    @property
    def caller_leg(self) -> str:
        return "mcadams+pitch" if self.anonymiser.pitch_semitones else "mcadams"

    @property
    def agent_leg(self) -> str:
        return self.caller_leg if self.anonymise_agent else "original"


@dataclass(frozen=True)
class RecordingFiles:
    mixed: Path
    caller: Path
    agent: Path

    @classmethod
    def of(cls, recordings_dir: Path, recording_id: str) -> RecordingFiles:
        mixed, caller, agent = recording_file_names(recording_id)  # raises ValueError on a bad id
        return cls(recordings_dir / mixed, recordings_dir / caller, recordings_dir / agent)

    def all(self) -> tuple[Path, Path, Path]:
        return (self.mixed, self.caller, self.agent)


@dataclass(frozen=True)
class CopyOutcome:
    copy_id: str
    path: Path
    created: bool  # False: the copy existed already (idempotent re-run)
    original_deleted: bool
    kept_because: str | None


def coarse_period(day: date) -> str:
    """The only date a copy carries: its month."""
    return f"{day.year:04d}-{day.month:02d}"


def _period_start(period: str) -> datetime:
    year, month = (int(part) for part in period.split("-"))
    return datetime(year, month, 1, tzinfo=UTC)


def wav_is_closed(path: Path, settle_seconds: float = 2.0, *, now: float | None = None) -> bool:
    """True when the recorder has finished the file: its RIFF and data sizes match the file
    (Asterisk writes them when it closes the file) and it was not touched for ``settle_seconds``."""
    try:
        stat = path.stat()
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    if (now if now is not None else time.time()) - stat.st_mtime < settle_seconds:
        return False
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return False
    if struct.unpack("<I", head[4:8])[0] + 8 != stat.st_size:
        return False
    offset = 12
    while offset + 8 <= len(head):
        name, size = struct.unpack("<4sI", head[offset:offset + 8])
        if name == b"data":
            return offset + 8 + size == stat.st_size
        offset += 8 + size + (size & 1)
    return False


def write_copy(files: RecordingFiles, copies_dir: Path, period: str,
               settings: TrainingSettings | None = None, rng: an.RandomSource | None = None) -> tuple[str, Path]:
    """Make the copy's audio file; returns ``(copy_id, path)``.  No database involved."""
    settings = settings or TrainingSettings()
    copies_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    caller_rate, caller = an.read_wav_mono(files.caller)
    agent_rate, agent = an.read_wav_mono(files.agent)
    if caller_rate != an.SAMPLE_RATE or agent_rate != an.SAMPLE_RATE:
        raise an.AudioFormatError(f"legs at {caller_rate}/{agent_rate} Hz; {an.SAMPLE_RATE} Hz expected")
    if settings.silence_dtmf:
        caller, _ = an.silence_dtmf(caller, caller_rate)
    caller_copy = an.anonymise(caller, caller_rate, settings.anonymiser, rng)
    agent_copy = an.anonymise(agent, agent_rate, settings.anonymiser, rng) if settings.anonymise_agent else agent
    source = rng or secrets.SystemRandom()
    length = max(len(caller_copy), len(agent_copy))
    length += int(round(float(source.uniform(0.0, settings.pad_max_seconds)) * an.SAMPLE_RATE))
    copy_id = secrets.token_hex(16)
    path = copies_dir / f"{copy_id}.wav"
    temporary = copies_dir / f".{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        an.write_wav(temporary, [np.concatenate((caller_copy, np.zeros(length - len(caller_copy), np.int16))),
                                 np.concatenate((agent_copy, np.zeros(length - len(agent_copy), np.int16)))])
        os.chmod(temporary, 0o600)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        stamp = _period_start(period).timestamp()
        os.utime(temporary, (stamp, stamp))
        os.replace(temporary, path)
        fsync_dir(copies_dir)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    return copy_id, path


# -- the database side -----------------------------------------------------------------------

# A granular gate gives every purpose of a call the same consent_id and recording id: every
# decision here is per (consent_id, purpose) -- a decision group of consent_gate.admin.retention.
TRAINING_ACTOR = "training-worker"


def _training_purposes(purposes: Mapping[str, Purpose]) -> list[str]:
    return sorted(name for name, purpose in purposes.items() if purpose.training_copy)


async def _granted_training_group(connection: asyncpg.Connection, recording_id: str,
                                  purposes: Mapping[str, Purpose], now: datetime) -> Group | None:
    """The training-copy purpose of this recording that was granted and still holds it (not
    withdrawn -- a withdrawal under any purpose of the call counts --, not erased, not expired)."""
    names = set(_training_purposes(purposes))
    groups = await fetch_groups(connection, KEYS_BY_RECORDINGS, [recording_id])
    eligible = [g for g in groups if g.purpose in names and g.decision == "granted"
                and recording_id in g.recording_ids and not g.claim_ended(purposes, now)]
    return min(eligible, key=lambda g: g.purpose, default=None)


async def keeps_original(connection: asyncpg.Connection, recording_id: str, copy_purpose: str, *,
                         purposes: Mapping[str, Purpose] = DEFAULT_PURPOSES,
                         now: datetime | None = None) -> str | None:
    """Why the original recording must stay after its training copy exists, or None to delete it.

    The one place this decision is made, by the retention rule (``Group.claim_ended``) applied to
    every decision group that names the recording.  The original stays when
      * another purpose still holds it: a group for a purpose other than ``copy_purpose`` (of the
        same call or not) that was granted or notified and is not withdrawn (consent-based
        purposes), erased or past its retention; that purpose's own retention then applies, and
        the retention sweeper deletes the original when it ends;
      * a legal hold is active on the call or on the caller.
    """
    groups = await fetch_groups(connection, KEYS_BY_RECORDINGS, [recording_id])
    moment = now or utcnow()
    keeping = sorted({g.purpose for g in groups if g.purpose != copy_purpose and recording_id in g.recording_ids
                      and not g.claim_ended(purposes, moment)})
    if keeping:
        return f"purpose {keeping[0]} keeps the recording"
    if any(g.held for g in groups):
        return "legal hold"
    return None


async def _release_original(connection: asyncpg.Connection, files: RecordingFiles, recording_id: str,
                            copy_purpose: str, purposes: Mapping[str, Purpose],
                            now: datetime) -> tuple[bool, str | None]:
    """Delete the original once its copy exists, unless :func:`keeps_original` keeps it.

    Under the retention sweeper's locks (a hold placed meanwhile waits, a sweeper or an erasure
    on the same recording waits).  The tombstone (``data_erasures``, scope ``recording``, kind
    ``retention``) commits first and names the files; the files go after the commit, so no
    deletion is ever unrecorded.  A run that finds its own earlier tombstone and files still
    there (a crash between the two) deletes them without a second tombstone."""
    async with connection.transaction():
        await share_hold_lock(connection)
        await lock_recording(connection, recording_id, wait=True)
        kept = await keeps_original(connection, recording_id, copy_purpose, purposes=purposes, now=now)
        if kept is not None:
            return False, kept
        present = recording_files(files.mixed.parent, recording_id)
        if not present:
            return False, None
        if not await connection.fetchval(RECORDING_DELETED, recording_id):
            await write_erasure(
                connection, kind="retention", scope="recording", recording_id=recording_id,
                files=[p.name for p in present], actor=TRAINING_ACTOR, at=now,
                reason=f"training copy made (purpose '{copy_purpose}'); no other purpose keeps the original")
    removed = await asyncio.to_thread(delete_recording_files, present)
    return bool(removed), None


async def make_training_copy(
    connection: asyncpg.Connection, recording_id: str, *, recordings_dir: Path, copies_dir: Path,
    purposes: Mapping[str, Purpose] = DEFAULT_PURPOSES, settings: TrainingSettings | None = None,
    today: date | None = None, rng: an.RandomSource | None = None, now: datetime | None = None,
) -> CopyOutcome:
    """Make (once) the training copy of one recording, then delete the original unless
    :func:`keeps_original` keeps it.  Safe to run twice at once (a per-recording lock).

    ``now`` (default: the clock) judges withdrawals and retention; ``today`` (default: the date of
    ``now``) gives the copy's period."""
    settings = settings or TrainingSettings()
    moment = now or utcnow()
    files = RecordingFiles.of(recordings_dir, recording_id)
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock(hashtext('consent-gate-training:' || $1))",
                                 recording_id)
        existing = await connection.fetchrow(
            "SELECT l.copy_id, c.purpose FROM training_copy_links l JOIN training_copies c USING (copy_id)"
            " WHERE l.recording_id = $1", recording_id)
        if existing is not None:
            created, copy_id, copy_purpose = False, str(existing["copy_id"]), str(existing["purpose"])
            path = copies_dir / f"{copy_id}.wav"
        else:
            group = await _granted_training_group(connection, recording_id, purposes, moment)
            if group is None:
                raise NotEligible(f"recording {recording_id}: no granted training-copy decision")
            if not all(wav_is_closed(p, settings.settle_seconds) for p in (files.caller, files.agent)):
                raise NotReady(f"recording {recording_id}: caller/agent legs missing or still being written")
            purpose = purposes[group.purpose]
            period = coarse_period(today or moment.date())
            delete_after = _period_start(period).date() + timedelta(days=purpose.retention_days)
            copy_id, path = await asyncio.to_thread(write_copy, files, copies_dir, period, settings, rng)
            try:
                await connection.execute(
                    "INSERT INTO training_copies (copy_id, period, purpose, caller_leg, agent_leg, method,"
                    " delete_after) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    copy_id, period, purpose.name, settings.caller_leg, settings.agent_leg, METHOD, delete_after)
                await connection.execute(
                    "INSERT INTO training_copy_links (recording_id, copy_id) VALUES ($1, $2)", recording_id, copy_id)
            except BaseException:
                with contextlib.suppress(OSError):
                    path.unlink()
                raise
            created, copy_purpose = True, purpose.name
    # Committed: the copy exists.  Now the original.
    deleted, kept = await _release_original(connection, files, recording_id, copy_purpose, purposes, moment)
    if created:
        log.info("training.copy_made", original_deleted=deleted, kept_because=kept)
    return CopyOutcome(copy_id, path, created, deleted, kept)


async def pending_recordings(connection: asyncpg.Connection, recordings_dir: Path,
                             purposes: Mapping[str, Purpose] = DEFAULT_PURPOSES) -> list[str]:
    """Recording ids with a granted (not withdrawn, not erased) training-copy decision, files on
    disk and no copy yet.  ``consent_decisions`` has one row per (consent_id, purpose)."""
    rows = await connection.fetch(
        """SELECT DISTINCT d.recording_id FROM consent_decisions d
            WHERE d.recording_id IS NOT NULL AND d.decision = 'granted' AND d.withdrawn_at IS NULL
              AND d.purpose = ANY($1::text[])
              AND NOT EXISTS (SELECT 1 FROM training_copy_links l WHERE l.recording_id = d.recording_id)
              AND NOT EXISTS (SELECT 1 FROM data_erasures x
                               WHERE x.scope = 'record' AND x.kind = 'erasure'
                                 AND x.consent_id = d.consent_id AND x.purpose = d.purpose)
            ORDER BY 1""",
        _training_purposes(purposes))
    return [row["recording_id"] for row in rows
            if RecordingFiles.of(recordings_dir, row["recording_id"]).caller.exists()]


async def make_pending(connection: asyncpg.Connection, *, recordings_dir: Path, copies_dir: Path,
                       purposes: Mapping[str, Purpose] = DEFAULT_PURPOSES,
                       settings: TrainingSettings | None = None, now: datetime | None = None) -> list[CopyOutcome]:
    """One worker pass: a copy for every pending recording whose legs are complete."""
    outcomes = []
    for recording_id in await pending_recordings(connection, recordings_dir, purposes):
        try:
            outcomes.append(await make_training_copy(connection, recording_id, recordings_dir=recordings_dir,
                                                     copies_dir=copies_dir, purposes=purposes, settings=settings,
                                                     now=now))
        except (NotReady, NotEligible):
            continue
        except an.AudioFormatError as error:
            # One unreadable recording must not stop the worker; it stays for an admin to look at.
            log.warning("training.copy_failed", recording_id=recording_id, error=str(error))
    return outcomes


async def erase_training_copy(connection: asyncpg.Connection, recording_id: str, copies_dir: Path) -> str | None:
    """Erase the copy made from a recording, its index row and its link (for erasure requests:
    a training copy is still personal data).  Returns the erased copy id, or None."""
    async with connection.transaction():
        copy_id = await connection.fetchval(
            "DELETE FROM training_copy_links WHERE recording_id = $1 RETURNING copy_id", recording_id)
        if copy_id is None:
            return None
        await connection.execute("DELETE FROM training_copies WHERE copy_id = $1", copy_id)
        with contextlib.suppress(FileNotFoundError):
            (copies_dir / f"{copy_id}.wav").unlink()
    return copy_id


async def sweep_expired(connection: asyncpg.Connection, copies_dir: Path, today: date | None = None) -> int:
    """Delete copies whose ``delete_after`` date has come (their links go with them)."""
    today = today or datetime.now(UTC).date()
    count = 0
    while True:
        async with connection.transaction():
            rows = await connection.fetch(
                "DELETE FROM training_copies WHERE copy_id IN (SELECT copy_id FROM training_copies"
                " WHERE delete_after <= $1 ORDER BY copy_id LIMIT 500 FOR UPDATE SKIP LOCKED) RETURNING copy_id",
                today)
            for row in rows:
                with contextlib.suppress(FileNotFoundError):
                    (copies_dir / f"{row['copy_id']}.wav").unlink()
        count += len(rows)
        if not rows:
            return count


# -- command line -------------------------------------------------------------------------------

def _purposes(args: argparse.Namespace) -> Mapping[str, Purpose]:
    if not (args.config or os.environ.get("CONSENT_GATE_CONFIG")):
        return DEFAULT_PURPOSES
    return settings_for_command(args).purposes


def _dirs(args: argparse.Namespace) -> tuple[Path, Path]:
    recordings = args.recordings_dir or os.environ.get("CONSENT_GATE_RECORDINGS_DIR")
    copies = args.copies_dir or os.environ.get("CONSENT_GATE_TRAINING_DIR")
    if not recordings or not copies:
        raise SystemExit("consent-gate training: pass --recordings-dir and --copies-dir "
                         "(or set CONSENT_GATE_RECORDINGS_DIR and CONSENT_GATE_TRAINING_DIR)")
    return Path(recordings), Path(copies)


def _pitch(args: argparse.Namespace) -> tuple[float, float] | None:
    if getattr(args, "with_pitch", False):
        return an.DEFAULT_PITCH_SEMITONES
    return tuple(args.pitch) if getattr(args, "pitch", None) else None


def _settings(args: argparse.Namespace) -> TrainingSettings:
    anonymiser = an.AnonymiserSettings(
        coefficient_range=tuple(args.range) if getattr(args, "range", None) else an.DEFAULT_COEFFICIENT_RANGE,
        bidirectional=not getattr(args, "no_reciprocal", False),
        pitch_semitones=_pitch(args),
    )
    return TrainingSettings(anonymiser=anonymiser, anonymise_agent=getattr(args, "anonymise_agent", False))


def _report(outcomes: Iterable[CopyOutcome]) -> None:
    for outcome in outcomes:
        state = "made" if outcome.created else "exists"
        original = "original deleted" if outcome.original_deleted else (
            f"original kept ({outcome.kept_because})" if outcome.kept_because else "original already gone")
        print(f"{outcome.copy_id}  {state}  {original}")


async def _run_training(args: argparse.Namespace) -> int:
    connection = await asyncpg.connect(dsn_for_command(args), timeout=10)
    try:
        if args.training_command == "sweep":
            _, copies = _dirs(args)
            print(f"deleted {await sweep_expired(connection, copies)} expired training copies")
            return 0
        recordings, copies = _dirs(args)
        purposes = _purposes(args)
        settings = _settings(args)
        if args.training_command == "make" and args.recording_id:
            try:
                _report([await make_training_copy(connection, args.recording_id, recordings_dir=recordings,
                                                  copies_dir=copies, purposes=purposes, settings=settings)])
            except (NotEligible, NotReady, ValueError) as error:
                print(f"consent-gate training: {error}")
                return 1
            return 0
        while True:
            _report(await make_pending(connection, recordings_dir=recordings, copies_dir=copies,
                                       purposes=purposes, settings=settings))
            if args.training_command != "worker":
                return 0
            await asyncio.sleep(args.interval)
    finally:
        await connection.close()


def _cmd_anonymise(args: argparse.Namespace) -> int:
    settings = an.AnonymiserSettings(
        coefficient_range=tuple(args.range) if args.range else an.DEFAULT_COEFFICIENT_RANGE,
        coefficient=args.coefficient,
        bidirectional=not args.no_reciprocal,
        pitch_semitones=_pitch(args),
    )
    try:
        an.anonymise_file(args.input, args.output, settings)
    except (an.AudioFormatError, FileNotFoundError) as error:
        print(f"consent-gate anonymise: {error}")
        return 2
    print(f"wrote {args.output} (caller voice changed; no metadata; coefficient not shown, not stored)")
    return 0


def _cmd_training(args: argparse.Namespace) -> int:
    return asyncio.run(_run_training(args))


def _add_voice_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--range", nargs=2, type=float, metavar=("LOW", "HIGH"),
                        help="McAdams coefficient range drawn from per file (default %.2f %.2f)"
                             % an.DEFAULT_COEFFICIENT_RANGE)
    parser.add_argument("--no-reciprocal", action="store_true",
                        help="never use 1/alpha (by default half of the files get the reciprocal)")
    pitch = parser.add_mutually_exclusive_group()
    pitch.add_argument("--with-pitch", action="store_true",
                       help="also shift the pitch by ±%g-%g semitones (random), for more privacy and "
                            "slightly more digit errors" % an.DEFAULT_PITCH_SEMITONES)
    pitch.add_argument("--pitch", nargs=2, type=float, metavar=("LOW", "HIGH"),
                       help="also shift the pitch by LOW..HIGH semitones, random sign")


def register_cli(subparsers: Any) -> None:
    """Add ``anonymise`` and ``training make|worker|sweep``; the handler is ``args.func``."""
    anon = subparsers.add_parser("anonymise", help="anonymise the voice(s) in an 8 kHz WAV file (McAdams)")
    anon.add_argument("input", type=Path, help="8 kHz WAV: PCM, float, mu-law or A-law; every channel is changed")
    anon.add_argument("output", type=Path, help="new 16-bit PCM WAV file (no metadata)")
    _add_voice_options(anon)
    anon.add_argument("--coefficient", type=float,
                      help="a fixed coefficient instead of a random one (for audits; weaker)")
    anon.set_defaults(func=_cmd_anonymise)

    training = subparsers.add_parser("training", help="de-identified training copies of consented recordings")
    sub = training.add_subparsers(dest="training_command", required=True)
    make = sub.add_parser("make", help="make the training copy of one recording, or of all pending ones")
    which = make.add_mutually_exclusive_group(required=True)
    which.add_argument("--recording-id", help="the recording id (32 hex) from the ledger")
    which.add_argument("--pending", action="store_true", help="every granted recording without a copy yet")
    worker = sub.add_parser("worker", help="make copies as recordings complete (runs until stopped)")
    worker.add_argument("--interval", type=float, default=15.0, help="seconds between passes (default 15)")
    sweep = sub.add_parser("sweep", help="delete training copies whose retention has ended")
    for cmd in (make, worker, sweep):
        # --config: the purpose catalogue too (without one, the built-in purposes).
        add_settings_arguments(cmd)
        cmd.add_argument("--recordings-dir", help="recordings (default $CONSENT_GATE_RECORDINGS_DIR)")
        cmd.add_argument("--copies-dir", help="training copies (default $CONSENT_GATE_TRAINING_DIR)")
    for cmd in (make, worker):
        _add_voice_options(cmd)
        cmd.add_argument("--anonymise-agent", action="store_true", help="anonymise the agent's leg too")
    training.set_defaults(func=_cmd_training)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m consent_gate.admin.training ...`` (the same commands as ``consent-gate training``)."""
    parser = argparse.ArgumentParser(prog="python -m consent_gate.admin.training")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

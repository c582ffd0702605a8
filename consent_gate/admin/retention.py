"""Storage limitation and legal hold: the retention sweeper and the hold register.

The unit of retention is a *decision group*: the ledger rows of one ``(consent_id, purpose)``.
Its clock starts at its first event; it ends ``retention_days`` (from the purpose catalogue)
later.  When it has ended the sweeper

* deletes every recording none of whose groups still needs it -- a recording is needed by a
  group whose decision is granted (or notified) until that group's retention ends, the caller
  withdraws consent (``withdrawn``: one event, under the call's primary purpose, withdraws every
  consent-based purpose of the call), the group is erased on the caller's request, or, for a
  purpose with training copies, its copy exists -- all files of the id (``<id>.wav`` and the
  ``<id>-caller.wav`` / ``<id>-agent.wav`` legs);
* redacts the personal fields (``caller_ref``, ``caller_number``) of the group's ledger rows
  through ``consent_redact()``, after writing a tombstone in ``data_erasures`` that says what
  was removed and why.  Everything else in the rows stays: the non-personal proof that a
  decision was taken, when, for which purpose, having heard which prompt.

A legal hold (on a call id or on a caller reference) blocks both until it is released; holds
are an append-only log (``legal_holds``) themselves.

Concurrency: every item (a recording, a group) is handled in its own transaction under a
``pg_try_advisory_xact_lock``; a second sweeper running at the same time skips what the first
one holds and re-checks, under the lock, what the first one finished.  Every item transaction
also holds a *shared* advisory lock that placing or releasing a hold takes *exclusively*, so a
hold placed while a sweep runs waits for the item in flight and then protects everything after.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import re
import sys
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import structlog

from consent_gate.config import Purpose, add_settings_arguments, settings_for_command
from consent_gate.contract import check_recording_id, recording_id_of_file
from consent_gate.core.events import caller_reference, utcnow
from consent_gate.recordings import (
    FileDeletion,
    dir_mode_problem,
    recording_files,
    remove_files,
)

log = structlog.get_logger(__name__)

# Advisory lock keys (two-int form, apart from the migrator's single-key 724165).
HOLD_LOCK = (724166, 0)
GROUP_LOCK_NS = 724167
RECORDING_LOCK_NS = 724168

_CALLER_REF = re.compile(r"^[0-9a-f]{64}\Z")


class RetentionError(RuntimeError):
    pass


class HoldNotFound(LookupError):
    pass


# -- recording files ------------------------------------------------------------------------

def check_recordings_dir(directory: Path) -> None:
    """Warn (never fail) when the recordings directory is readable by others."""
    problem = dir_mode_problem(directory)
    if problem is not None:
        log.warning("retention.recordings_dir_not_private", dir=str(directory), problem=problem)


# -- decision groups --------------------------------------------------------------------------

@dataclass(frozen=True)
class Group:
    """The ledger rows of one (consent_id, purpose), summarised."""

    consent_id: uuid.UUID
    purpose: str
    legal_basis: str
    call_id: str
    started: datetime
    withdrawn_at: datetime | None
    unredacted: int
    recording_ids: tuple[str, ...]
    erased: bool
    held: bool
    decision: str | None = None  # the group's latest decision event; None: none stored (yet)
    copy_made: bool = False  # a training copy of the group's recording exists

    def expires_at(self, purposes: Mapping[str, Purpose]) -> datetime | None:
        purpose = purposes.get(self.purpose)
        if purpose is None:
            return None
        try:
            return self.started + timedelta(days=purpose.retention_days)
        except OverflowError:  # beyond year 9999 (the settings loader refuses this): never ends
            return None

    def expired(self, purposes: Mapping[str, Purpose], now: datetime) -> bool:
        """The retention period of this group ended (unknown purpose: never, and reported)."""
        expires = self.expires_at(purposes)
        return expires is not None and expires <= now

    def claim_ended(self, purposes: Mapping[str, Purpose], now: datetime) -> bool:
        """This group no longer needs its recording (the one rule for the sweeper, the erasure
        and the training worker)."""
        if self.erased:
            return True
        if self.decision is not None and self.decision not in RECORDING_DECISIONS:
            return True  # declined, no answer, unavailable: this purpose never kept the recording
        if self.withdrawn_at is not None and self.legal_basis == "consent":
            return True  # withdrawn_at covers the whole call (GROUPS_SQL)
        purpose = purposes.get(self.purpose)
        if purpose is not None and purpose.training_copy and self.copy_made:
            return True  # the de-identified copy replaces the original for a training purpose
        return self.expired(purposes, now)


# The decisions under which a purpose keeps a recording.
RECORDING_DECISIONS = frozenset({"granted", "notified"})


GROUPS_SQL = """
WITH keys AS ({keys})
SELECT e.consent_id, e.purpose, min(e.legal_basis) AS legal_basis, min(e.call_id) AS call_id,
       min(e.occurred_at) AS started,
       (array_agg(e.event ORDER BY e.occurred_at DESC, e.seq DESC)
            FILTER (WHERE e.event IN ('granted', 'declined', 'no-input', 'abandoned', 'unavailable', 'notified')))[1]
           AS decision,
       -- A withdrawal (*0) is logged once, under the call's primary purpose, and withdraws every
       -- consent-based purpose of the call: look for it across the consent_id.
       (SELECT min(w.occurred_at) FROM consent_events w
         WHERE w.consent_id = e.consent_id AND w.event = 'withdrawn') AS withdrawn_at,
       coalesce(bool_or(EXISTS (SELECT 1 FROM training_copy_links l WHERE l.recording_id = e.recording_id)),
                false) AS copy_made,
       count(*) FILTER (WHERE e.redacted_at IS NULL) AS unredacted,
       coalesce(array_agg(DISTINCT e.recording_id) FILTER (WHERE e.recording_id IS NOT NULL), '{{}}')
           AS recording_ids,
       EXISTS (SELECT 1 FROM data_erasures d
                WHERE d.scope = 'record' AND d.kind = 'erasure'
                  AND d.consent_id = e.consent_id AND d.purpose = e.purpose) AS erased,
       coalesce(bool_or(EXISTS (SELECT 1 FROM active_legal_holds h
                                 WHERE h.call_id = e.call_id OR h.caller_ref = e.caller_ref)), false) AS held
  FROM consent_events e
  JOIN keys k ON k.consent_id = e.consent_id AND k.purpose = e.purpose
 GROUP BY e.consent_id, e.purpose
 ORDER BY min(e.occurred_at), e.consent_id, e.purpose
"""

KEYS_UNREDACTED = "SELECT DISTINCT consent_id, purpose FROM consent_events WHERE redacted_at IS NULL"
KEYS_BY_RECORDINGS = "SELECT DISTINCT consent_id, purpose FROM consent_events WHERE recording_id = ANY($1::text[])"
KEYS_ONE_GROUP = "SELECT $1::uuid AS consent_id, $2::text AS purpose"

RECORDINGS_NOT_DELETED = """
SELECT DISTINCT e.recording_id FROM consent_events e
 WHERE e.recording_id IS NOT NULL
   AND NOT EXISTS (SELECT 1 FROM data_erasures d
                    WHERE d.scope = 'recording' AND d.kind IN ('retention', 'erasure')
                      AND d.recording_id = e.recording_id)
 ORDER BY 1
"""

RECORDINGS_DELETED_AMONG = """
SELECT DISTINCT recording_id FROM data_erasures
 WHERE scope = 'recording' AND kind IN ('retention', 'erasure') AND recording_id = ANY($1::text[])
"""

RECORDING_DELETED = """
SELECT EXISTS (SELECT 1 FROM data_erasures
                WHERE scope = 'recording' AND kind IN ('retention', 'erasure') AND recording_id = $1)
"""

INSERT_ERASURE = """
INSERT INTO data_erasures (erasure_id, kind, scope, consent_id, purpose, legal_basis, call_id, recording_id,
                           files, rows_redacted, reason, request_id, request_ref, actor, performed_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::text[], $10, $11, $12, $13, $14, $15)
"""


async def fetch_groups(connection: asyncpg.Connection, keys_sql: str, *args: Any) -> list[Group]:
    rows = await connection.fetch(GROUPS_SQL.format(keys=keys_sql), *args)
    return [Group(consent_id=row["consent_id"], purpose=row["purpose"], legal_basis=row["legal_basis"],
                  call_id=row["call_id"], started=row["started"], withdrawn_at=row["withdrawn_at"],
                  unredacted=row["unredacted"], recording_ids=tuple(sorted(row["recording_ids"])),
                  erased=row["erased"], held=row["held"], decision=row["decision"],
                  copy_made=row["copy_made"]) for row in rows]


async def write_erasure(
    connection: asyncpg.Connection, *, kind: str, scope: str, reason: str, actor: str, at: datetime,
    group: Group | None = None, recording_id: str | None = None, files: Sequence[str] = (),
    rows_redacted: int = 0, request_id: uuid.UUID | None = None, request_ref: str | None = None,
) -> uuid.UUID:
    """Append one tombstone (or refusal) to ``data_erasures``; returns its id."""
    erasure_id = uuid.uuid4()
    await connection.execute(
        INSERT_ERASURE, erasure_id, kind, scope,
        group.consent_id if group else None, group.purpose if group else None,
        group.legal_basis if group else None, group.call_id if group else None,
        recording_id, list(files), rows_redacted, reason[:500], request_id,
        request_ref[:200] if request_ref else None, actor[:100], at,
    )
    return erasure_id


async def redact_group(
    connection: asyncpg.Connection, group: Group, *, kind: str, reason: str, actor: str, at: datetime,
    request_id: uuid.UUID | None = None, request_ref: str | None = None,
) -> int:
    """Tombstone, then redact the personal fields of the group's rows (inside the caller's transaction)."""
    erasure_id = await write_erasure(connection, kind=kind, scope="record", reason=reason, actor=actor, at=at,
                                     group=group, rows_redacted=group.unredacted, request_id=request_id,
                                     request_ref=request_ref)
    return int(await connection.fetchval("SELECT consent_redact($1, $2)", erasure_id, at))


async def lock_group(connection: asyncpg.Connection, group: Group, *, wait: bool) -> bool:
    fn = "pg_advisory_xact_lock" if wait else "pg_try_advisory_xact_lock"
    got = await connection.fetchval(f"SELECT {fn}($1, hashtext($2))::text", GROUP_LOCK_NS,
                                    f"{group.consent_id}/{group.purpose}")
    return wait or got == "true"


async def lock_recording(connection: asyncpg.Connection, recording_id: str, *, wait: bool) -> bool:
    fn = "pg_advisory_xact_lock" if wait else "pg_try_advisory_xact_lock"
    got = await connection.fetchval(f"SELECT {fn}($1, hashtext($2))::text", RECORDING_LOCK_NS, recording_id)
    return wait or got == "true"


async def share_hold_lock(connection: asyncpg.Connection) -> None:
    """Held (shared) while anything is deleted; placing or releasing a hold takes it exclusively."""
    await connection.execute("SELECT pg_advisory_xact_lock_shared($1, $2)", *HOLD_LOCK)


# -- legal hold -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hold:
    hold_id: uuid.UUID
    call_id: str | None
    caller_ref: str | None
    reason: str
    actor: str
    at: datetime
    released_at: datetime | None = None
    released_by: str | None = None
    release_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: (str(v) if isinstance(v, uuid.UUID) else v.isoformat() if isinstance(v, datetime) else v)
                for k, v in data.items()}


def _check_text(value: str, what: str, limit: int) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise ValueError(f"{what}: 1..{limit} characters")
    return value.strip()


async def place_hold(
    connection: asyncpg.Connection, *, reason: str, actor: str, at: datetime,
    call_id: str | None = None, caller_ref: str | None = None,
) -> uuid.UUID:
    """Place a legal hold on a call or a caller; nothing of theirs is deleted until it is released."""
    if (call_id is None) == (caller_ref is None):
        raise ValueError("a hold is on a call id or on a caller, not both, not neither")
    if call_id is not None:
        _check_text(call_id, "call id", 64)
    if caller_ref is not None and not _CALLER_REF.match(caller_ref):
        raise ValueError("caller reference: 64 hex characters")
    reason, actor = _check_text(reason, "reason", 500), _check_text(actor, "actor", 100)
    hold_id = uuid.uuid4()
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1, $2)", *HOLD_LOCK)
        await connection.execute(
            "INSERT INTO legal_holds (hold_id, action, call_id, caller_ref, reason, actor, at)"
            " VALUES ($1, 'placed', $2, $3, $4, $5, $6)", hold_id, call_id, caller_ref, reason, actor, at)
    log.info("hold.placed", hold_id=str(hold_id), on="call" if call_id else "caller", actor=actor)
    return hold_id


async def release_hold(
    connection: asyncpg.Connection, hold_id: uuid.UUID | str, *, reason: str, actor: str, at: datetime,
) -> None:
    """Release a hold (logged); raises HoldNotFound for an unknown or already released hold."""
    try:
        hold_id = uuid.UUID(str(hold_id))
    except ValueError:
        raise HoldNotFound("no such hold") from None
    reason, actor = _check_text(reason, "reason", 500), _check_text(actor, "actor", 100)
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1, $2)", *HOLD_LOCK)
        placed = await connection.fetchrow(
            "SELECT call_id, caller_ref FROM active_legal_holds WHERE hold_id = $1", hold_id)
        if placed is None:
            raise HoldNotFound("no such active hold")
        await connection.execute(
            "INSERT INTO legal_holds (hold_id, action, call_id, caller_ref, reason, actor, at)"
            " VALUES ($1, 'released', $2, $3, $4, $5, $6)",
            hold_id, placed["call_id"], placed["caller_ref"], reason, actor, at)
    log.info("hold.released", hold_id=str(hold_id), actor=actor)


async def list_holds(connection: asyncpg.Connection, *, include_released: bool = False) -> list[Hold]:
    rows = await connection.fetch(
        """SELECT p.hold_id, p.call_id, p.caller_ref, p.reason, p.actor, p.at,
                  r.at AS released_at, r.actor AS released_by, r.reason AS release_reason
             FROM legal_holds p
             LEFT JOIN legal_holds r ON r.hold_id = p.hold_id AND r.action = 'released'
            WHERE p.action = 'placed' AND ($1 OR r.hold_id IS NULL)
            ORDER BY p.at, p.seq""", include_released)
    return [Hold(**dict(row)) for row in rows]


# -- the sweeper ------------------------------------------------------------------------------

@dataclass
class SweepReport:
    started_at: datetime
    dry_run: bool = False
    recordings_deleted: list[dict[str, Any]] = field(default_factory=list)
    records_redacted: list[dict[str, Any]] = field(default_factory=list)
    held: list[dict[str, Any]] = field(default_factory=list)
    busy: int = 0  # items another sweeper (or an erasure) was working on: skipped, not lost
    # Files of an already tombstoned recording, deleted now (an earlier unlink did not happen).
    leftovers_deleted: list[dict[str, Any]] = field(default_factory=list)
    # Files that could not be deleted (name and error): retried by the next sweep.
    files_not_deleted: list[dict[str, Any]] = field(default_factory=list)
    unknown_purposes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


class RetentionSweeper:
    """Delete what outlived its purpose.  Idempotent; any number may run at once."""

    def __init__(
        self, dsn: str, recordings_dir: Path, purposes: Mapping[str, Purpose], *,
        clock: Callable[[], datetime] = utcnow, actor: str = "retention-sweeper",
        connect: Callable[..., Any] = asyncpg.connect,
    ) -> None:
        self.dsn = dsn
        self.recordings_dir = Path(recordings_dir)
        self.purposes = purposes
        self.clock = clock
        self.actor = actor
        self._connect = connect

    async def run(self, *, dry_run: bool = False) -> SweepReport:
        now = self.clock()
        report = SweepReport(started_at=now, dry_run=dry_run)
        run_id = uuid.uuid4()
        check_recordings_dir(self.recordings_dir)
        connection = await self._connect(self.dsn, timeout=10)
        try:
            await self._sweep_leftovers(connection, report, dry_run)
            await self._sweep_recordings(connection, now, report, run_id, dry_run)
            await self._sweep_records(connection, now, report, run_id, dry_run)
        finally:
            await connection.close()
        log.info("retention.sweep_done", recordings=len(report.recordings_deleted),
                 records=len(report.records_redacted), held=len(report.held), busy=report.busy,
                 unknown_purposes=report.unknown_purposes, leftovers=len(report.leftovers_deleted),
                 not_deleted=len(report.files_not_deleted), dry_run=dry_run, run_id=str(run_id))
        return report

    def _note_unknown(self, groups: Iterable[Group], report: SweepReport) -> None:
        for group in groups:
            if group.purpose not in self.purposes and group.purpose not in report.unknown_purposes:
                report.unknown_purposes.append(group.purpose)
                log.warning("retention.unknown_purpose", purpose=group.purpose,
                            hint="not in the purpose catalogue: its data is kept until it is added")

    def _recording_due(self, groups: Sequence[Group], now: datetime) -> bool:
        return bool(groups) and all(g.claim_ended(self.purposes, now) for g in groups)

    async def _sweep_recordings(self, connection: asyncpg.Connection, now: datetime, report: SweepReport,
                                run_id: uuid.UUID, dry_run: bool) -> None:
        candidates = [row[0] for row in await connection.fetch(RECORDINGS_NOT_DELETED)]
        if not candidates:
            return
        by_recording: dict[str, list[Group]] = defaultdict(list)
        groups = await fetch_groups(connection, KEYS_BY_RECORDINGS, candidates)
        self._note_unknown(groups, report)
        for group in groups:
            for recording_id in group.recording_ids:
                by_recording[recording_id].append(group)
        for recording_id in candidates:
            claims = by_recording.get(recording_id, [])
            if not self._recording_due(claims, now):
                continue
            if any(g.held for g in claims):
                report.held.append({"recording_id": recording_id})
                continue
            if dry_run:
                report.recordings_deleted.append({"recording_id": recording_id, "files": [
                    p.name for p in recording_files(self.recordings_dir, recording_id)]})
                continue
            await self._delete_recording(connection, recording_id, now, report, run_id)

    async def _delete_recording(self, connection: asyncpg.Connection, recording_id: str, now: datetime,
                                report: SweepReport, run_id: uuid.UUID) -> None:
        check_recording_id(recording_id)
        paths: list[Path] = []
        async with connection.transaction():
            await share_hold_lock(connection)
            if not await lock_recording(connection, recording_id, wait=False):
                report.busy += 1
                return
            # Re-check under the lock: another sweeper may have finished it, a hold may be new.
            if await connection.fetchval(RECORDING_DELETED, recording_id):
                return
            claims = await fetch_groups(connection, KEYS_BY_RECORDINGS, [recording_id])
            if not self._recording_due(claims, now):
                return
            if any(g.held for g in claims):
                report.held.append({"recording_id": recording_id})
                return
            paths = recording_files(self.recordings_dir, recording_id)
            ends = sorted({str(g.expires_at(self.purposes)) for g in claims})
            await write_erasure(
                connection, kind="retention", scope="recording", recording_id=recording_id,
                files=[p.name for p in paths], actor=self.actor, at=now, request_id=run_id,
                reason="no purpose needs the recording any more (retention ended "
                       f"{', '.join(ends)}; or consent withdrawn / erased)")
        # The files go only once the tombstone has committed: a failed commit leaves them in
        # place for the next sweep; a failed unlink is reported and retried (_sweep_leftovers).
        outcome = await asyncio.to_thread(remove_files, paths)
        report.recordings_deleted.append({"recording_id": recording_id, "files": outcome.removed})
        self._note_failed(recording_id, outcome, report)
        log.info("retention.recording_deleted", recording_id=recording_id, files=outcome.removed,
                 consent_ids=sorted(str(g.consent_id) for g in claims), run_id=str(run_id))

    def _note_failed(self, recording_id: str, outcome: FileDeletion, report: SweepReport) -> None:
        if outcome.failed:
            report.files_not_deleted.append({"recording_id": recording_id, "files": outcome.failed})
            log.error("retention.files_not_deleted", recording_id=recording_id, files=outcome.failed,
                      hint="fix the cause; the next sweep deletes them")

    async def _sweep_leftovers(self, connection: asyncpg.Connection, report: SweepReport, dry_run: bool) -> None:
        """Files of recordings whose deletion tombstone committed but whose unlink did not happen
        (a crash between the two, an unlink error): delete them now.  Costs one directory
        listing, not a look at every tombstone ever written."""
        on_disk: dict[str, list[Path]] = defaultdict(list)
        try:
            with os.scandir(self.recordings_dir) as entries:
                for entry in entries:
                    recording_id = recording_id_of_file(entry.name)
                    if recording_id:
                        on_disk[recording_id].append(Path(entry.path))
        except FileNotFoundError:
            return
        if not on_disk:
            return
        tombstoned = {row[0] for row in await connection.fetch(RECORDINGS_DELETED_AMONG, sorted(on_disk))}
        for recording_id in sorted(tombstoned):
            paths = sorted(on_disk[recording_id])
            if dry_run:
                report.leftovers_deleted.append({"recording_id": recording_id, "files": [p.name for p in paths]})
                continue
            outcome = await asyncio.to_thread(remove_files, paths)
            if outcome.removed:
                report.leftovers_deleted.append({"recording_id": recording_id, "files": outcome.removed})
                log.warning("retention.leftover_deleted", recording_id=recording_id, files=outcome.removed)
            self._note_failed(recording_id, outcome, report)

    async def _sweep_records(self, connection: asyncpg.Connection, now: datetime, report: SweepReport,
                             run_id: uuid.UUID, dry_run: bool) -> None:
        groups = await fetch_groups(connection, KEYS_UNREDACTED)
        self._note_unknown(groups, report)
        for group in groups:
            if not group.expired(self.purposes, now):
                continue
            if group.held:
                report.held.append({"consent_id": str(group.consent_id), "purpose": group.purpose})
                continue
            if dry_run:
                report.records_redacted.append({"consent_id": str(group.consent_id), "purpose": group.purpose,
                                                "rows": group.unredacted})
                continue
            await self._redact(connection, group, now, report, run_id)

    async def _redact(self, connection: asyncpg.Connection, group: Group, now: datetime, report: SweepReport,
                      run_id: uuid.UUID) -> None:
        async with connection.transaction():
            await share_hold_lock(connection)
            if not await lock_group(connection, group, wait=False):
                report.busy += 1
                return
            fresh = await fetch_groups(connection, KEYS_ONE_GROUP, group.consent_id, group.purpose)
            if not fresh or fresh[0].unredacted == 0 or not fresh[0].expired(self.purposes, now):
                return
            group = fresh[0]
            if group.held:
                report.held.append({"consent_id": str(group.consent_id), "purpose": group.purpose})
                return
            days = self.purposes[group.purpose].retention_days
            rows = await redact_group(
                connection, group, kind="retention", actor=self.actor, at=now, request_id=run_id,
                reason=f"retention period of purpose '{group.purpose}' ({days} days) ended "
                       f"{group.expires_at(self.purposes).isoformat()}")  # type: ignore[union-attr]
        report.records_redacted.append({"consent_id": str(group.consent_id), "purpose": group.purpose, "rows": rows})
        log.info("retention.record_redacted", consent_id=str(group.consent_id), purpose=group.purpose,
                 call_id=group.call_id, rows=rows, run_id=str(run_id))


# -- command line -----------------------------------------------------------------------------

def _actor(args: argparse.Namespace) -> str:
    if getattr(args, "actor", None):
        return str(args.actor)
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (containers)
        return f"cli:uid{os.getuid()}"


def read_caller_number(value: str) -> str:
    """``-`` reads the number from stdin, so it stays out of the shell history and ``ps``."""
    if value == "-":
        value = sys.stdin.readline()
    number = value.strip()
    if not number:
        raise SystemExit("consent-gate: empty caller number")
    return number




def _cmd_sweep(args: argparse.Namespace) -> int:
    settings = settings_for_command(args)
    sweeper = RetentionSweeper(settings.database_dsn, settings.recordings_dir, settings.purposes,
                               actor=_actor(args) if args.actor else "retention-sweeper")
    report = asyncio.run(sweeper.run(dry_run=args.dry_run))
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        verb = "would delete" if args.dry_run else "deleted"
        print(f"{verb} {len(report.recordings_deleted)} recording(s), "
              f"{'would redact' if args.dry_run else 'redacted'} {len(report.records_redacted)} decision(s); "
              f"{len(report.held)} kept under legal hold; {report.busy} skipped (busy)")
        for purpose in report.unknown_purposes:
            print(f"warning: purpose {purpose!r} is not in the catalogue: its data is kept", file=sys.stderr)
    for failed in report.files_not_deleted:
        names = ", ".join(f"{f['name']} ({f['error']})" for f in failed["files"])
        print(f"error: recording {failed['recording_id']}: could not delete {names}; the next sweep retries",
              file=sys.stderr)
    return 1 if report.files_not_deleted else 0


async def _with_connection(dsn: str, work: Callable[[asyncpg.Connection], Any]) -> Any:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        return await work(connection)
    finally:
        await connection.close()


def _cmd_hold(args: argparse.Namespace) -> int:
    settings = settings_for_command(args)
    now = utcnow()
    match args.hold_command:
        case "place":
            caller_ref = None
            if args.caller_number is not None:
                caller_ref = caller_reference(settings.hmac_key, read_caller_number(args.caller_number))
                if caller_ref is None:
                    raise SystemExit("consent-gate: the caller number has no digits")
            hold_id = asyncio.run(_with_connection(settings.database_dsn, lambda c: place_hold(
                c, call_id=args.call, caller_ref=caller_ref, reason=args.reason, actor=_actor(args), at=now)))
            print(hold_id)
        case "release":
            try:
                asyncio.run(_with_connection(settings.database_dsn, lambda c: release_hold(
                    c, args.hold_id, reason=args.reason, actor=_actor(args), at=now)))
            except HoldNotFound:
                print("consent-gate: no such active hold", file=sys.stderr)
                return 1
            print(f"released {args.hold_id}")
        case "list":
            holds = asyncio.run(_with_connection(settings.database_dsn, lambda c: list_holds(
                c, include_released=args.all)))
            if args.json:
                print(json.dumps([h.to_json() for h in holds], indent=2))
            elif not holds:
                print("(no legal holds)")
            else:
                for h in holds:
                    on = f"call {h.call_id}" if h.call_id else f"caller {(h.caller_ref or '')[:12]}…"
                    state = f"released {h.released_at:%Y-%m-%d} by {h.released_by}" if h.released_at else "active"
                    print(f"{h.hold_id}  {on}  placed {h.at:%Y-%m-%d} by {h.actor}  {state}  {h.reason}")
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``retention sweep`` and ``hold place|release|list``; the command is ``args.func``."""
    retention = subparsers.add_parser("retention", help="delete recordings and personal data past retention")
    retention_sub = retention.add_subparsers(dest="retention_command", required=True)
    sweep = retention_sub.add_parser(
        "sweep", help="delete expired recordings, redact expired ledger rows (idempotent; safe to run twice)")
    add_settings_arguments(sweep)
    sweep.add_argument("--dry-run", action="store_true", help="only report what would be deleted")
    sweep.add_argument("--json", action="store_true", help="report as JSON")
    sweep.add_argument("--actor", help="who runs it, for the tombstones (default retention-sweeper)")
    sweep.set_defaults(func=_cmd_sweep)

    hold = subparsers.add_parser("hold", help="legal holds: nothing held is deleted until released")
    hold_sub = hold.add_subparsers(dest="hold_command", required=True)
    place = hold_sub.add_parser("place", help="place a hold on a call or a caller")
    add_settings_arguments(place)
    on = place.add_mutually_exclusive_group(required=True)
    on.add_argument("--call", help="call id (the Asterisk channel id)")
    on.add_argument("--caller-number", help="caller number ('-' reads it from stdin); stored as the keyed hash")
    place.add_argument("--reason", required=True, help="why (case number, authority request)")
    place.add_argument("--actor", help="who places it (default cli:<user>)")
    release = hold_sub.add_parser("release", help="release a hold")
    add_settings_arguments(release)
    release.add_argument("hold_id")
    release.add_argument("--reason", required=True)
    release.add_argument("--actor", help="who releases it (default cli:<user>)")
    listing = hold_sub.add_parser("list", help="list active holds")
    add_settings_arguments(listing)
    listing.add_argument("--all", action="store_true", help="include released holds")
    listing.add_argument("--json", action="store_true")
    for parser in (place, release, listing):
        parser.set_defaults(func=_cmd_hold)


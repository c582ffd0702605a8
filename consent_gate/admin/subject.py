"""Data-subject requests: access (GDPR Art. 15) and erasure (Art. 17), by caller number or reference.

A request names the person by

* their **caller number** -- matched through the keyed HMAC (``privacy.hmac_key``), never by
  the number itself; or
* a **consent reference** (the ``CONSENT_ID`` of one decision) -- it covers that decision and
  the other decisions of the same call by the same caller (one call can ask for several
  purposes).

``export`` writes a zip archive: ``consent-records.json`` (decisions, ledger events, erasure
tombstones of those decisions, recording list with sha256) and ``recordings/<id>*.wav``.

``erase`` removes, per decision group (consent_id, purpose):

* nothing, with a logged refusal, when the purpose's legal basis is ``legal-obligation``
  (GDPR Art. 17(3)(b)) or when the call or caller is under legal hold (Art. 17(3)(e));
* otherwise the personal fields of its ledger rows (through the audited ``consent_redact()``
  path, after an ``erasure`` tombstone), and every recording that no other decision still
  needs (all files of the id).

Nothing here ever puts caller data into a path; recordings are found by their 32-hex id only.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import stat
import sys
import uuid
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import IO, Any

import asyncpg
import structlog

from consent_gate.admin.retention import (
    KEYS_BY_RECORDINGS,
    RECORDING_DELETED,
    Group,
    _actor,
    fetch_groups,
    lock_group,
    lock_recording,
    read_caller_number,
    redact_group,
    share_hold_lock,
    write_erasure,
)
from consent_gate.config import Purpose, add_settings_arguments, settings_for_command
from consent_gate.contract import check_recording_id
from consent_gate.core.events import caller_reference, utcnow
from consent_gate.recordings import recording_files, remove_files

log = structlog.get_logger(__name__)

EXPORT_FORMAT = "consent-gate-subject-export/1"
ART_17_3_B = ("GDPR Art. 17(3)(b): the recording and its record are kept to comply with a legal "
              "obligation (purpose '{purpose}', legal basis legal-obligation) until {until}")
ART_17_3_E = ("GDPR Art. 17(3)(e): kept under a legal hold (establishment, exercise or defence of "
              "legal claims) until the hold is released")

# The ledger columns an export shows (explicit: a column added later is not exported by accident).
EXPORT_COLUMNS = (
    "event_id", "consent_id", "call_id", "event", "purpose", "legal_basis", "language", "prompt_version",
    "digit", "caller_ref", "caller_number", "recording_id", "prompt_started_at", "decided_at",
    "occurred_at", "stored_at", "source", "via_journal", "detail", "redacted_at", "redaction_id",
)


_CONSENT_REFERENCE = re.compile(r"^[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}\Z")


class SubjectNotFound(LookupError):
    """No personal data matches the request (the same answer whatever the reason)."""


@dataclass(frozen=True)
class SubjectQuery:
    caller_number: str | None = None
    consent_id: str | None = None

    def __post_init__(self) -> None:
        if (self.caller_number is None) == (self.consent_id is None):
            raise ValueError("give a caller number or a consent reference, not both")
        if self.consent_id is not None:
            # Only the form the caller was given (8-4-4-4-12 hex): uuid.UUID() also takes braces,
            # a urn:uuid: prefix and more, which PostgreSQL refuses; stored lower-case.
            if not isinstance(self.consent_id, str) or not _CONSENT_REFERENCE.match(self.consent_id):
                raise ValueError("a consent reference is a UUID (8-4-4-4-12 hex digits)")
            object.__setattr__(self, "consent_id", self.consent_id.lower())
        if self.caller_number is not None and (not isinstance(self.caller_number, str)
                                               or len(self.caller_number) > 64):
            raise ValueError("a caller number has at most 64 characters")


# -- scope ------------------------------------------------------------------------------------

KEYS_BY_CALLER = """
SELECT DISTINCT e.consent_id, e.purpose FROM consent_events e
 WHERE e.consent_id IN (SELECT consent_id FROM consent_events WHERE caller_ref = $1)
"""

KEYS_BY_CONSENT = """
SELECT DISTINCT e.consent_id, e.purpose FROM consent_events e
 WHERE e.consent_id = $1::uuid
    OR e.consent_id IN (SELECT o.consent_id FROM consent_events o
                          JOIN consent_events r ON r.consent_id = $1::uuid
                           AND o.call_id = r.call_id AND o.caller_ref = r.caller_ref)
"""


async def find_scope(connection: asyncpg.Connection, hmac_key: bytes, query: SubjectQuery) -> list[Group]:
    """The decision groups of the person the request names; [] when there are none."""
    if query.caller_number is not None:
        ref = caller_reference(hmac_key, query.caller_number)
        if ref is None:
            return []
        return await fetch_groups(connection, KEYS_BY_CALLER, ref)
    return await fetch_groups(connection, KEYS_BY_CONSENT, query.consent_id)


def _keys(groups: Sequence[Group]) -> tuple[list[uuid.UUID], list[str]]:
    return [g.consent_id for g in groups], [g.purpose for g in groups]


_IN_GROUPS = "(consent_id, purpose) IN (SELECT * FROM unnest($1::uuid[], $2::text[]))"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (uuid.UUID,)):
        return str(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return value


def _row_json(row: asyncpg.Record) -> dict[str, Any]:
    data = {k: _jsonable(v) for k, v in dict(row).items()}
    if isinstance(data.get("detail"), str):  # jsonb arrives as text
        data["detail"] = json.loads(data["detail"])
    return data


# -- export -----------------------------------------------------------------------------------

@dataclass
class ExportSummary:
    decisions: int
    events: int
    recordings: list[str]
    files: list[str]


async def collect_records(
    connection: asyncpg.Connection, hmac_key: bytes, query: SubjectQuery, purposes: Mapping[str, Purpose],
    *, now: datetime,
) -> dict[str, Any]:
    groups = await find_scope(connection, hmac_key, query)
    if not groups:
        raise SubjectNotFound("no records")
    ids, names = _keys(groups)
    events = await connection.fetch(
        f"SELECT {', '.join(EXPORT_COLUMNS)} FROM consent_events WHERE {_IN_GROUPS} ORDER BY occurred_at, seq",
        ids, names)
    recording_ids = sorted({r for g in groups for r in g.recording_ids})
    erasures = await connection.fetch(
        f"""SELECT erasure_id, kind, scope, consent_id, purpose, legal_basis, recording_id, files,
                   rows_redacted, reason, request_ref, performed_at
              FROM data_erasures
             WHERE (scope = 'record' AND {_IN_GROUPS}) OR (scope = 'recording' AND recording_id = ANY($3::text[]))
             ORDER BY performed_at, seq""", ids, names, recording_ids)
    # De-identified training copies made from these recordings are still personal data while
    # the ledger links them (docs/anonymisation.md): the person gets them too.
    copies = await connection.fetch(
        """SELECT l.recording_id, c.copy_id, c.period, c.purpose, c.caller_leg, c.agent_leg, c.delete_after
             FROM training_copy_links l JOIN training_copies c USING (copy_id)
            WHERE l.recording_id = ANY($1::text[]) ORDER BY l.recording_id""", recording_ids)
    decisions = []
    for g in groups:
        first = next(e for e in events if e["consent_id"] == g.consent_id and e["purpose"] == g.purpose)
        last = [e for e in events if e["consent_id"] == g.consent_id and e["purpose"] == g.purpose][-1]
        purpose = purposes.get(g.purpose)
        expires = g.expires_at(purposes)
        decisions.append({
            "consent_id": str(g.consent_id), "purpose": g.purpose, "legal_basis": g.legal_basis,
            "decision": first["event"], "latest_event": last["event"], "decided_at": _jsonable(first["occurred_at"]),
            "retention_days": purpose.retention_days if purpose else None,
            "kept_until": expires.isoformat() if expires else None,
            "recording_ids": list(g.recording_ids), "erased": g.erased,
            "personal_data_removed": g.unredacted == 0,
        })
    return {
        "format": EXPORT_FORMAT,
        "generated_at": now.isoformat(),
        "requested_by": "caller-number" if query.caller_number is not None else "consent-reference",
        "decisions": decisions,
        "events": [_row_json(row) for row in events],
        "erasures": [_row_json(row) for row in erasures],
        "recording_ids": recording_ids,
        "training_copies": [_row_json(row) for row in copies],
    }


def _open_recording(path: Path) -> int | str:
    """Open a recording for reading: a file descriptor, or why it was skipped.

    Only a regular file is read.  A FIFO would block open() until some writer came (an export
    that never ends), a device or a symlink could read something that is not a recording; so
    the type is checked before opening (lstat), the open neither follows links nor blocks, and
    fstat makes sure it is the same regular file that was checked.
    """
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        return "gone"
    if not stat.S_ISREG(before.st_mode):
        return "not a regular file"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return "gone"
    except OSError as error:
        return error.strerror or type(error).__name__
    after = os.fstat(fd)
    if not stat.S_ISREG(after.st_mode) or (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
        os.close(fd)
        return "replaced while being opened"
    os.set_blocking(fd, True)
    return fd


def _add_file(archive: zipfile.ZipFile, path: Path, name: str) -> dict[str, Any]:
    """Copy one regular file into the archive: its size and sha256, or ``skipped`` and why."""
    fd = _open_recording(path)
    if isinstance(fd, str):
        if fd != "gone":
            log.warning("subject.export_file_skipped", file=path.name, reason=fd)
        return {"name": path.name, "skipped": fd}
    digest = hashlib.sha256()
    size = 0
    with os.fdopen(fd, "rb") as source, archive.open(name, "w") as target:
        while chunk := source.read(1 << 16):
            digest.update(chunk)
            size += len(chunk)
            target.write(chunk)
    return {"name": path.name, "bytes": size, "sha256": digest.hexdigest()}


def write_archive(records: dict[str, Any], recordings_dir: Path, out: IO[bytes],
                  copies_dir: Path | None = None) -> ExportSummary:
    """The zip archive: the recordings and training copies (each with its sha256 in the JSON)
    and the records."""
    files_meta: list[dict[str, Any]] = []
    names: list[str] = []
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for recording_id in records["recording_ids"]:
            check_recording_id(recording_id)
            present, skipped = [], []
            for path in recording_files(Path(recordings_dir), recording_id):
                added = _add_file(archive, path, f"recordings/{path.name}")
                if "skipped" in added:
                    if added["skipped"] != "gone":
                        skipped.append(added)
                    continue
                present.append(added)
                names.append(path.name)
            entry: dict[str, Any] = {"recording_id": recording_id, "files": present, "available": bool(present)}
            if skipped:
                entry["skipped"] = skipped
            files_meta.append(entry)
        copies_meta = []
        for copy in records.get("training_copies", []):
            copy_id = str(copy["copy_id"])
            check_recording_id(copy_id)  # the same 32-hex shape: nothing else reaches a path
            copy_file: dict[str, Any] | None = None
            if copies_dir is not None:
                copy_file = _add_file(archive, Path(copies_dir) / f"{copy_id}.wav", f"training-copies/{copy_id}.wav")
                if "skipped" in copy_file:
                    copy_file = None
            if copy_file is not None:
                names.append(f"{copy_id}.wav")
            copies_meta.append({**copy, "file": copy_file, "available": copy_file is not None})
        document = {**{k: v for k, v in records.items() if k not in ("recording_ids", "training_copies")},
                    "recordings": files_meta, "training_copies": copies_meta}
        archive.writestr("consent-records.json", json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        archive.writestr("README.txt", (
            "Your call recordings and consent records.\n\n"
            "consent-records.json  every decision (purpose, legal basis, what you pressed, when),\n"
            "                      the ledger events behind it and any erasure carried out\n"
            "recordings/           the recordings of your calls (WAV); '-caller' / '-agent' files are\n"
            "                      the two directions of the same call, kept for training purposes\n"
            "training-copies/      de-identified copies made from those recordings for training\n"
            "                      (your voice altered; still linked to you, so still yours)\n"))
    return ExportSummary(decisions=len(records["decisions"]), events=len(records["events"]),
                         recordings=list(records["recording_ids"]), files=names)


async def export(
    connection: asyncpg.Connection, hmac_key: bytes, recordings_dir: Path, purposes: Mapping[str, Purpose],
    query: SubjectQuery, out: IO[bytes], *, clock: Callable[[], datetime] = utcnow, actor: str = "unknown",
    copies_dir: Path | None = None,
) -> ExportSummary:
    """Write the person's archive to ``out``; raises SubjectNotFound when nothing matches.
    ``copies_dir``: where training copies live; without it they are listed but not included."""
    records = await collect_records(connection, hmac_key, query, purposes, now=clock())
    summary = await asyncio.to_thread(write_archive, records, Path(recordings_dir), out, copies_dir)
    log.info("subject.exported", by=records["requested_by"], decisions=summary.decisions,
             recordings=summary.recordings, actor=actor)
    return summary


# -- erase ------------------------------------------------------------------------------------

@dataclass
class ErasureResult:
    request_id: str
    status: str = "erased"  # erased | partial | refused
    erased: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    recordings_deleted: list[dict[str, Any]] = field(default_factory=list)
    recordings_kept: list[dict[str, Any]] = field(default_factory=list)
    training_copies_erased: int = 0
    training_copies_left: int = 0  # linked copies not erased because no copies directory was given
    # Files the erasure decided to delete but could not (name and error): the request is
    # "partial"; erasing again, or the next retention sweep, retries the recordings.
    files_not_deleted: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


async def erase(
    connection: asyncpg.Connection, hmac_key: bytes, recordings_dir: Path, purposes: Mapping[str, Purpose],
    query: SubjectQuery, *, reason: str, actor: str, request_ref: str | None = None,
    clock: Callable[[], datetime] = utcnow, copies_dir: Path | None = None,
) -> ErasureResult:
    """Erase what may be erased, refuse (and log) what may not; one transaction, and the files
    only once it has committed (``files_not_deleted`` lists any that could not be: "partial").

    ``copies_dir``: where training copies live (consent_gate.admin.training); the de-identified copy
    made from a recording of an erased decision goes too, with its link.
    """
    reason = (reason or "").strip() or "data-subject erasure request (GDPR Art. 17)"
    now = clock()
    request_id = uuid.uuid4()
    result = ErasureResult(request_id=str(request_id))
    # Files are deleted only after the transaction that records their deletion has committed:
    # a failed commit must leave them in place (and no tombstone), never the other way round.
    deletions: list[tuple[str, list[Path]]] = []
    copy_files: list[Path] = []
    async with connection.transaction():
        await share_hold_lock(connection)
        groups = await find_scope(connection, hmac_key, query)
        if not groups:
            raise SubjectNotFound("no records")
        # Lock in a fixed order (no deadlock with another erasure), then look again under the locks.
        for group in sorted(groups, key=lambda g: (str(g.consent_id), g.purpose)):
            await lock_group(connection, group, wait=True)
        recording_ids = sorted({r for g in groups for r in g.recording_ids})
        for recording_id in recording_ids:
            await lock_recording(connection, recording_id, wait=True)
        ids, names = _keys(groups)
        groups = await fetch_groups(
            connection, "SELECT * FROM unnest($1::uuid[], $2::text[]) AS k(consent_id, purpose)", ids, names)

        for group in groups:
            item = {"consent_id": str(group.consent_id), "purpose": group.purpose}
            refusal = None
            if group.legal_basis == "legal-obligation":
                expires = group.expires_at(purposes)
                refusal = ART_17_3_B.format(purpose=group.purpose,
                                            until=expires.date().isoformat() if expires else "the legal period ends")
            elif group.held:
                refusal = ART_17_3_E
            if refusal is not None:
                await write_erasure(connection, kind="refusal", scope="record", group=group, reason=refusal,
                                    actor=actor, at=now, request_id=request_id, request_ref=request_ref)
                result.refused.append({**item, "legal_basis": group.legal_basis, "reason": refusal})
                log.warning("subject.erasure_refused", consent_id=item["consent_id"], purpose=group.purpose,
                            legal_basis=group.legal_basis, reason=refusal, request_id=str(request_id), actor=actor)
                continue
            rows = 0
            if group.unredacted or not group.erased:
                rows = await redact_group(connection, group, kind="erasure", reason=reason, actor=actor, at=now,
                                          request_id=request_id, request_ref=request_ref)
            result.erased.append({**item, "rows": rows})

        # Recordings: deleted unless another decision still needs them (or a hold keeps them).
        claims = await fetch_groups(connection, KEYS_BY_RECORDINGS, recording_ids) if recording_ids else []
        for recording_id in recording_ids:
            if await connection.fetchval(RECORDING_DELETED, recording_id):
                # Decided earlier; files still there are what an earlier unlink left: retry it.
                leftovers = recording_files(Path(recordings_dir), recording_id)
                if leftovers:
                    deletions.append((recording_id, leftovers))
                continue
            mine = [g for g in claims if recording_id in g.recording_ids]
            live = [g for g in mine if not g.claim_ended(purposes, now)]
            if any(g.held for g in mine):
                result.recordings_kept.append({"recording_id": recording_id, "reason": ART_17_3_E})
                continue
            if live:
                why = "; ".join(sorted({f"needed for purpose '{g.purpose}' ({g.legal_basis})" for g in live}))
                result.recordings_kept.append({"recording_id": recording_id, "reason": why})
                continue
            paths = recording_files(Path(recordings_dir), recording_id)
            await write_erasure(connection, kind="erasure", scope="recording", recording_id=recording_id,
                                files=[p.name for p in paths], reason=reason, actor=actor, at=now,
                                request_id=request_id, request_ref=request_ref)
            deletions.append((recording_id, paths))

        # Training copies made from a recording of an erased decision (still personal data while linked).
        erased_keys = {(e["consent_id"], e["purpose"]) for e in result.erased}
        copy_sources = sorted({r for g in groups if (str(g.consent_id), g.purpose) in erased_keys
                               for r in g.recording_ids})
        if copies_dir is not None and copy_sources:
            for recording_id in copy_sources:
                copy_id = await _forget_training_copy(connection, recording_id)
                if copy_id is not None:
                    copy_files.append(Path(copies_dir) / f"{copy_id}.wav")
                    result.training_copies_erased += 1
        elif copy_sources:
            # Without the directory the copies cannot be deleted: say so rather than claim "erased".
            result.training_copies_left = await connection.fetchval(
                "SELECT count(*) FROM training_copy_links WHERE recording_id = ANY($1::text[])", copy_sources)
            if result.training_copies_left:
                log.warning("subject.training_copies_left", copies=result.training_copies_left,
                            hint="set CONSENT_GATE_TRAINING_DIR or --copies-dir and erase again")
    for recording_id, paths in deletions:
        outcome = await asyncio.to_thread(remove_files, paths)
        result.recordings_deleted.append({"recording_id": recording_id, "files": outcome.removed})
        if outcome.failed:
            result.files_not_deleted.append({"recording_id": recording_id, "files": outcome.failed})
    if copy_files:
        outcome = await asyncio.to_thread(remove_files, copy_files)
        if outcome.failed:
            result.files_not_deleted.append({"training_copies": outcome.failed})
    if result.files_not_deleted:
        log.error("subject.files_not_deleted", files=result.files_not_deleted, request_id=str(request_id),
                  hint="fix the cause; erasing again (or the next retention sweep) deletes recordings left over")
    result.status = ("refused" if not result.erased
                     else "partial" if result.refused or result.training_copies_left or result.files_not_deleted
                     else "erased")
    log.info("subject.erased", status=result.status, erased=len(result.erased), refused=len(result.refused),
             recordings_deleted=[r["recording_id"] for r in result.recordings_deleted],
             request_id=str(request_id), request_ref=request_ref, actor=actor)
    return result


async def _forget_training_copy(connection: asyncpg.Connection, recording_id: str) -> str | None:
    """Remove the index row and link of the copy made from a recording (its file is deleted by
    the caller once this commits); returns the copy id, or None when there is none."""
    copy_id = await connection.fetchval(
        "DELETE FROM training_copy_links WHERE recording_id = $1 RETURNING copy_id", recording_id)
    if copy_id is None:
        return None
    await connection.execute("DELETE FROM training_copies WHERE copy_id = $1", copy_id)
    return check_recording_id(str(copy_id))  # the same 32-hex shape: safe in a path


# -- command line -----------------------------------------------------------------------------

def _query(args: argparse.Namespace) -> SubjectQuery:
    try:
        if args.caller_number is not None:
            return SubjectQuery(caller_number=read_caller_number(args.caller_number))
        return SubjectQuery(consent_id=args.consent_id)
    except ValueError as error:
        raise SystemExit(f"consent-gate: {error}") from None


def training_dir(args: argparse.Namespace | None = None) -> Path | None:
    """The training-copies directory: --copies-dir or $CONSENT_GATE_TRAINING_DIR (optional)."""
    value = getattr(args, "copies_dir", None) or os.environ.get("CONSENT_GATE_TRAINING_DIR")
    return Path(value) if value else None


def _create_private(path: Path) -> IO[bytes]:
    """A new file, 0600, never an existing one (no overwrite, no link following)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "wb")


def _cmd_subject(args: argparse.Namespace) -> int:
    settings = settings_for_command(args)
    query = _query(args)
    actor = _actor(args)

    async def run() -> Any:
        connection = await asyncpg.connect(settings.database_dsn, timeout=10)
        try:
            if args.subject_command == "export":
                try:
                    out = _create_private(args.out)
                except FileExistsError:
                    raise SystemExit(f"consent-gate: {args.out} exists (not overwritten)") from None
                try:
                    with out:
                        return await export(connection, settings.hmac_key, settings.recordings_dir,
                                            settings.purposes, query, out, actor=actor,
                                            copies_dir=training_dir(args))
                except BaseException:
                    args.out.unlink(missing_ok=True)
                    raise
            return await erase(connection, settings.hmac_key, settings.recordings_dir, settings.purposes, query,
                               reason=args.reason, actor=actor, request_ref=args.request_ref,
                               copies_dir=training_dir(args))
        finally:
            await connection.close()

    try:
        outcome = asyncio.run(run())
    except SubjectNotFound:
        print("consent-gate: no records for this person", file=sys.stderr)
        return 2
    if args.subject_command == "export":
        print(f"wrote {args.out}: {outcome.decisions} decision(s), {outcome.events} event(s), "
              f"{len(outcome.files)} recording file(s)")
        return 0
    print(json.dumps(outcome.to_json(), indent=2))
    return 0 if outcome.status == "erased" else 3


def register_cli(subparsers: Any) -> None:
    """Add ``subject export`` and ``subject erase``; the command is ``args.func``.

    Exit codes: 0 done, 2 no records for this person, 3 erasure refused in part or in full.
    """
    subject = subparsers.add_parser("subject", help="data-subject requests: copy (Art. 15) or erasure (Art. 17)")
    sub = subject.add_subparsers(dest="subject_command", required=True)
    for name, help_text in (("export", "write a zip with the person's recordings and consent records"),
                            ("erase", "erase the person's recordings and personal data (tombstone kept)")):
        cmd = sub.add_parser(name, help=help_text)
        add_settings_arguments(cmd)
        who = cmd.add_mutually_exclusive_group(required=True)
        who.add_argument("--caller-number", help="caller number ('-' reads it from stdin); matched via the keyed hash")
        who.add_argument("--consent-id", help="consent reference (CONSENT_ID) the caller was given")
        cmd.add_argument("--actor", help="who handles the request (default cli:<user>)")
        if name == "export":
            cmd.add_argument("--out", type=Path, required=True, help="archive to create (0600, never overwritten)")
            cmd.add_argument("--copies-dir", type=Path,
                             help="training copies directory (default $CONSENT_GATE_TRAINING_DIR): their copies are included")
        else:
            cmd.add_argument("--reason", default="", help="recorded in the tombstone")
            cmd.add_argument("--request-ref", help="your ticket / case reference")
            cmd.add_argument("--copies-dir", type=Path,
                             help="training copies directory (default $CONSENT_GATE_TRAINING_DIR): their copies go too")
        cmd.set_defaults(func=_cmd_subject)

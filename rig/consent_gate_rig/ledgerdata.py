"""Ledger test data for the unit tests that use a throwaway PostgreSQL: a clock, decisions and
events written the way the adapters write them, recording files, and what to read back."""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from consent_gate.admin.retention import RetentionSweeper
from consent_gate.config import Purpose
from consent_gate.core.events import ConsentEvent, EventKind, caller_reference, new_recording_id
from consent_gate.ledger.store import INSERT_SQL, _row

HMAC_KEY = b"unit-test-hmac-key-0123456789abcdef"


T0 = datetime(2031, 3, 1, 9, 30, tzinfo=UTC)


DAY = timedelta(days=1)


PURPOSES = {
    "training": Purpose("training", "consent", "question-training", 90, training_copy=True),
    "documentation": Purpose("documentation", "consent", "question-documentation", 365),
    "mifid": Purpose("mifid", "legal-obligation", "notice-legal-obligation", 1825),
}


class Clock:
    """The injected clock: tests move it, nothing sleeps."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def at(self, when: datetime) -> Clock:
        self.now = when
        return self


def write_recording(recdir: Path, recording_id: str, *, legs: bool = False, payload: bytes | None = None) -> list[Path]:
    """Real files as MixMonitor leaves them: <id>.wav (+ the two legs), 0600."""
    paths = [recdir / f"{recording_id}.wav"]
    if legs:
        paths += [recdir / f"{recording_id}-caller.wav", recdir / f"{recording_id}-agent.wav"]
    for path in paths:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(payload or b"RIFF" + path.name.encode() + os.urandom(64))
    return paths


@dataclass
class Decision:
    """One decision group as the dialog stores it (the ledger's own INSERT)."""

    consent_id: uuid.UUID
    call_id: str
    purpose: str
    recording_id: str | None
    caller_ref: str | None
    events: list[ConsentEvent] = field(default_factory=list)


async def add_decision(
    connection: asyncpg.Connection, *, at: datetime, purpose: str = "training", event: EventKind = EventKind.GRANTED,
    number: str = "+45 20 30 40 50", call_id: str | None = None, consent_id: uuid.UUID | None = None,
    recording_id: str | None | bool = True, caller_number: str | None = None,
) -> Decision:
    legal_basis = PURPOSES[purpose].legal_basis if purpose in PURPOSES else "consent"
    if recording_id is True:
        recording_id = new_recording_id() if event in (EventKind.GRANTED, EventKind.NOTIFIED) else None
    ev = ConsentEvent(
        consent_id=consent_id or uuid.uuid4(), call_id=call_id or f"call-{uuid.uuid4().hex[:16]}", event=event,
        purpose=purpose, legal_basis=legal_basis, occurred_at=at, source="ari", language="da",
        prompt_version=hashlib.sha256(purpose.encode()).hexdigest(),
        digit="1" if event is EventKind.GRANTED else "2" if event is EventKind.DECLINED else None,
        caller_ref=caller_reference(HMAC_KEY, number), caller_number=caller_number,
        recording_id=recording_id or None, prompt_started_at=at - timedelta(seconds=9),
        decided_at=at - timedelta(seconds=1), detail={"attempts": 1, "invalid_keys": []},
    )
    await connection.execute(INSERT_SQL, *_row(ev, False))
    return Decision(ev.consent_id, ev.call_id, purpose, ev.recording_id, ev.caller_ref, [ev])


async def add_event(connection: asyncpg.Connection, decision: Decision, kind: EventKind, at: datetime) -> None:
    first = decision.events[0]
    ev = ConsentEvent(
        consent_id=decision.consent_id, call_id=decision.call_id, event=kind, purpose=decision.purpose,
        legal_basis=first.legal_basis, occurred_at=at, source="ari", caller_ref=first.caller_ref,
        recording_id=decision.recording_id)
    await connection.execute(INSERT_SQL, *_row(ev, False))
    decision.events.append(ev)


async def rows(connection: asyncpg.Connection, consent_id: uuid.UUID) -> list[dict[str, Any]]:
    return [dict(r) for r in await connection.fetch(
        "SELECT * FROM consent_events WHERE consent_id = $1 ORDER BY seq", consent_id)]


async def tombstones(connection: asyncpg.Connection, **where: Any) -> list[dict[str, Any]]:
    clauses = " AND ".join(f"{key} = ${i}" for i, key in enumerate(where, 1)) or "true"
    return [dict(r) for r in await connection.fetch(
        f"SELECT * FROM data_erasures WHERE {clauses} ORDER BY seq", *where.values())]


NON_PERSONAL = ("event_id", "consent_id", "call_id", "event", "purpose", "legal_basis", "language",
                "prompt_version", "digit", "recording_id", "prompt_started_at", "decided_at", "occurred_at",
                "stored_at", "source", "via_journal", "detail")


# A deferred check on recording tombstones: the transaction fails at COMMIT, after every
# statement in it ran (what a lost connection or a serialization failure at commit looks like).
FAIL_AT_COMMIT = """
CREATE FUNCTION test_refuse_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'refused at commit (test)';
END;
$$;
CREATE CONSTRAINT TRIGGER test_refuse_at_commit AFTER INSERT ON data_erasures
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (NEW.scope = 'recording') EXECUTE FUNCTION test_refuse_at_commit();
"""


def sweeper(db: str, recdir: Path, clock: Clock, **kw: Any) -> RetentionSweeper:
    return RetentionSweeper(db, recdir, PURPOSES, clock=clock, **kw)


async def add_training_copy(conn: asyncpg.Connection, recording_id: str, copies: Path) -> str:
    """A linked training copy of a recording, as consent_gate.admin.training makes them."""
    copies.mkdir(mode=0o700, exist_ok=True)
    copy_id = uuid.uuid4().hex
    (copies / f"{copy_id}.wav").write_bytes(b"RIFF-copy-" + copy_id.encode())
    await conn.execute("INSERT INTO training_copies (copy_id, period, purpose, caller_leg, agent_leg, method,"
                       " delete_after) VALUES ($1, '2031-03', 'training', 'mcadams', 'original', 'm', '2031-06-01')",
                       copy_id)
    await conn.execute("INSERT INTO training_copy_links VALUES ($1, $2)", recording_id, copy_id)
    return copy_id


def make_event(call_id: str, kind: EventKind = EventKind.GRANTED, **fields: Any) -> ConsentEvent:
    """A complete ledger event for ``call_id`` (a grant unless told), any field overridden."""
    now = datetime.now(UTC)
    values: dict[str, Any] = dict(
        consent_id=uuid.uuid4(), call_id=call_id, event=kind, purpose="training", legal_basis="consent",
        occurred_at=now, source="ari", language="da",
        prompt_version=hashlib.sha256(b"question").hexdigest(), digit="1",
        caller_ref=hashlib.sha256(b"caller").hexdigest(),
        recording_id=new_recording_id() if kind is EventKind.GRANTED else None,
        prompt_started_at=now - timedelta(seconds=4), decided_at=now - timedelta(seconds=1),
        detail={"attempts": 1, "invalid_keys": []},
    )
    values.update(fields)
    return ConsentEvent(**values)


def unique_call() -> str:
    """A call id no other test uses."""
    return f"test-{uuid.uuid4().hex}"

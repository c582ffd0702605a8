"""Consent events: what the ledger stores, and the caller pseudonym."""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


class Decision(StrEnum):
    """Outcome of one consent dialog; the first four are also CONSENT_STATUS values."""

    GRANTED = "granted"
    DECLINED = "declined"
    NO_INPUT = "no-input"
    UNAVAILABLE = "unavailable"
    # A purpose whose legal basis is not consent (legal obligation, legitimate interest): the
    # caller is told, nothing is asked, and the recording runs once the notice is stored.
    NOTIFIED = "notified"
    ABANDONED = "abandoned"  # the caller hung up during the dialog (no status: the call is gone)


class EventKind(StrEnum):
    GRANTED = "granted"
    DECLINED = "declined"
    NO_INPUT = "no-input"
    ABANDONED = "abandoned"
    UNAVAILABLE = "unavailable"
    NOTIFIED = "notified"
    WITHDRAWN = "withdrawn"
    CALLER_RECORDS = "caller-records"
    PAUSED = "paused"
    RESUMED = "resumed"


_NUMBER_CHARS = re.compile(r"[^0-9+]")


def normalise_number(raw: str) -> str:
    """Digits and a leading '+' only, so '+45 12 34 56 78' and '+4512345678' match."""
    cleaned = _NUMBER_CHARS.sub("", raw or "")
    return ("+" if cleaned.startswith("+") else "") + cleaned.replace("+", "")


def caller_reference(key: bytes, raw_number: str) -> str | None:
    """Keyed HMAC-SHA256 of the normalised number: pseudonymous, stable, useless without the key."""
    number = normalise_number(raw_number)
    if not number.lstrip("+"):
        return None
    return hmac.new(key, number.encode(), hashlib.sha256).hexdigest()


def new_id() -> uuid.UUID:
    return uuid.uuid4()


def new_recording_id() -> str:
    """32 lowercase hex characters: the only thing a recording's file name is made of."""
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ConsentEvent:
    consent_id: uuid.UUID
    call_id: str
    event: EventKind
    purpose: str
    legal_basis: str
    occurred_at: datetime
    source: str
    language: str | None = None
    prompt_version: str | None = None
    digit: str | None = None
    caller_ref: str | None = None
    caller_number: str | None = None
    recording_id: str | None = None
    prompt_started_at: datetime | None = None
    decided_at: datetime | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    event_id: uuid.UUID = field(default_factory=new_id)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, uuid.UUID):
                data[key] = str(value)
            elif isinstance(value, datetime):
                data[key] = value.isoformat()
        data["event"] = str(self.event)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ConsentEvent:
        values = dict(data)
        for key in ("consent_id", "event_id"):
            values[key] = uuid.UUID(values[key])
        for key in ("occurred_at", "prompt_started_at", "decided_at"):
            if values.get(key):
                values[key] = datetime.fromisoformat(values[key])
        values["event"] = EventKind(values["event"])
        return cls(**values)

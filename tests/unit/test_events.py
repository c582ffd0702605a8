"""Consent events: the caller pseudonym and the JSON form the journal stores."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from consent_gate.core.events import (
    ConsentEvent,
    EventKind,
    caller_reference,
    new_recording_id,
    normalise_number,
)

KEY = b"k" * 32


@pytest.mark.parametrize(
    "formatted",
    ["+45 12 34 56 78", "+4512345678", "+45-12-34-56-78", "+45 (12) 34.56.78", " +4512345678 "],
)
def test_caller_reference_is_stable_under_formatting(formatted: str) -> None:
    assert caller_reference(KEY, formatted) == caller_reference(KEY, "+4512345678")


def test_caller_reference_is_the_keyed_hmac_of_the_normalised_number() -> None:
    expected = hmac.new(KEY, b"+4512345678", hashlib.sha256).hexdigest()
    assert caller_reference(KEY, "+45 12 34 56 78") == expected
    assert len(expected) == 64


def test_caller_reference_differs_by_key_and_by_number() -> None:
    ref = caller_reference(KEY, "+4512345678")
    assert caller_reference(b"x" * 32, "+4512345678") != ref
    assert caller_reference(KEY, "+4512345679") != ref
    # A leading '+' is part of the number: '+45…' and '45…' are different numbers.
    assert caller_reference(KEY, "4512345678") != ref


@pytest.mark.parametrize("raw", ["", "anonymous", "Unknown", "+", "  ", "+ - ()", None])
def test_caller_reference_is_none_without_digits(raw: str | None) -> None:
    assert caller_reference(KEY, raw) is None  # type: ignore[arg-type]


def test_normalise_number_keeps_only_a_leading_plus() -> None:
    assert normalise_number("+45 12+34") == "+451234"
    assert normalise_number("0045 1234") == "00451234"


def test_recording_id_is_32_lowercase_hex() -> None:
    ids = {new_recording_id() for _ in range(50)}
    assert len(ids) == 50
    for rid in ids:
        assert len(rid) == 32 and all(c in "0123456789abcdef" for c in rid)


def _full_event() -> ConsentEvent:
    t0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    return ConsentEvent(
        consent_id=uuid.uuid4(),
        call_id="1700000000.42",
        event=EventKind.GRANTED,
        purpose="training",
        legal_basis="consent",
        occurred_at=t0 + timedelta(seconds=3),
        source="ari",
        language="da",
        prompt_version="a" * 64,
        digit="1",
        caller_ref="b" * 64,
        caller_number="+4512345678",
        recording_id="c" * 32,
        prompt_started_at=t0,
        decided_at=t0 + timedelta(seconds=2),
        detail={"invalid_keys": ["7"], "attempts": 2, "nested": {"a": [1, 2]}},
    )


def test_json_round_trip_through_text() -> None:
    event = _full_event()
    text = json.dumps(event.to_json())
    back = ConsentEvent.from_json(json.loads(text))
    assert back == event
    assert isinstance(back.consent_id, uuid.UUID) and isinstance(back.event_id, uuid.UUID)
    assert back.event is EventKind.GRANTED
    assert back.prompt_started_at is not None and back.prompt_started_at.tzinfo is not None


def test_json_round_trip_with_optional_fields_empty() -> None:
    event = ConsentEvent(
        consent_id=uuid.uuid4(), call_id="c", event=EventKind.ABANDONED, purpose="documentation",
        legal_basis="consent", occurred_at=datetime.now(UTC), source="agi",
    )
    data = json.loads(json.dumps(event.to_json()))
    assert data["event"] == "abandoned" and data["decided_at"] is None
    assert ConsentEvent.from_json(data) == event


def test_event_ids_are_unique_per_event() -> None:
    a, b = _full_event(), _full_event()
    assert a.event_id != b.event_id

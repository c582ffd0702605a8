"""The consent dialog, driven through a scripted DialogPort.

The port plays nothing: each test scripts what the caller does at every step (a key during the
question, a key after it, silence, hanging up) and the port fails the test on any step the script
did not expect.  Prompts come from the real catalog in prompts/sounds; decisions go either to a
real Ledger on the test PostgreSQL (with a real journal) or to a fake with scripted durability.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import re
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from consent_gate.config import DialogSettings, Settings, load_settings
from consent_gate.core.dialog import (
    RESULT_FIELDS,
    RESULT_SEPARATOR,
    CallerHungUp,
    CallInfo,
    DialogResult,
    DialogState,
    GateContext,
    Phase,
    PromptRef,
    run_consent_dialog,
)
from consent_gate.core.events import ConsentEvent, Decision, EventKind, caller_reference
from consent_gate.ledger.journal import Journal
from consent_gate.ledger.store import Durability, Ledger
from consent_gate.prompts.catalog import PromptCatalog, packaged_prompts_dir, packaged_sounds_dir

REPO = Path(__file__).resolve().parents[2]
SOUNDS = packaged_sounds_dir()
ASTERISK_SOUNDS = "/var/lib/asterisk/sounds/consent-gate/"
HMAC_KEY = "k" * 32
CALLER = "+45 12 34 56 78"
DEAD_DSN = "postgresql://nobody@127.0.0.1:1/nothing"  # connection refused at once
T = 10.0  # upper bound for waits on the dialog task; never slept

CATALOG = PromptCatalog.load(SOUNDS)


def sha256_of(lang: str, name: str) -> str:
    return hashlib.sha256((SOUNDS / lang / f"{name}.wav").read_bytes()).hexdigest()


def make_settings(**changes: Any) -> Settings:
    base = load_settings(None, env={
        "CONSENT_GATE_HMAC_KEY": HMAC_KEY,
        "CONSENT_GATE_ARI_PASSWORD": "pw",
        "CONSENT_GATE_PROMPTS_DIR": str(SOUNDS),
        "CONSENT_GATE_ASTERISK_SOUNDS_DIR": ASTERISK_SOUNDS,
        # A grant is handed back only for a private recordings directory (mkdtemp: 0700, ours).
        "CONSENT_GATE_RECORDINGS_DIR": tempfile.mkdtemp(prefix="consent-gate-rec-"),
        "CONSENT_GATE_RECORDINGS_OWNER": str(os.geteuid()),
    })
    return dataclasses.replace(base, **changes)


class FakeClock:
    """Each reading is one second after the previous one."""

    def __init__(self) -> None:
        self.now = datetime(2026, 5, 4, 10, 0, 0, tzinfo=UTC)
        self.readings: list[datetime] = []

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        self.readings.append(self.now)
        return self.now


# -- the scripted caller --------------------------------------------------------------------

HANGUP = "<hangup>"


@dataclass(frozen=True)
class Play:
    """Expect a prompt to be played; the caller presses ``key`` during it (None: listens to the end)."""

    name: str
    key: str | None = None


@dataclass(frozen=True)
class Wait:
    """Expect a wait for a key; the caller presses ``key`` (None: silence until the timeout)."""

    key: str | None = None


class ScriptedPort:
    source = "ari"

    def __init__(self, *steps: Play | Wait) -> None:
        self.steps = list(steps)
        self.played: list[tuple[PromptRef, str]] = []
        self.waits: list[float] = []
        self.discards: list[int] = []  # len(self.played) at each discard_keys()

    def _next(self, kind: type, what: str) -> Play | Wait:
        assert self.steps, f"the dialog did an unscripted {what}"
        step = self.steps.pop(0)
        assert isinstance(step, kind), f"the dialog did {what}, the script expected {step}"
        return step

    @staticmethod
    def _outcome(key: str | None) -> str | None:
        if key == HANGUP:
            raise CallerHungUp()
        return key

    async def play(self, prompt: PromptRef, *, stop_keys: str) -> str | None:
        self.played.append((prompt, stop_keys))
        step = self._next(Play, f"play({prompt.name})")
        assert isinstance(step, Play) and prompt.name == step.name, f"played {prompt.name}, expected {step}"
        if step.key not in (None, HANGUP):
            assert step.key in stop_keys, f"key {step.key!r} cannot interrupt {prompt.name} ({stop_keys!r})"
        return self._outcome(step.key)

    async def wait_key(self, timeout: float) -> str | None:
        self.waits.append(timeout)
        step = self._next(Wait, "wait_key")
        return self._outcome(step.key)

    async def discard_keys(self) -> None:
        self.discards.append(len(self.played))

    def assert_done(self) -> None:
        assert self.steps == [], f"the dialog stopped before {self.steps}"

    def names(self) -> list[str]:
        return [prompt.name for prompt, _ in self.played]


# -- ledgers --------------------------------------------------------------------------------


class FakeLedger:
    """Returns scripted durabilities (DATABASE once the script is used up) and keeps every event."""

    def __init__(self, *durabilities: Durability, degraded: bool = False) -> None:
        self.script = list(durabilities)
        self.appends: list[tuple[ConsentEvent, bool]] = []
        self.degraded = degraded

    async def append(self, event: ConsentEvent, *, use_journal: bool = True) -> Durability:
        self.appends.append((event, use_journal))
        return self.script.pop(0) if self.script else Durability.DATABASE

    @property
    def events(self) -> list[ConsentEvent]:
        return [event for event, _ in self.appends]


@pytest.fixture
def pg_ledger(ledger: Ledger) -> Ledger:
    """The real Ledger on the test PostgreSQL (tests/unit/conftest.py)."""
    return ledger


@pytest.fixture
async def dead_ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    """A real Ledger whose database refuses connections; its journal works."""
    ledger = Ledger(DEAD_DSN, Journal(tmp_path / "journal"), write_timeout=2.0)
    try:
        yield ledger
    finally:
        await ledger.close()


def make_unwritable(directory: Path) -> None:
    """A journal directory nobody can write to, also root (who ignores permission bits)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "journal.lock").mkdir()
    (directory / "pending.jsonl").mkdir()
    directory.chmod(0o500)


# -- running one dialog ---------------------------------------------------------------------


@dataclass
class Outcome:
    result: DialogResult
    state: DialogState
    port: ScriptedPort
    call: CallInfo
    clock: FakeClock


async def run(
    port: ScriptedPort,
    ledger: Any,
    *,
    settings: Settings | None = None,
    language: str = "en",
    purpose: str = "training",
    number: str = CALLER,
) -> Outcome:
    settings = settings or make_settings()
    clock = FakeClock()
    gate = GateContext(settings, CATALOG, ledger, clock=clock)
    call = CallInfo(call_id=f"test-{uuid.uuid4().hex}", caller_number=number, language=language)
    state = DialogState()
    result = await asyncio.wait_for(
        run_consent_dialog(port, call, settings.purposes[purpose], gate, state), T)
    port.assert_done()
    assert state.phase is Phase.DONE
    return Outcome(result, state, port, call, clock)


async def stored(ledger: Ledger, outcome: Outcome) -> list[dict[str, Any]]:
    return await ledger.history(call_id=outcome.call.call_id)


def assert_recording_id(value: str | None) -> None:
    assert value is not None and re.fullmatch(r"[0-9a-f]{32}", value), value


Q = "question-training"


# -- the happy paths, stored in PostgreSQL --------------------------------------------------


async def test_accept_during_the_prompt_grants_and_stores_the_evidence(pg_ledger: Ledger) -> None:
    out = await run(ScriptedPort(Play(Q, "1")), pg_ledger)
    assert out.result.status is Decision.GRANTED
    assert_recording_id(out.result.recording_id)
    assert out.result.confirmation is not None and out.result.confirmation.name == "granted"
    assert out.result.confirmation.language == "en"
    assert out.port.waits == []  # the key interrupted the question: no wait afterwards

    [question] = [prompt for prompt, _ in out.port.played]
    assert question.media == ASTERISK_SOUNDS + "en/" + Q
    assert question.version == sha256_of("en", Q)
    assert out.state.durability is Durability.DATABASE

    [row] = await stored(pg_ledger, out)
    assert row["event"] == "granted" and row["via_journal"] is False
    assert str(row["consent_id"]) == out.result.consent_id
    assert row["recording_id"] == out.result.recording_id
    assert row["prompt_version"] == sha256_of("en", Q)
    assert row["digit"] == "1" and row["language"] == "en"
    assert row["purpose"] == "training" and row["legal_basis"] == "consent" and row["source"] == "ari"
    assert row["prompt_started_at"] is not None and row["decided_at"] is not None
    assert row["prompt_started_at"] <= row["decided_at"]
    assert row["prompt_started_at"] in out.clock.readings and row["decided_at"] in out.clock.readings
    assert row["caller_ref"] == caller_reference(HMAC_KEY.encode(), "+4512345678")
    assert json.loads(row["detail"]) == {"invalid_keys": [], "attempts": 1}


async def test_every_key_may_interrupt_the_question(pg_ledger: Ledger) -> None:
    out = await run(ScriptedPort(Play(Q, "1")), pg_ledger)
    _, stop_keys = out.port.played[0]
    assert set("0123456789*#") <= set(stop_keys)


async def test_accept_after_the_prompt_within_the_timeout_grants(pg_ledger: Ledger) -> None:
    settings = make_settings(dialog=DialogSettings(digit_timeout=7.5))
    out = await run(ScriptedPort(Play(Q), Wait("1")), pg_ledger, settings=settings)
    assert out.result.status is Decision.GRANTED
    assert_recording_id(out.result.recording_id)
    assert out.port.waits == [7.5]
    [row] = await stored(pg_ledger, out)
    assert row["event"] == "granted" and row["digit"] == "1"
    assert row["recording_id"] == out.result.recording_id
    assert row["prompt_started_at"] < row["decided_at"]


@pytest.mark.parametrize("script", [(Play(Q, "2"),), (Play(Q), Wait("2"))], ids=["during", "after"])
async def test_decline_records_nothing(pg_ledger: Ledger, script: tuple[Play | Wait, ...]) -> None:
    out = await run(ScriptedPort(*script), pg_ledger)
    assert out.result.status is Decision.DECLINED
    assert out.result.recording_id is None
    assert out.result.confirmation is not None and out.result.confirmation.name == "declined"
    [row] = await stored(pg_ledger, out)
    assert row["event"] == "declined" and row["digit"] == "2" and row["recording_id"] is None
    assert row["prompt_version"] == sha256_of("en", Q)


async def test_silence_asks_twice_then_no_input(pg_ledger: Ledger) -> None:
    out = await run(ScriptedPort(Play(Q), Wait(None), Play(Q), Wait(None)), pg_ledger)
    assert out.result.status is Decision.NO_INPUT
    assert out.result.recording_id is None
    assert out.port.names() == [Q, Q]
    assert out.result.confirmation is not None and out.result.confirmation.name == "declined"
    [row] = await stored(pg_ledger, out)
    assert row["event"] == "no-input" and row["digit"] is None and row["recording_id"] is None
    assert json.loads(row["detail"]) == {"invalid_keys": [], "attempts": 2}
    # prompt_started_at is the first time the question started, not the repeat.
    assert row["prompt_started_at"] == out.clock.readings[0]
    assert row["prompt_started_at"] < row["decided_at"]


@pytest.mark.parametrize("repeats", [0, 2, 3])
async def test_the_number_of_repeats_comes_from_config(repeats: int) -> None:
    ledger = FakeLedger()
    script = [step for _ in range(repeats + 1) for step in (Play(Q), Wait(None))]
    out = await run(ScriptedPort(*script), ledger, settings=make_settings(dialog=DialogSettings(repeats=repeats)))
    assert out.result.status is Decision.NO_INPUT
    assert out.port.names() == [Q] * (repeats + 1)
    assert ledger.events[0].detail["attempts"] == repeats + 1


@pytest.mark.parametrize("script", [
    (Play(Q, "7"), Play("invalid"), Play(Q), Wait(None)),
    (Play(Q), Wait("9"), Play("invalid"), Play(Q), Wait(None)),
], ids=["during", "after"])
async def test_invalid_key_then_silence_is_no_input(pg_ledger: Ledger, script: tuple[Play | Wait, ...]) -> None:
    out = await run(ScriptedPort(*script), pg_ledger)
    assert out.result.status is Decision.NO_INPUT
    assert out.result.recording_id is None
    [invalid] = [(p, keys) for p, keys in out.port.played if p.name == "invalid"]
    assert invalid[0].language == "en" and invalid[0].version == sha256_of("en", "invalid")
    assert invalid[1] == ""  # the "invalid key" notice is not interrupted
    [row] = await stored(pg_ledger, out)
    assert row["event"] == "no-input" and row["digit"] is None
    detail = json.loads(row["detail"])
    assert detail["invalid_keys"] == [script[0].key or script[1].key]  # type: ignore[union-attr]
    assert detail["attempts"] == 2


async def test_invalid_key_then_accept_grants(pg_ledger: Ledger) -> None:
    out = await run(ScriptedPort(Play(Q, "7"), Play("invalid"), Play(Q, "1")), pg_ledger)
    assert out.result.status is Decision.GRANTED
    assert_recording_id(out.result.recording_id)
    [row] = await stored(pg_ledger, out)
    assert row["event"] == "granted" and row["digit"] == "1"
    assert json.loads(row["detail"]) == {"invalid_keys": ["7"], "attempts": 2}


async def test_two_invalid_keys_are_both_kept() -> None:
    ledger = FakeLedger()
    out = await run(ScriptedPort(Play(Q, "*"), Play("invalid"), Play(Q), Wait("#"), Play("invalid")), ledger)
    assert out.result.status is Decision.NO_INPUT
    assert ledger.events[0].detail["invalid_keys"] == ["*", "#"]


# -- hanging up -----------------------------------------------------------------------------


@pytest.mark.parametrize("script", [
    (Play(Q, HANGUP),),
    (Play(Q), Wait(HANGUP)),
    (Play(Q, "7"), Play("invalid", HANGUP)),
    (Play(Q), Wait(None), Play(Q, HANGUP)),
    (Play(Q), Wait(None), Play(Q), Wait(HANGUP)),
], ids=["during-prompt", "during-wait", "during-invalid-notice", "during-repeat", "during-second-wait"])
async def test_hangup_is_abandoned_and_records_nothing(pg_ledger: Ledger, script: tuple[Play | Wait, ...]) -> None:
    out = await run(ScriptedPort(*script), pg_ledger)
    assert out.result.status is Decision.ABANDONED
    assert out.result.recording_id is None
    assert out.result.confirmation is None  # nobody is listening
    [row] = await stored(pg_ledger, out)
    assert row["event"] == "abandoned" and row["recording_id"] is None and row["digit"] is None
    assert row["prompt_started_at"] <= row["decided_at"]


# -- the database is down -------------------------------------------------------------------


async def test_database_down_grant_is_unavailable_and_journaled(dead_ledger: Ledger) -> None:
    out = await run(ScriptedPort(Play(Q, "1")), dead_ledger)
    assert out.result.status is Decision.UNAVAILABLE
    assert out.result.recording_id is None
    # The caller pressed 1 and heard the question: tell them nothing is recorded.
    assert out.result.confirmation is not None and out.result.confirmation.name == "declined"
    [event] = dead_ledger.journal.pending()
    assert event.event is EventKind.UNAVAILABLE
    assert event.digit == "1" and event.recording_id is None
    assert event.detail["reason"] == "ledger-unavailable" and event.detail["pressed"] == "granted"
    assert event.call_id == out.call.call_id and str(event.consent_id) == out.result.consent_id
    assert event.prompt_version == sha256_of("en", Q)
    assert out.state.durability is Durability.JOURNAL


class AckLostLedger(Ledger):
    """A real ledger whose first grant is committed but reported failed: the primary lost
    after its synchronous standby had the commit, before the reply reached the service."""

    async def append(self, event: ConsentEvent, *, use_journal: bool = True) -> Durability:
        stored = await super().append(event, use_journal=use_journal)
        if event.event is EventKind.GRANTED and stored is Durability.DATABASE:
            return Durability.LOST
        return stored


async def test_a_grant_stored_but_unacknowledged_leaves_exactly_one_decision(pg_dsn: str, tmp_path: Path) -> None:
    ledger = AckLostLedger(pg_dsn, Journal(tmp_path / "journal"), write_timeout=5.0)
    try:
        out = await run(ScriptedPort(Play(Q, "1")), ledger)
        assert out.result.status is Decision.UNAVAILABLE and out.result.recording_id is None  # not recorded
        await ledger.replay_journal()
        rows = await stored(ledger, out)
        assert [row["event"] for row in rows] == ["granted"], "one decision: the stored grant, no second"
        assert ledger.journal.pending() == [] and ledger.journal.quarantined_lines() == 0
    finally:
        await ledger.close()


async def test_database_down_grant_records_when_journaling_is_allowed(dead_ledger: Ledger) -> None:
    out = await run(ScriptedPort(Play(Q, "1")), dead_ledger, settings=make_settings(record_when_journaled=True))
    assert out.result.status is Decision.GRANTED
    assert_recording_id(out.result.recording_id)
    [event] = dead_ledger.journal.pending()
    assert event.event is EventKind.GRANTED and event.digit == "1"
    assert event.recording_id == out.result.recording_id
    assert out.state.durability is Durability.JOURNAL


async def test_database_down_decline_is_journaled(dead_ledger: Ledger) -> None:
    out = await run(ScriptedPort(Play(Q, "2")), dead_ledger)
    assert out.result.status is Decision.DECLINED and out.result.recording_id is None
    [event] = dead_ledger.journal.pending()
    assert event.event is EventKind.DECLINED and event.digit == "2"


@pytest.mark.parametrize("record_when_journaled", [False, True])
async def test_database_and_journal_down_records_nothing(tmp_path: Path, record_when_journaled: bool) -> None:
    directory = tmp_path / "readonly-journal"
    make_unwritable(directory)
    ledger = Ledger(DEAD_DSN, Journal(directory), write_timeout=2.0)
    try:
        out = await run(ScriptedPort(Play(Q, "1")), ledger,
                        settings=make_settings(record_when_journaled=record_when_journaled))
    finally:
        await ledger.close()
        directory.chmod(0o700)
    assert out.result.status is Decision.UNAVAILABLE
    assert out.result.recording_id is None
    assert out.state.durability is Durability.LOST


async def test_degraded_ledger_asks_nothing() -> None:
    ledger = FakeLedger(degraded=True)
    out = await run(ScriptedPort(), ledger)  # any prompt or wait fails the test
    assert out.result.status is Decision.UNAVAILABLE
    assert out.result.recording_id is None
    assert out.result.confirmation is None  # the caller was never asked
    [event] = ledger.events
    assert event.event is EventKind.UNAVAILABLE and event.digit is None and event.recording_id is None


async def test_real_ledger_degraded_by_a_failed_write_asks_nothing_on_the_next_call(dead_ledger: Ledger) -> None:
    first = await run(ScriptedPort(Play(Q, "2")), dead_ledger)
    assert first.result.status is Decision.DECLINED
    assert dead_ledger.degraded
    second = await run(ScriptedPort(), dead_ledger)
    assert second.result.status is Decision.UNAVAILABLE and second.result.recording_id is None
    kinds = [event.event for event in dead_ledger.journal.pending()]
    assert kinds == [EventKind.DECLINED, EventKind.UNAVAILABLE]


async def test_degraded_ledger_still_asks_when_journaled_grants_may_record() -> None:
    ledger = FakeLedger(Durability.JOURNAL, degraded=True)
    out = await run(ScriptedPort(Play(Q, "1")), ledger, settings=make_settings(record_when_journaled=True))
    assert out.result.status is Decision.GRANTED
    assert_recording_id(out.result.recording_id)


# -- scripted durability --------------------------------------------------------------------


async def test_grant_needs_the_database_not_the_journal() -> None:
    ledger = FakeLedger(Durability.DATABASE)
    out = await run(ScriptedPort(Play(Q, "1")), ledger)
    assert out.result.status is Decision.GRANTED
    [(event, use_journal)] = ledger.appends
    assert event.event is EventKind.GRANTED and use_journal is False
    assert event.recording_id == out.result.recording_id


@pytest.mark.parametrize("first", [Durability.LOST, Durability.JOURNAL])
async def test_grant_not_in_the_database_is_unavailable(first: Durability) -> None:
    ledger = FakeLedger(first, Durability.JOURNAL)
    out = await run(ScriptedPort(Play(Q, "1")), ledger)
    assert out.result.status is Decision.UNAVAILABLE and out.result.recording_id is None
    (granted, no_journal), (unavailable, with_journal) = ledger.appends
    assert granted.event is EventKind.GRANTED and no_journal is False
    assert unavailable.event is EventKind.UNAVAILABLE and with_journal is True
    assert unavailable.digit == "1" and unavailable.recording_id is None
    assert unavailable.consent_id == granted.consent_id


@pytest.mark.parametrize("durability, status", [
    (Durability.DATABASE, Decision.GRANTED),
    (Durability.JOURNAL, Decision.GRANTED),
    (Durability.LOST, Decision.UNAVAILABLE),
])
async def test_journaled_grants_when_allowed(durability: Durability, status: Decision) -> None:
    ledger = FakeLedger(durability)
    out = await run(ScriptedPort(Play(Q, "1")), ledger, settings=make_settings(record_when_journaled=True))
    assert out.result.status is status
    assert (out.result.recording_id is not None) is (status is Decision.GRANTED)
    [(event, use_journal)] = ledger.appends
    assert use_journal is True


async def test_lost_decline_stays_declined() -> None:
    ledger = FakeLedger(Durability.LOST)
    out = await run(ScriptedPort(Play(Q, "2")), ledger)
    assert out.result.status is Decision.DECLINED and out.result.recording_id is None


async def test_the_store_finishes_even_if_the_call_task_is_cancelled() -> None:
    """A hangup that cancels the call's task while the decision is being written loses nothing."""
    entered, release = asyncio.Event(), asyncio.Event()
    appended: list[ConsentEvent] = []

    class SlowLedger(FakeLedger):
        async def append(self, event: ConsentEvent, *, use_journal: bool = True) -> Durability:
            entered.set()
            await release.wait()
            appended.append(event)
            return Durability.DATABASE

    settings = make_settings()
    gate = GateContext(settings, CATALOG, SlowLedger(), clock=FakeClock())
    call = CallInfo(call_id="cancelled-call", caller_number=CALLER, language="en")
    task = asyncio.create_task(
        run_consent_dialog(ScriptedPort(Play(Q, "2")), call, settings.purposes["training"], gate))
    await asyncio.wait_for(entered.wait(), T)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, T)
    release.set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + T
    while not appended:
        assert loop.time() < deadline, "the shielded store never finished"
        await asyncio.sleep(0)
    assert appended[0].event is EventKind.DECLINED


# -- languages ------------------------------------------------------------------------------


@pytest.mark.parametrize("channel, expected", [
    ("da", "da"), ("da_DK", "da"), ("da-DK", "da"), ("DA", "da"),
    ("en", "en"), ("en_GB", "en"), ("fr", "en"), ("", "en"), ("xx_YY", "en"),
])
async def test_channel_language_picks_the_prompts(pg_ledger: Ledger, channel: str, expected: str) -> None:
    out = await run(ScriptedPort(Play(Q, "7"), Play("invalid"), Play(Q, "1")), pg_ledger, language=channel)
    assert out.result.status is Decision.GRANTED
    for prompt, _ in out.port.played:
        assert prompt.language == expected
        assert prompt.media == f"{ASTERISK_SOUNDS}{expected}/{prompt.name}"
        assert prompt.version == sha256_of(expected, prompt.name)
    assert out.result.confirmation is not None
    assert out.result.confirmation.language == expected
    assert out.result.confirmation.version == sha256_of(expected, "granted")
    [row] = await stored(pg_ledger, out)
    assert row["language"] == expected and row["prompt_version"] == sha256_of(expected, Q)


async def test_a_prompt_missing_in_the_language_plays_and_records_the_fallback(tmp_path: Path) -> None:
    """What Asterisk is told to play and the version stored as evidence must be the same file."""
    sounds = tmp_path / "sounds"
    for lang in ("da", "en"):
        (sounds / lang).mkdir(parents=True)
        for wav in (SOUNDS / lang).glob("*.wav"):
            if not (lang == "da" and wav.stem == "invalid"):
                (sounds / lang / wav.name).write_bytes(wav.read_bytes())
    catalog = PromptCatalog.load(sounds, packaged_prompts_dir() / "manifest.json")
    settings = make_settings()
    port = ScriptedPort(Play(Q, "7"), Play("invalid"), Play(Q, "1"))
    gate = GateContext(settings, catalog, FakeLedger(), clock=FakeClock())
    call = CallInfo(call_id="fallback", caller_number=CALLER, language="da")
    result = await run_consent_dialog(port, call, settings.purposes["training"], gate)
    assert result.status is Decision.GRANTED
    question, invalid, _ = [prompt for prompt, _ in port.played]
    assert (question.language, question.media) == ("da", f"{ASTERISK_SOUNDS}da/{Q}")
    assert question.version == sha256_of("da", Q)
    assert (invalid.language, invalid.media) == ("en", f"{ASTERISK_SOUNDS}en/invalid")
    assert invalid.version == sha256_of("en", "invalid")


def test_danish_and_english_questions_differ() -> None:
    assert sha256_of("da", Q) != sha256_of("en", Q)


async def test_default_language_comes_from_config() -> None:
    out = await run(ScriptedPort(Play(Q, "1")), FakeLedger(), language="fr",
                    settings=make_settings(default_language="da"))
    assert out.port.played[0][0].language == "da"


async def test_the_purpose_chooses_the_question(pg_ledger: Ledger) -> None:
    out = await run(ScriptedPort(Play("question-documentation", "1")), pg_ledger, purpose="documentation")
    assert out.result.status is Decision.GRANTED
    [row] = await stored(pg_ledger, out)
    assert row["purpose"] == "documentation"
    assert row["prompt_version"] == sha256_of("en", "question-documentation")


# -- keys from config -----------------------------------------------------------------------

CUSTOM_KEYS = DialogSettings(accept_key="5", decline_key="9", reciprocal_key="3")


async def test_accept_key_comes_from_config(pg_ledger: Ledger) -> None:
    settings = make_settings(dialog=CUSTOM_KEYS)
    out = await run(ScriptedPort(Play(Q, "1"), Play("invalid"), Play(Q, "5")), pg_ledger, settings=settings)
    assert out.result.status is Decision.GRANTED
    assert_recording_id(out.result.recording_id)
    [row] = await stored(pg_ledger, out)
    assert row["digit"] == "5" and json.loads(row["detail"])["invalid_keys"] == ["1"]


async def test_decline_key_comes_from_config(pg_ledger: Ledger) -> None:
    settings = make_settings(dialog=CUSTOM_KEYS)
    out = await run(ScriptedPort(Play(Q, "2"), Play("invalid"), Play(Q), Wait("9")), pg_ledger, settings=settings)
    assert out.result.status is Decision.DECLINED and out.result.recording_id is None
    [row] = await stored(pg_ledger, out)
    assert row["digit"] == "9" and json.loads(row["detail"])["invalid_keys"] == ["2"]


# -- the caller's number --------------------------------------------------------------------


async def test_raw_number_is_stored_only_when_configured() -> None:
    hidden = FakeLedger()
    await run(ScriptedPort(Play(Q, "1")), hidden)
    assert hidden.events[0].caller_number is None
    assert hidden.events[0].caller_ref == caller_reference(HMAC_KEY.encode(), CALLER)

    shown = FakeLedger()
    await run(ScriptedPort(Play(Q, "1")), shown, settings=make_settings(store_raw_number=True))
    assert shown.events[0].caller_number == CALLER


async def test_anonymous_caller_has_no_reference(pg_ledger: Ledger) -> None:
    out = await run(ScriptedPort(Play(Q, "1")), pg_ledger, number="anonymous")
    assert out.result.status is Decision.GRANTED
    [row] = await stored(pg_ledger, out)
    assert row["caller_ref"] is None


async def test_long_call_ids_fit_the_ledger(pg_ledger: Ledger) -> None:
    settings = make_settings()
    gate = GateContext(settings, CATALOG, pg_ledger, clock=FakeClock())
    call = CallInfo(call_id="x" * 100, caller_number=CALLER, language="en")
    result = await run_consent_dialog(ScriptedPort(Play(Q, "1")), call, settings.purposes["training"], gate)
    assert result.status is Decision.GRANTED  # stored in the database, not refused by its CHECK


def test_the_packed_result_holds_every_variable_in_order_status_last() -> None:
    result = DialogResult(Decision.GRANTED, "c" * 32, "r" * 32, None, caller_records=True,
                          purpose="documentation", purposes=["documentation", "training"])
    fields = result.packed().split(RESULT_SEPARATOR)
    assert dict(zip(RESULT_FIELDS, fields, strict=True)) == result.channel_variables()
    assert fields[-1] == "granted" and RESULT_FIELDS[-1] == "CONSENT_STATUS"
    assert fields[6] == "documentation,training"


def test_a_value_with_the_separator_is_refused_not_packed() -> None:
    bad = PromptRef(name="granted", language="en", media="/snd:x/en/granted", version="v")
    with pytest.raises(ValueError, match="CONSENT_CONFIRMATION"):
        DialogResult(Decision.DECLINED, "c" * 32, None, bad).packed()

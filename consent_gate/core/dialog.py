"""The consent dialog: one implementation, driven by the ARI and the AGI adapters alike.

An adapter implements :class:`DialogPort` (play a prompt that a key may interrupt, wait for a
key, nothing else).  :func:`run_consent_dialog` asks, listens, decides, stores the decision and
returns what the dialplan needs.  Recording is allowed only when the decision is ``granted``
*and* the ledger stored it durably; everything else fails closed to "no recording".
"""

from __future__ import annotations

import asyncio
import enum
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Protocol

import structlog

from consent_gate.config import Purpose, Settings
from consent_gate.contract import (  # noqa: F401 (re-exported)
    CALLER_RECORDS_VARIABLE,
    CONFIRMATION_VARIABLE,
    ID_VARIABLE,
    PURPOSE_VARIABLE,
    PURPOSES_VARIABLE,
    RECORD_LEGS_VARIABLE,
    RECORDING_ID_VARIABLE,
    RESULT_FIELDS,
    RESULT_SEPARATOR,
    RESULT_VARIABLE,
    STATUS_VARIABLE,
)
from consent_gate.core.events import (
    ConsentEvent,
    Decision,
    EventKind,
    caller_reference,
    new_id,
    new_recording_id,
    utcnow,
)
from consent_gate.ledger.store import Durability, Ledger
from consent_gate.recordings import recordings_dir_problem

log = structlog.get_logger(__name__)

DTMF_STOP_KEYS = "0123456789*#"


class CallerHungUp(Exception):
    """The caller's channel is gone; the dialog ends as 'abandoned'."""


@dataclass(frozen=True)
class PromptRef:
    """A prompt as the adapter plays it: the file as Asterisk sees it (no extension)."""

    name: str
    language: str
    media: str
    version: str


class DialogPort(Protocol):
    source: str

    async def play(self, prompt: PromptRef, *, stop_keys: str) -> str | None:
        """Play; return the key that interrupted it, or None when it played to the end."""

    async def wait_key(self, timeout: float) -> str | None:
        """Return the next key, or None after ``timeout`` seconds of silence."""

    async def discard_keys(self) -> None:
        """Forget keys pressed so far: called right before a purpose's question starts, so a key
        meant for the previous question (or pressed before any was heard) cannot answer it."""


class PromptSource(Protocol):
    def path(self, lang: str, name: str) -> object: ...
    def version(self, lang: str, name: str) -> str: ...
    @property
    def languages(self) -> Collection[str]: ...


@dataclass(frozen=True)
class CallInfo:
    call_id: str
    caller_number: str
    language: str


class Phase(enum.Enum):
    """Where the dialog is; an adapter that keeps its own call state listens via ``on_phase``."""

    STARTING = "starting"
    ASKING = "asking"
    STORING = "storing"
    DONE = "done"


@dataclass
class DialogState:
    """Everything one call's dialog knows; the adapter keeps it as its per-call state object."""

    consent_id: object = field(default_factory=new_id)
    phase: Phase = Phase.STARTING
    # Told of every phase change (the ARI service's per-call state machine follows it).
    on_phase: Callable[[Phase], None] | None = field(default=None, repr=False, compare=False)
    attempt: int = 0
    language: str = "en"
    prompt_version: str | None = None
    prompt_started_at: datetime | None = None
    decided_at: datetime | None = None
    digit: str | None = None
    invalid_keys: list[str] = field(default_factory=list)
    decision: Decision | None = None
    failure: str | None = None
    caller_records: bool = False
    # Several purposes in one call share one recording (and one CONSENT_ID).
    planned_recording_id: str | None = None
    recording_id: str | None = None
    durability: Durability | None = None

    def enter(self, phase: Phase) -> None:
        if phase is self.phase:
            return
        self.phase = phase
        if self.on_phase is not None:
            self.on_phase(phase)




@dataclass(frozen=True)
class DialogResult:
    status: Decision
    consent_id: str
    recording_id: str | None
    confirmation: PromptRef | None
    record_legs: bool = False
    caller_records: bool = False
    purpose: str = ""  # the primary purpose (mid-call events are logged under it)
    purposes: list[str] = field(default_factory=list)  # every purpose the recording is kept for

    def channel_variables(self) -> dict[str, str]:
        """What the dialplan reads after the dialog, status last. The adapters hand these back
        packed into one variable (:meth:`packed`); the dialplan unpacks them in this order."""
        return {
            ID_VARIABLE: self.consent_id,
            RECORDING_ID_VARIABLE: self.recording_id or "",
            # Caller and agent legs as separate files too, for purposes that make training copies.
            RECORD_LEGS_VARIABLE: "1" if self.record_legs and self.recording_id else "",
            CONFIRMATION_VARIABLE: self.confirmation.media if self.confirmation else "",
            CALLER_RECORDS_VARIABLE: "1" if self.caller_records else "",
            PURPOSE_VARIABLE: self.purpose,
            PURPOSES_VARIABLE: ",".join(self.purposes or ([self.purpose] if self.recording_id else [])),
            STATUS_VARIABLE: str(self.status),
        }

    def packed(self) -> str:
        """The value of ``CONSENT_RESULT``: every result variable in one string, so handing the
        result back is one atomic step (one REST request in ARI mode instead of eight).
        ``[consent-gate-apply]`` unpacks it with ``CUT()`` in :data:`RESULT_FIELDS` order."""
        variables = self.channel_variables()
        for name in RESULT_FIELDS:
            if RESULT_SEPARATOR in variables[name]:
                raise ValueError(f"{name} contains the separator {RESULT_SEPARATOR!r}: {variables[name]!r}")
        return RESULT_SEPARATOR.join(variables[name] for name in RESULT_FIELDS)


@dataclass
class GateContext:
    """What every dialog shares: settings, prompts, ledger and the clock (injectable for tests)."""

    settings: Settings
    prompts: PromptSource
    ledger: Ledger
    clock: Callable[[], datetime] = utcnow

    def prompt(self, language: str, name: str) -> PromptRef:
        lang = language if language in self.prompts.languages else self.settings.default_language
        # The catalog falls back to English for a file missing in ``lang``: play that same file,
        # so the media Asterisk plays and the version stored as evidence are one and the same.
        lang = Path(str(self.prompts.path(lang, name))).parent.name
        return PromptRef(
            name=name,
            language=lang,
            media=f"{self.settings.asterisk_prompts_dir.rstrip('/')}/{lang}/{name}",
            version=self.prompts.version(lang, name),
        )


def pick_language(raw: str, available: object, default: str) -> str:
    """Channel language 'da', 'da_DK' or 'en_GB' → a shipped prompt language."""
    short = (raw or "").split("_")[0].split("-")[0].lower()
    return short if short in available else default  # type: ignore[operator]


async def run_consent_dialog(
    port: DialogPort, call: CallInfo, purpose: Purpose, gate: GateContext, state: DialogState | None = None
) -> DialogResult:
    state = state or DialogState()
    settings = gate.settings
    state.language = pick_language(call.language, gate.prompts.languages, settings.default_language)
    log_call = log.bind(call_id=call.call_id, consent_id=str(state.consent_id), purpose=purpose.name)

    if not purpose.asks_consent:
        # Legal obligation (e.g. MiFID II) or legitimate interest: inform, do not ask.
        notice = gate.prompt(state.language, purpose.prompt)
        state.prompt_version = notice.version
        state.enter(Phase.ASKING)
        state.prompt_started_at = gate.clock()
        try:
            await port.play(notice, stop_keys="")
            state.decision = Decision.NOTIFIED
        except CallerHungUp:
            state.decision = Decision.ABANDONED
        except Exception as error:
            state.decision = Decision.UNAVAILABLE
            state.failure = f"{type(error).__name__}: {error}"[:200]
        state.decided_at = gate.clock()
    elif gate.ledger.degraded and not settings.record_when_journaled:
        # The ledger cannot store a grant right now: asking would be a question we cannot honour.
        state.decision = Decision.UNAVAILABLE
    else:
        question = gate.prompt(state.language, purpose.prompt)
        state.prompt_version = question.version
        try:
            await _ask(port, question, gate, state, call, purpose)
        except CallerHungUp:
            state.decision = Decision.ABANDONED
            state.decided_at = gate.clock()
        except Exception as error:  # the adapter failed (ARI gone, AGI broken): fail closed, but say so
            state.decision = Decision.UNAVAILABLE
            state.decided_at = gate.clock()
            state.failure = f"{type(error).__name__}: {error}"[:200]
            log_call.warning("consent.dialog_port_failed", error=state.failure)
    state.enter(Phase.STORING)
    result = await asyncio.shield(_store(call, purpose, gate, state, port.source))
    state.enter(Phase.DONE)
    log_call.info("consent.decided", status=str(result.status), digit=state.digit,
                  durability=str(state.durability), attempts=state.attempt)
    return result


async def _ask(
    port: DialogPort, question: PromptRef, gate: GateContext, state: DialogState, call: CallInfo, purpose: Purpose
) -> None:
    keys = gate.settings.dialog
    questions_left = keys.repeats + 1
    free_replays = 3  # "I record this call too" re-asks without using up a repeat, a few times
    while questions_left > 0:
        questions_left -= 1
        state.attempt += 1
        state.enter(Phase.ASKING)
        if state.prompt_started_at is None:
            # Only a key pressed once this question has started counts for it (the ledger's
            # prompt hash is then evidence of what the caller heard before deciding).
            await port.discard_keys()
            state.prompt_started_at = gate.clock()
        key = await port.play(question, stop_keys=DTMF_STOP_KEYS)
        if key is None:
            key = await port.wait_key(keys.digit_timeout)
        if key is None:
            continue
        if key == keys.accept_key:
            state.decision, state.digit = Decision.GRANTED, key
        elif key == keys.decline_key:
            state.decision, state.digit = Decision.DECLINED, key
        elif key == keys.reciprocal_key:
            if not state.caller_records:
                state.caller_records = True
                await gate.ledger.append(event_for(
                    gate, call, purpose, EventKind.CALLER_RECORDS, consent_id=state.consent_id,
                    language=state.language, recording_id=None, source=port.source, digit=key,
                    prompt_version=state.prompt_version, detail={"when": "consent-menu"}))
            await port.play(gate.prompt(state.language, "caller-records-ack"), stop_keys="")
            if free_replays > 0:
                free_replays -= 1
                questions_left += 1
            continue
        else:
            state.invalid_keys.append(key)
            await port.play(gate.prompt(state.language, "invalid"), stop_keys="")
            continue
        state.decided_at = gate.clock()
        return
    state.decision = Decision.NO_INPUT
    state.decided_at = gate.clock()


def event_for(
    gate: GateContext, call: CallInfo, purpose: Purpose, kind: EventKind, *, consent_id: object,
    language: str, recording_id: str | None, source: str, prompt_version: str | None = None,
    digit: str | None = None, prompt_started_at: datetime | None = None, decided_at: datetime | None = None,
    detail: dict[str, object] | None = None,
) -> ConsentEvent:
    """One ledger event about this call; the caller is only ever stored as the keyed pseudonym
    (plus the raw number where the operator configured it)."""
    settings = gate.settings
    return ConsentEvent(
        consent_id=consent_id if isinstance(consent_id, uuid.UUID) else uuid.UUID(str(consent_id)),
        call_id=call.call_id[:64],
        event=kind,
        purpose=purpose.name,
        legal_basis=purpose.legal_basis,
        occurred_at=gate.clock(),
        source=source,
        language=language,
        prompt_version=prompt_version,
        digit=digit,
        caller_ref=caller_reference(settings.hmac_key, call.caller_number),
        caller_number=(call.caller_number[:64] or None) if settings.store_raw_number else None,
        recording_id=recording_id,
        prompt_started_at=prompt_started_at,
        decided_at=decided_at,
        detail=dict(detail or {}),
    )


async def _store(
    call: CallInfo, purpose: Purpose, gate: GateContext, state: DialogState, source: str
) -> DialogResult:
    """Write the decision; only a durably stored grant may record."""
    settings = gate.settings
    decision = state.decision or Decision.UNAVAILABLE
    if decision in (Decision.GRANTED, Decision.NOTIFIED) and (unsafe := recordings_dir_problem(settings)):
        log.error("consent.recordings_dir_not_private", call_id=call.call_id, problem=unsafe)  # fail closed
        decision, state.failure = Decision.UNAVAILABLE, unsafe
    wants_recording = decision in (Decision.GRANTED, Decision.NOTIFIED)
    recording_id = (state.planned_recording_id or new_recording_id()) if wants_recording else None

    def event(kind: EventKind, recording: str | None, **detail: object) -> ConsentEvent:
        return event_for(
            gate, call, purpose, kind, consent_id=state.consent_id, language=state.language,
            recording_id=recording, source=source, prompt_version=state.prompt_version, digit=state.digit,
            prompt_started_at=state.prompt_started_at, decided_at=state.decided_at,
            detail={"invalid_keys": state.invalid_keys, "attempts": state.attempt,
                    **({"failure": state.failure} if state.failure else {}), **detail},
        )

    if decision is Decision.NOTIFIED:
        # Recording by law: the journal is a durable record of the notice too.
        state.durability = await gate.ledger.append(event(EventKind.NOTIFIED, recording_id))
        if state.durability is Durability.LOST:
            decision, recording_id = Decision.UNAVAILABLE, None
    elif wants_recording and not settings.record_when_journaled:
        # A grant counts only once it is in the database; if it is not, nothing is recorded and
        # the journal gets the truth: the caller pressed the key, the gate was unavailable.
        grant = event(EventKind.GRANTED, recording_id)
        state.durability = await gate.ledger.append(grant, use_journal=False)
        if state.durability is not Durability.DATABASE:
            # The grant may be stored all the same (the primary lost after its standby had the
            # commit, only the reply lost).  The fallback takes the grant's event_id, so the
            # ledger keeps exactly one of them: the grant (nothing recorded, as when a caller
            # hangs up right after the key) or this.
            fallback = event(EventKind.UNAVAILABLE, None, reason="ledger-unavailable", pressed="granted")
            state.durability = await gate.ledger.append(replace(fallback, event_id=grant.event_id))
            decision, recording_id = Decision.UNAVAILABLE, None
    else:
        state.durability = await gate.ledger.append(event(EventKind(decision.value), recording_id))
        if wants_recording and state.durability is Durability.LOST:
            decision, recording_id = Decision.UNAVAILABLE, None
    state.decision, state.recording_id = decision, recording_id
    confirmation = None
    if decision is Decision.GRANTED:
        confirmation = gate.prompt(state.language, "granted")
    elif decision in (Decision.DECLINED, Decision.NO_INPUT) or (
        decision is Decision.UNAVAILABLE and state.prompt_started_at is not None
    ):
        confirmation = gate.prompt(state.language, "declined")
    return DialogResult(decision, str(state.consent_id), recording_id, confirmation,
                        record_legs=purpose.training_copy, caller_records=state.caller_records,
                        purpose=purpose.name)


# A call's combined status when it asked for several purposes: the most "recorded" one wins.
_STATUS_ORDER = (Decision.GRANTED, Decision.NOTIFIED, Decision.DECLINED, Decision.NO_INPUT,
                 Decision.UNAVAILABLE, Decision.ABANDONED)
MAX_PURPOSES = 4


def parse_purposes(argument: str, settings: Settings) -> list[Purpose] | None:
    """'training' or 'documentation+training' (granular consent: one question per purpose)."""
    names = argument.split("+")
    if not 1 <= len(names) <= MAX_PURPOSES or len(set(names)) != len(names):
        return None
    purposes = [settings.purpose(name) for name in names]
    return None if any(p is None for p in purposes) else purposes  # type: ignore[return-value]


async def run_gate(
    port: DialogPort, call: CallInfo, purposes: list[Purpose], gate: GateContext,
    first_state: DialogState | None = None,
) -> DialogResult:
    """Ask for each purpose in turn (each its own keypress; a "no" to one does not block another).
    One CONSENT_ID and one recording for the call; it is kept only for the purposes granted."""
    first_state = first_state or DialogState()
    if len(purposes) == 1:
        return await run_consent_dialog(port, call, purposes[0], gate, first_state)
    planned = new_recording_id()
    first_state.planned_recording_id = planned
    results: list[tuple[Purpose, DialogResult]] = []
    state = first_state
    for index, purpose in enumerate(purposes):
        if index:
            state = DialogState(consent_id=first_state.consent_id, planned_recording_id=planned,
                                caller_records=state.caller_records, on_phase=first_state.on_phase)
        result = await run_consent_dialog(port, call, purpose, gate, state)
        if result.status is Decision.ABANDONED:
            return result
        results.append((purpose, result))
    recorded = [p for p, r in results if r.recording_id]
    status = min((r.status for _, r in results), key=_STATUS_ORDER.index)
    asked_and_granted = any(r.status is Decision.GRANTED for _, r in results)
    confirmation = next((r.confirmation for _, r in results if r.status is Decision.GRANTED), None)
    if not asked_and_granted and status is not Decision.NOTIFIED:
        confirmation = next((r.confirmation for _, r in results if r.confirmation), None)
    return DialogResult(
        status, str(first_state.consent_id), planned if recorded else None, confirmation,
        record_legs=any(p.training_copy for p in recorded),
        caller_records=any(r.caller_records for _, r in results),
        purpose=(recorded or purposes)[0].name,
        purposes=[p.name for p in recorded],
    )

"""Mid-call rights, as policy: which key sequence means what, and what each one must cause.

After the consent dialog the call is bridged to an agent.  From then on:

* the caller withdraws consent (``*0``): recording stops at once, the partial files are deleted
  (withdrawn means gone), the caller hears a confirmation, the agent hears that recording
  stopped, the ledger gets ``withdrawn``;
* the caller says they record the call themselves (``*3``, or ``3`` in the consent menu): the
  agent is told, the caller hears an acknowledgement, the ledger gets ``caller-records``;
* the agent (optionally the caller) pauses the recording while card data is given (``*5`` /
  ``*6``, auto-resume after a limit): paused audio is silence, the ledger gets the span.

This module decides (:meth:`MidCallState.plan` returns a :class:`Plan` and changes nothing) and
carries the plan out through ports (:func:`execute_plan`, shared by the ARI service and the AGI
script): the state changes only after the plan's effect happened.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

import structlog

from consent_gate.config import DialogSettings, Purpose, Settings
from consent_gate.core.dialog import CallInfo, DialogResult, GateContext, event_for
from consent_gate.core.events import ConsentEvent, EventKind
from consent_gate.ledger.store import Durability
from consent_gate.prompts.catalog import PromptError
from consent_gate.recordings import delete_recording_files, recording_files

log = structlog.get_logger(__name__)


class Action(enum.Enum):
    WITHDRAW = "withdraw"
    CALLER_RECORDS = "caller-records"
    PAUSE = "pause"
    RESUME = "resume"


class Role(enum.Enum):
    CALLER = "caller"
    AGENT = "agent"


class CodeMatcher:
    """Turns one channel's keys into actions: a code counts when its keys come within
    ``code_timeout`` of each other (so ``*`` then, a minute later, ``0`` is not a withdrawal)."""

    def __init__(self, settings: DialogSettings) -> None:
        self._codes = {
            settings.withdraw_code: Action.WITHDRAW,
            settings.caller_records_code: Action.CALLER_RECORDS,
            settings.pause_code: Action.PAUSE,
            settings.resume_code: Action.RESUME,
        }
        self._timeout = settings.code_timeout
        self._keys: list[tuple[float, str]] = []

    def feed(self, key: str, at: float) -> Action | None:
        self._keys = [(t, k) for t, k in self._keys if at - t <= self._timeout][-3:] + [(at, key)]
        typed = "".join(k for _, k in self._keys)
        for code, action in self._codes.items():
            if typed.endswith(code):
                self._keys.clear()
                return action
        return None


@dataclass(frozen=True)
class Plan:
    """What one mid-call action must cause, in order: recording control, files, ledger, notices."""

    action: Action
    stop_recording: bool = False
    delete_recording: bool = False
    mute: bool | None = None  # True: mute MixMonitor, False: unmute, None: leave
    ledger_event: EventKind | None = None
    caller_notice: str | None = None  # prompt names
    agent_notice: str | None = None
    detail: dict[str, object] = field(default_factory=dict)


@dataclass
class MidCallState:
    """The consent state of one call after its dialog.  Changed only by :func:`execute_plan`,
    once the effect it describes happened."""

    call: CallInfo
    purpose: Purpose
    consent_id: str
    language: str
    recording_id: str | None
    caller_records: bool = False
    withdrawn: bool = False
    # False while a withdrawal could not stop the recorder (the files are gone all the same):
    # the next *0, and the adapter's own retries, try again.
    recorder_stopped: bool = True
    paused_at: datetime | None = None
    # The recording is also kept for a purpose the law requires (e.g. MiFID II, status
    # "notified"): a *0 withdraws the consent purposes in the ledger, the recording stays.
    kept_by_law: bool = False
    # The channel records (or may), but its recording id was unusable: a withdrawal or pause
    # still acts (and is logged without the id) rather than doing nothing.
    recording_unknown: bool = False

    @classmethod
    def after_dialog(cls, call: CallInfo, purpose: Purpose, result: DialogResult, language: str,
                     settings: Settings | None = None) -> MidCallState:
        """The state a call is in once the consent dialog has handed its result back."""
        kept_by_law = (cls.law_keeps(settings, purpose, result.purposes) if settings is not None
                       else not purpose.asks_consent)
        return cls(call=call, purpose=purpose, consent_id=result.consent_id, language=language,
                   recording_id=result.recording_id, caller_records=result.caller_records,
                   kept_by_law=kept_by_law and result.recording_id is not None)

    @property
    def recording(self) -> bool:
        return (self.recording_id is not None or self.recording_unknown) and (self.kept_by_law or not self.withdrawn)

    @staticmethod
    def law_keeps(settings: Settings, purpose: Purpose, purposes: list[str]) -> bool:
        """Whether a purpose the law requires (not consent-based) keeps this call's recording."""
        return not purpose.asks_consent or any(
            (p := settings.purpose(name)) is not None and not p.asks_consent for name in purposes)

    def agent_greeting(self) -> list[str]:
        """What an agent hears on joining the call (first agent and after a transfer)."""
        notices = [f"agent-recorded-{self.purpose.name}" if self.recording else "agent-not-recorded"]
        if self.caller_records:
            notices.append("agent-caller-records")
        return notices

    def agent_greeting_media(self, gate: GateContext) -> str:
        """The agent greeting as one Playback argument (files joined by ``&``), for the dialplan's
        pre-bridge routine ``[consent-gate-agent-notice]`` in AGI mode.  A notice without a
        prompt file (e.g. a purpose added without one) is left out, as the ARI service does:
        a notice must never cost the decision it describes."""
        media = []
        for name in self.agent_greeting():
            try:
                media.append(gate.prompt(self.language, name).media)
            except PromptError as error:
                log.warning("midcall.notice_missing", prompt=name, error=str(error))
        return "&".join(media)

    def plan(self, action: Action, role: Role, settings: DialogSettings, now: datetime) -> Plan | None:
        """What ``action`` must cause now; None: the keys mean nothing here (wrong role, nothing
        to stop...).  Pure: the state changes in :func:`execute_plan`, after the effect."""
        may_pause = role is Role.AGENT or settings.caller_may_pause
        match action, role:
            case Action.WITHDRAW, Role.CALLER if self.kept_by_law:
                if self.withdrawn:
                    return None
                # Nothing to stop or delete: the law requires this recording.  Logged, not announced
                # (the caller's "recording stopped and deleted" would not be true).
                return Plan(action, ledger_event=EventKind.WITHDRAWN, detail={"kept_by_law": True})
            case Action.WITHDRAW, Role.CALLER if self.recording:
                return Plan(action, stop_recording=True, delete_recording=True,
                            ledger_event=EventKind.WITHDRAWN, caller_notice="withdrawn",
                            agent_notice="agent-recording-stopped")
            case Action.WITHDRAW, Role.CALLER if self.withdrawn and not self.recorder_stopped:
                # The first withdrawal could not stop the recorder: try again (logged once).
                return Plan(action, stop_recording=True, delete_recording=True, detail={"retry": True})
            case Action.CALLER_RECORDS, Role.CALLER if not self.caller_records:
                return Plan(action, ledger_event=EventKind.CALLER_RECORDS, caller_notice="caller-records-ack",
                            agent_notice="agent-caller-records", detail={"when": "mid-call"})
            case Action.PAUSE, _ if self.recording and self.paused_at is None and may_pause:
                return Plan(action, mute=True, ledger_event=EventKind.PAUSED, agent_notice="paused",
                            detail={"by": role.value, "limit_s": settings.pause_limit})
            case Action.RESUME, _ if self.recording and self.paused_at is not None and may_pause:
                return self._resume(now, role.value)
        return None

    def auto_resume(self, now: datetime) -> Plan | None:
        if not (self.recording and self.paused_at is not None):
            return None
        return self._resume(now, "auto")

    def _resume(self, now: datetime, by: str) -> Plan:
        assert self.paused_at is not None
        started = self.paused_at
        return Plan(Action.RESUME, mute=False, ledger_event=EventKind.RESUMED, agent_notice="resumed",
                    detail={"by": by, "paused_from": started.isoformat(), "paused_s": (now - started).total_seconds()})

    def event(self, gate: GateContext, kind: EventKind, source: str, **detail: object) -> ConsentEvent:
        return event_for(gate, self.call, self.purpose, kind, consent_id=self.consent_id, language=self.language,
                         recording_id=self.recording_id, source=source, detail=detail)


# -- carrying a plan out ---------------------------------------------------------------------------

class RecordingControlError(RuntimeError):
    """The recorder could not be stopped, muted or blocked (AMI down, refused, no such recorder)."""


class RecordingControl(Protocol):
    """How an adapter acts on the call's MixMonitor (ARI service: AMI + ARI; AGI: dialplan apps)."""

    async def block(self) -> None:
        """Mark the channel withdrawn (``CONSENT_WITHDRAWN=1``), so the dialplan never starts or
        restarts MixMonitor for this call.  Raises RecordingControlError."""

    async def stop(self) -> None:
        """Stop this call's MixMonitor; a recorder that is not running counts as stopped.
        Raises RecordingControlError."""

    async def mute(self, muted: bool) -> None:
        """Mute (True) or unmute the recording.  Raises RecordingControlError."""


class Notices(Protocol):
    def to_caller(self, prompt_name: str) -> None:
        """Queue a notice to the caller (never delays the next key)."""

    def to_agents(self, prompt_name: str) -> None:
        """Queue a notice to every agent in the call (where the adapter can reach them)."""


class Ledger(Protocol):
    async def append(self, event: ConsentEvent) -> Durability: ...


# A withdrawal tries this often to stop the recorder before it reports "not stopped"; the AMI
# client reconnects between attempts.  The adapter keeps retrying in the background.
STOP_ATTEMPTS = 3
STOP_RETRY_DELAY = 0.2


def delete_files(recordings_dir: Path, recording_id: str | None) -> list[str]:
    """Withdrawn means gone: the mix and any legs (names from the validated id only).  Unlinking
    a file MixMonitor is still writing leaves nothing behind once it closes it."""
    if recording_id is None:
        return []
    try:
        return delete_recording_files(recording_files(recordings_dir, recording_id))
    except (ValueError, OSError) as error:
        log.error("midcall.delete_failed", recording_id=recording_id, error=str(error))
        return []


async def stop_with_retry(control: RecordingControl, attempts: int = STOP_ATTEMPTS,
                          delay: float = STOP_RETRY_DELAY) -> str | None:
    """Stop the recorder; None on success, else the last error."""
    error: str | None = None
    for attempt in range(attempts):
        try:
            await control.stop()
            return None
        except RecordingControlError as failure:
            error = str(failure)
            log.warning("midcall.stop_failed", attempt=attempt + 1, error=error)
        if attempt + 1 < attempts:
            await asyncio.sleep(delay)  # back-off before the next AMI attempt, not synchronisation
    return error


async def execute_plan(plan: Plan, state: MidCallState, *, control: RecordingControl, ledger: Ledger,
                       gate: GateContext, notices: Notices, source: str, now: datetime,
                       detail: dict[str, object] | None = None) -> bool:
    """Carry out one plan, effects first, then the state and the ledger that record them.
    Returns whether it acted (False: a mute that failed, so nothing changed).

    * withdraw: block the dialplan's MixMonitor, delete the files, stop the recorder (with
      retries), delete again (a recorder that opened its file late), then ``withdrawn`` is
      true and logged -- also when the recorder could not be stopped (the files are gone and
      the adapter retries the stop);
    * pause / resume: only a mute that happened is logged as a pause (or a resume);
    * caller records: logged, then noted.
    """
    settings = gate.settings
    extra = dict(detail or {})
    bound = log.bind(call_id=state.call.call_id, consent_id=state.consent_id, action=plan.action.value)
    if plan.action is Action.WITHDRAW and not plan.stop_recording:
        state.withdrawn = True  # the consent purposes; a recording the law requires goes on
        await ledger.append(state.event(gate, EventKind.WITHDRAWN, source, **plan.detail, **extra))
        return True
    if plan.action is Action.WITHDRAW:
        blocked = True
        try:
            await control.block()
        except RecordingControlError as error:
            blocked = False
            bound.warning("midcall.block_failed", error=str(error))
        deleted = delete_files(settings.recordings_dir, state.recording_id)
        stop_error = await stop_with_retry(control)
        deleted += delete_files(settings.recordings_dir, state.recording_id)
        first = not state.withdrawn
        state.withdrawn, state.paused_at = True, None
        state.recorder_stopped = stop_error is None
        if plan.ledger_event is not None and first:
            event_detail = dict(plan.detail, **extra, deleted_files=len(deleted), recorder_stopped=stop_error is None,
                                blocked=blocked)
            await ledger.append(state.event(gate, plan.ledger_event, source, **event_detail))
        if stop_error is not None:
            bound.error("midcall.withdrawal_recorder_running", error=stop_error, deleted_files=len(deleted))
        _notify(plan, notices)
        return True
    if plan.mute is not None:
        try:
            await control.mute(plan.mute)
        except RecordingControlError as error:
            # No pause was made (or the recording stays muted): nothing to log as done.
            bound.warning("midcall.mute_failed", mute=plan.mute, error=str(error))
            return False
        state.paused_at = now if plan.mute else None
    if plan.ledger_event is not None:
        await ledger.append(state.event(gate, plan.ledger_event, source, **plan.detail, **extra))
    if plan.action is Action.CALLER_RECORDS:
        state.caller_records = True
    _notify(plan, notices)
    return True


def _notify(plan: Plan, notices: Notices) -> None:
    if plan.caller_notice:
        notices.to_caller(plan.caller_notice)
    if plan.agent_notice:
        notices.to_agents(plan.agent_notice)

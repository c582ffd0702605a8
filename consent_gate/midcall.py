"""Mid-call rights, as policy: which key sequence means what, and what each one must cause.

After the consent dialog the call is bridged to an agent.  From then on:

* the caller withdraws consent (``*0``): recording stops at once, the partial files are deleted
  (withdrawn means gone), the caller hears a confirmation, the agent hears that recording
  stopped, the ledger gets ``withdrawn``;
* the caller says they record the call themselves (``*3``, or ``3`` in the consent menu): the
  agent is told, the caller hears an acknowledgement, the ledger gets ``caller-records``;
* the agent (optionally the caller) pauses the recording while card data is given (``*5`` /
  ``*6``, auto-resume after a limit): paused audio is silence, the ledger gets the span.

This module decides; the adapters (ARI: ``ari_app/midcall.py``) carry out the :class:`Plan`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from .config import DialogSettings, Purpose
from .dialog import CallInfo, DialogResult, GateContext, event_for
from .events import ConsentEvent, EventKind
from .prompts import PromptError

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
    """The consent state of one call after its dialog."""

    call: CallInfo
    purpose: Purpose
    consent_id: str
    language: str
    recording_id: str | None
    caller_records: bool = False
    withdrawn: bool = False
    paused_at: datetime | None = None

    @classmethod
    def after_dialog(cls, call: CallInfo, purpose: Purpose, result: DialogResult, language: str) -> MidCallState:
        """The state a call is in once the consent dialog has handed its result back."""
        return cls(call=call, purpose=purpose, consent_id=result.consent_id, language=language,
                   recording_id=result.recording_id, caller_records=result.caller_records)

    @property
    def recording(self) -> bool:
        return self.recording_id is not None and not self.withdrawn

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
        """None: the key sequence means nothing here (wrong role, nothing to stop...)."""
        match action, role:
            case Action.WITHDRAW, Role.CALLER if self.recording:
                self.withdrawn = True
                self.paused_at = None
                return Plan(action, stop_recording=True, delete_recording=True,
                            ledger_event=EventKind.WITHDRAWN, caller_notice="withdrawn",
                            agent_notice="agent-recording-stopped")
            case Action.CALLER_RECORDS, Role.CALLER if not self.caller_records:
                self.caller_records = True
                return Plan(action, ledger_event=EventKind.CALLER_RECORDS, caller_notice="caller-records-ack",
                            agent_notice="agent-caller-records", detail={"when": "mid-call"})
            case Action.PAUSE, _ if self.recording and self.paused_at is None and (
                role is Role.AGENT or settings.caller_may_pause
            ):
                self.paused_at = now
                return Plan(action, mute=True, ledger_event=EventKind.PAUSED, agent_notice="paused",
                            detail={"by": role.value, "limit_s": settings.pause_limit})
            case Action.RESUME, _ if self.recording and self.paused_at is not None and (
                role is Role.AGENT or settings.caller_may_pause
            ):
                return self._resume(now, role.value)
        return None

    def auto_resume(self, now: datetime) -> Plan | None:
        if not (self.recording and self.paused_at is not None):
            return None
        return self._resume(now, "auto")

    def _resume(self, now: datetime, by: str) -> Plan:
        assert self.paused_at is not None
        started, self.paused_at = self.paused_at, None
        return Plan(Action.RESUME, mute=False, ledger_event=EventKind.RESUMED, agent_notice="resumed",
                    detail={"by": by, "paused_from": started.isoformat(), "paused_s": (now - started).total_seconds()})

    def event(self, gate: GateContext, kind: EventKind, source: str, **detail: object) -> ConsentEvent:
        return event_for(gate, self.call, self.purpose, kind, consent_id=self.consent_id, language=self.language,
                         recording_id=self.recording_id, source=source, detail=detail)

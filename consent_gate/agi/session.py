"""The AGI side of consent-gate, whatever carries the AGI protocol.

Two transports share everything here: the process-per-call script (``consent_gate.agi.script``,
pyst2 over stdin/stdout) and the FastAGI server (``consent_gate.agi.fastagi``, asyncio over TCP
on loopback).  Each hands this module an :class:`AgiCommands` -- the handful of AGI commands the
gate uses, as coroutines that raise :class:`~consent_gate.core.dialog.CallerHungUp` when the
channel is gone -- and this module runs the dialog (``consent_gate.core.dialog.run_gate``) and
the mid-call codes (``consent_gate.core.midcall.execute_plan``) over it: the same core the ARI
service runs.  Everything read from the channel (the AGI environment, every ``CONSENT_*``
variable) is checked here before use.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Protocol

import structlog

from consent_gate.config import Purpose, Settings
from consent_gate.contract import (
    AGENT_NOTICE_VARIABLE,
    CALLER_RECORDS_VARIABLE,
    CHANNEL_STATUSES,
    CONTROL_CHARACTERS,
    ID_VARIABLE,
    MIXMONITOR_ID_VARIABLE,
    PAUSED_AT_VARIABLE,
    PURPOSE_VARIABLE,
    PURPOSES_VARIABLE,
    RECORD_LEGS_VARIABLE,
    RECORDING_FILE_SUFFIXES,
    RECORDING_ID_VARIABLE,
    RECORDING_STATUSES,
    STATUS_VARIABLE,
    WITHDRAWN_VARIABLE,
    valid_consent_id,
    valid_purpose_name,
    valid_recording_id,
    valid_status,
    valid_time,
)
from consent_gate.core.dialog import (
    MAX_PURPOSES,
    RESULT_VARIABLE,
    CallerHungUp,
    CallInfo,
    DialogResult,
    DialogState,
    GateContext,
    PromptRef,
    parse_purposes,
    pick_language,
    run_gate,
)
from consent_gate.core.events import Decision, EventKind, utcnow
from consent_gate.core.midcall import (
    Action,
    CodeMatcher,
    MidCallState,
    RecordingControlError,
    Role,
    delete_files,
    execute_plan,
)
from consent_gate.ledger.journal import Journal
from consent_gate.ledger.store import Ledger
from consent_gate.prompts.catalog import PromptCatalog
from consent_gate.recordings import recordings_dir_problem

log = structlog.get_logger(__name__)
# discard_keys: WAIT FOR DIGIT 0 reads nothing (Asterisk's wait loop runs only while time is
# left), so each round waits a few ms for a key that is already queued; bounded.
DISCARD_WAIT_MS = 10
MAX_DISCARDED_KEYS = 32
LISTEN_WAIT_MS = 50  # one round of AgiPort.listen: how long a stop waits at most


class AgiCommands(Protocol):
    """The AGI commands the gate sends, as one transport carries them.  Each raises
    :class:`CallerHungUp` when Asterisk reports the channel gone (``result=-1``, ``HANGUP``,
    ``511``, the end of its input); the semantics are pyst2's, so both transports behave alike."""

    @property
    def env(self) -> dict[str, str]:
        """The checked AGI environment (:func:`read_agi_environment`)."""

    async def answer(self) -> None: ...
    async def stream_file(self, media: str, escape_digits: str) -> str:
        """The key that stopped the file, or ''."""
    async def wait_for_digit(self, timeout_ms: int) -> str:
        """The key, or '' after ``timeout_ms``."""
    async def set_variable(self, name: str, value: str) -> None: ...
    async def get_variable(self, name: str) -> str:
        """The value, '' when unset."""
    async def appexec(self, application: str, options: str) -> str:
        """EXEC; the application's result.  ``-2`` (no such application) counts as a failure."""


@dataclass
class AgiPort:
    """DialogPort over one AGI session.

    res_agi reads and drops every frame while the script is between commands, so a key pressed
    while the dialog stores the decision would be lost -- a ``*0`` right after ``1`` too.  After
    each key the port therefore keeps listening (WAIT FOR DIGIT in a worker thread) until the
    next command, and keeps what it heard in :attr:`heard`.
    """

    agi: AgiCommands
    source: str = "agi"
    heard: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, key)
    _listener: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    _stop: bool = field(default=False, init=False, repr=False)

    async def _call(self, func: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """One command, after the listening (if any) has stopped: AGI is one command at a time."""
        await self.stop_listening()
        return await func(*args)

    def listen(self) -> None:
        """Hear keys until the next command (each round is one short WAIT FOR DIGIT)."""
        if self._listener is None:
            self._stop = False
            self._listener = asyncio.create_task(self._listen(), name="agi-listen")

    async def _listen(self) -> None:
        while not self._stop:
            try:
                key = await self.agi.wait_for_digit(LISTEN_WAIT_MS)
            except Exception as error:  # noqa: BLE001 -- the next command reports a hangup; listening never breaks the dialog
                log.info("consent.listen_ended", error=type(error).__name__)
                return
            if key:
                self.heard.append((time.monotonic(), key))

    async def stop_listening(self) -> None:
        """Stop listening; returns once the WAIT FOR DIGIT in flight has its reply."""
        task, self._listener = self._listener, None
        if task is not None:
            self._stop = True
            await task

    async def play(self, prompt: PromptRef, *, stop_keys: str) -> str | None:
        key = await self._call(self.agi.stream_file, prompt.media, stop_keys)
        if key:
            self.listen()
        return key or None

    async def wait_key(self, timeout: float) -> str | None:
        key = await self._call(self.agi.wait_for_digit, max(1, int(timeout * 1000)))
        if key:
            self.listen()
        return key or None

    async def discard_keys(self) -> None:
        """Drop keys already queued on the channel or heard since the last answer, so a key
        pressed before a question was heard cannot answer it."""
        await self.stop_listening()
        self.heard.clear()
        for _ in range(MAX_DISCARDED_KEYS):
            if not await self._call(self.agi.wait_for_digit, DISCARD_WAIT_MS):
                return
        log.warning("consent.keys_still_queued", discarded=MAX_DISCARDED_KEYS)

    async def set_result(self, result: DialogResult) -> None:
        await self._call(self.agi.set_variable, RESULT_VARIABLE, result.packed())

    async def set_agent_notice(self, media: str) -> None:
        """What Dial's U(consent-gate-agent-notice) plays to each agent that answers. Inherited
        (``__``), so Dial copies it to every agent leg, also after a transfer."""
        await self._call(self.agi.set_variable, f"__{AGENT_NOTICE_VARIABLE}", media)


# -- what Asterisk hands the script: validated before any use --------------------------------

class AgiInputError(ValueError):
    """The AGI environment or a channel variable failed validation (the message names the key,
    never the value: the value may be the caller's)."""


# The environment res_agi writes (Asterisk 22), each key once, then agi_arg_1..n.  A caller
# name with a line break in it would add or repeat keys, or end the environment early and turn
# the rest into forged command replies: anything unexpected refuses the whole session.
AGI_ENVIRONMENT_KEYS = frozenset((
    "agi_request", "agi_channel", "agi_language", "agi_type", "agi_uniqueid", "agi_version",
    "agi_callerid", "agi_calleridname", "agi_callingpres", "agi_callingani2", "agi_callington",
    "agi_callingtns", "agi_dnid", "agi_rdnis", "agi_context", "agi_extension", "agi_priority",
    "agi_enhanced", "agi_accountcode", "agi_threadid",
))
# FastAGI (AGI(agi://host:port/script,...)) writes these two first, then the same environment.
NETWORK_ENVIRONMENT_KEYS = frozenset(("agi_network", "agi_network_script"))
MAX_ENVIRONMENT_LINES = 64
# Asterisk writes nothing between the environment and the reply to the first command: input
# already waiting there means the environment ended early (a blank line in caller data) and
# what follows are forged replies.  Both transports wait this long for such input.
EARLY_INPUT_GRACE_S = 0.02
MAX_ENVIRONMENT_LINE = 4096
_ENVIRONMENT_LINE = re.compile(r"(agi_[a-z0-9_]{1,40}): ?(.*)", re.DOTALL)
_ARGUMENT_KEY = re.compile(r"agi_arg_([1-9][0-9]?)")
# C0, DEL and C1 controls; a raw "\r" reaches here too (stdin is read with newline="\n").
# Asterisk's uniqueid: "<epoch>.<sequence>", prefixed "<systemname>-" when systemname is set.
_UNIQUEID = re.compile(r"(?:[A-Za-z0-9_.-]{1,40}-)?[0-9]{1,20}\.[0-9]{1,10}")


def read_agi_environment(stream: IO[str], argument: str | None, *, network_script: str | None = None
                         ) -> dict[str, str]:
    """Read and check the AGI environment (up to its blank line) from ``stream``.

    ``argument``: the script's own argument, which ``agi_arg_1`` must repeat; None (FastAGI,
    where the environment is the only source of the argument): exactly one argument, and it
    must be a purpose list or a mid-call code.  ``network_script``: a FastAGI session, whose
    ``agi_network: yes`` and ``agi_network_script`` (the URL's path) must be there and match.
    """
    allowed = AGI_ENVIRONMENT_KEYS | NETWORK_ENVIRONMENT_KEYS if network_script is not None else AGI_ENVIRONMENT_KEYS
    env: dict[str, str] = {}
    for number in range(1, MAX_ENVIRONMENT_LINES + 1):
        raw = stream.readline(MAX_ENVIRONMENT_LINE + 1)
        if not raw.endswith("\n"):
            raise AgiInputError(f"AGI environment line {number}: "
                                + ("too long" if raw else "input ended before the blank line"))
        line = raw[:-1]
        if line == "":
            break
        match = _ENVIRONMENT_LINE.fullmatch(line)
        if match is None:
            raise AgiInputError(f"AGI environment line {number}: not 'agi_<name>: <value>'")
        key, value = match[1], match[2]
        if key not in allowed and not _ARGUMENT_KEY.fullmatch(key):
            raise AgiInputError(f"AGI environment line {number}: unexpected key {key}")
        if key in env:
            raise AgiInputError(f"AGI environment line {number}: {key} given twice")
        if CONTROL_CHARACTERS.search(value):
            raise AgiInputError(f"AGI environment line {number}: {key} contains a control character")
        env[key] = value
    else:
        raise AgiInputError(f"AGI environment: more than {MAX_ENVIRONMENT_LINES} lines")
    missing = sorted(AGI_ENVIRONMENT_KEYS - env.keys())
    if missing:
        raise AgiInputError(f"AGI environment: {', '.join(missing)} missing")
    arguments = sorted(int(m[1]) for key in env if (m := _ARGUMENT_KEY.fullmatch(key)))
    if argument is None:
        if arguments != [1] or not valid_gate_argument(env["agi_arg_1"]):
            raise AgiInputError("AGI environment: not exactly one argument, a purpose list or a mid-call code")
    elif arguments != list(range(1, len(arguments) + 1)) or env.get("agi_arg_1") != argument:
        raise AgiInputError("AGI environment: agi_arg_1.. do not match the script's arguments")
    if network_script is not None and (env.get("agi_network") != "yes"
                                       or env.get("agi_network_script") != network_script):
        raise AgiInputError(f"AGI environment: not a FastAGI request for /{network_script}")
    if not _UNIQUEID.fullmatch(env["agi_uniqueid"]) or len(env["agi_uniqueid"]) > 64:
        raise AgiInputError("AGI environment: agi_uniqueid is not an Asterisk uniqueid")
    return env


def valid_gate_argument(argument: str) -> bool:
    """What [consent-gate-agi] and the mid-call routines pass: purpose names joined by "+" (as
    [consent-gate-reset] checked them), or midcall-<action>-<caller|agent>."""
    if parse_midcall(argument) is not None:
        return True
    names = argument.split("+")
    return 1 <= len(names) <= MAX_PURPOSES and all(valid_purpose_name(name) for name in names)


def call_info(env: dict[str, str]) -> CallInfo:
    """The call as the environment (checked by :func:`read_agi_environment`) describes it."""
    number = env.get("agi_callerid", "")
    return CallInfo(call_id=env["agi_uniqueid"], caller_number="" if number == "unknown" else number[:64],
                    language=env.get("agi_language", "")[:32])


# Where a session's ledger comes from: the script starts one per call (its process lives for
# one call), the FastAGI server hands every session its one pool for the server's lifetime.
LedgerSource = Callable[[], AbstractAsyncContextManager[Ledger]]


def ledger_per_call(settings: Settings) -> LedgerSource:
    @contextlib.asynccontextmanager
    async def open_ledger() -> AsyncIterator[Ledger]:
        ledger = Ledger(settings.database_dsn, Journal(settings.journal_dir),
                        write_timeout=settings.ledger_write_timeout)
        await ledger.start()
        try:
            yield ledger
        finally:
            await ledger.close()

    return open_ledger


def shared_ledger(ledger: Ledger) -> LedgerSource:
    @contextlib.asynccontextmanager
    async def lend() -> AsyncIterator[Ledger]:
        yield ledger

    return lend


@dataclass(frozen=True)
class AgiRuntime:
    """What a session needs besides its channel: the settings, the prompts, the ledger."""

    settings: Settings
    catalog: Callable[[], PromptCatalog]
    ledger: LedgerSource


async def run_session(runtime: AgiRuntime, agi: AgiCommands, argument: str) -> None:
    """One AGI session: the gate's dialog, or a mid-call code (``midcall-...``)."""
    midcall = parse_midcall(argument)
    if midcall is not None:
        await run_midcall(runtime, agi, *midcall)
    else:
        await run_agi(runtime, agi, argument)


async def run_agi(runtime: AgiRuntime, agi: AgiCommands, purpose_name: str) -> Decision | None:
    settings = runtime.settings
    port = AgiPort(agi)
    purposes = parse_purposes(purpose_name, settings)
    if not purposes:
        log.warning("consent.unknown_purpose")
        return None  # CONSENT_STATUS stays "unavailable" (set by the dialplan before AGI)
    call = call_info(agi.env)
    structlog.contextvars.bind_contextvars(call_id=call.call_id)
    catalog = runtime.catalog()
    async with runtime.ledger() as ledger:
        return await _run_gate(port, call, purposes, GateContext(settings, catalog, ledger))


async def _run_gate(port: AgiPort, call: CallInfo, purposes: list[Purpose], gate: GateContext) -> Decision:
    settings, ledger, agi = gate.settings, gate.ledger, port.agi
    try:
        await port._call(agi.answer)
        state = DialogState()
        result = await run_gate(port, call, purposes, gate, state)
        await port.stop_listening()
        if result.status is not Decision.ABANDONED:
            primary = next((p for p in purposes if p.name == result.purpose), purposes[0])
            after = MidCallState.after_dialog(call, primary, result, state.language, settings)
            early = (after.plan(Action.WITHDRAW, Role.CALLER, settings.dialog, utcnow())
                     if heard_withdrawal(port.heard, settings) else None)
            if early is not None and early.stop_recording:
                # Withdrawn while the grant was being stored: blocked before MixMonitor
                # ([consent-gate-apply] honours CONSENT_WITHDRAWN), and the confirmation the
                # caller hears is the withdrawal's.
                await port._call(agi.set_variable, WITHDRAWN_VARIABLE, "1")
                after.withdrawn = True  # blocked: the agent greeting says "not recorded"
                if early.caller_notice:
                    result = dataclasses.replace(result, confirmation=gate.prompt(state.language, early.caller_notice))
            await port.set_result(result)
            if early is not None:
                await ledger.append(after.event(gate, EventKind.WITHDRAWN, "agi", deleted_files=0,
                                                when="before-recording", **early.detail))
            await port.set_agent_notice(after.agent_greeting_media(gate))
        return result.status
    except CallerHungUp:
        return Decision.ABANDONED
    finally:
        await port.stop_listening()


def heard_withdrawal(heard: list[tuple[float, str]], settings: Settings) -> bool:
    """Did the keys heard after the last answer (see :class:`AgiPort`) form the withdrawal code?"""
    matcher = CodeMatcher(settings.dialog)
    return any(matcher.feed(key, at) is Action.WITHDRAW for at, key in heard)


MIDCALL_ACTIONS = {action.value: action for action in Action}


def parse_midcall(argument: str) -> tuple[Action, Role] | None:
    """'midcall-<action>-<caller|agent>', as the shipped [consent-gate-withdraw] etc. pass it."""
    if not argument.startswith("midcall-"):
        return None
    body, _, role = argument.removeprefix("midcall-").rpartition("-")
    if body not in MIDCALL_ACTIONS or role not in ("caller", "agent"):
        return None
    return MIDCALL_ACTIONS[body], Role(role)


# -- the call's consent state, read back from its channel variables ---------------------------

NOT_RECORDING_STATUSES = CHANNEL_STATUSES - RECORDING_STATUSES


def recording_id_from_mixmonitor(value: str, recordings_dir: Path) -> str | None:
    """MIXMONITOR_FILENAME (set by MixMonitor) names ``<recordings dir>/<32 hex>.wav``: the id
    of the running recording, when CONSENT_RECORDING_ID is unusable."""
    path = Path(value)
    if path.parent != recordings_dir or not path.name.endswith(".wav"):
        return None
    return valid_recording_id(path.name.removesuffix(".wav"))


@dataclass(frozen=True)
class ChannelConsent:
    """The CONSENT_* variables of the caller's channel, each checked; None where unusable."""

    purpose: Purpose | None
    consent_id: str | None
    status: str | None
    recording_id: str | None  # valid (from CONSENT_RECORDING_ID or MixMonitor's file name)
    recording_id_invalid: bool  # the channel records (or may), but CONSENT_RECORDING_ID is unusable
    record_legs: bool
    caller_records: bool
    withdrawn: bool
    paused_at: datetime | None
    mixmonitor_id: str | None

    @property
    def may_be_recording(self) -> bool:
        """Unknown status counts as recording: a withdrawal or pause must act rather than not."""
        return self.status not in NOT_RECORDING_STATUSES


async def read_channel_consent(port: AgiPort, settings: Settings) -> ChannelConsent:
    async def var(name: str) -> str:
        return str(await port._call(port.agi.get_variable, name) or "")

    def refused(name: str, why: str = "malformed") -> None:
        log.warning("consent.channel_variable_refused", variable=name, reason=why)

    raw_purpose = await var(PURPOSE_VARIABLE)
    purpose = settings.purpose(raw_purpose) if valid_purpose_name(raw_purpose) else None
    if purpose is None and raw_purpose:
        refused(PURPOSE_VARIABLE)
    raw_id = await var(ID_VARIABLE)
    consent_id = valid_consent_id(raw_id)
    if consent_id is None and raw_id:
        refused(ID_VARIABLE)
    raw_status = await var(STATUS_VARIABLE)
    status = valid_status(raw_status)
    if status is None:
        refused(STATUS_VARIABLE)
    recording_id, recording_id_invalid = None, False
    if status is None or status in RECORDING_STATUSES:
        recording_id = valid_recording_id(await var(RECORDING_ID_VARIABLE))
        if recording_id is None:
            refused(RECORDING_ID_VARIABLE)
            recording_id_invalid = True
            recording_id = recording_id_from_mixmonitor(await var("MIXMONITOR_FILENAME"), settings.recordings_dir)
    withdrawn_flag = await var(WITHDRAWN_VARIABLE)
    if withdrawn_flag not in ("", "1"):
        refused(WITHDRAWN_VARIABLE, "neither empty nor 1: taken as withdrawn")
    raw_paused_at = await var(PAUSED_AT_VARIABLE)
    paused_at = valid_time(raw_paused_at) if raw_paused_at else None
    if raw_paused_at and paused_at is None:
        refused(PAUSED_AT_VARIABLE, "not an ISO time with a time zone: taken as not paused")
    raw_mixmonitor = await var(MIXMONITOR_ID_VARIABLE)
    mixmonitor_id = valid_consent_id(raw_mixmonitor)  # MixMonitor's i() ids are UUIDs too
    if mixmonitor_id is None and raw_mixmonitor:
        refused(MIXMONITOR_ID_VARIABLE)
    return ChannelConsent(
        purpose=purpose, consent_id=consent_id, status=status, recording_id=recording_id,
        recording_id_invalid=recording_id_invalid,
        record_legs=await var(RECORD_LEGS_VARIABLE) == "1",
        caller_records=await var(CALLER_RECORDS_VARIABLE) == "1",
        withdrawn=withdrawn_flag != "", paused_at=paused_at, mixmonitor_id=mixmonitor_id,
    )


# -- mid-call codes ---------------------------------------------------------------------------

@dataclass
class _Steps:
    """Runs the AGI steps of one plan: a failed step is logged and reported, never raised, so
    the steps that do not need the channel (files, ledger) still happen."""

    port: AgiPort
    hung_up: bool = False

    async def run(self, what: str, step: Callable[[], Awaitable[Any]]) -> bool:
        if self.hung_up:
            return False
        try:
            await step()
            return True
        except CallerHungUp:
            self.hung_up = True
            log.warning("consent.midcall_step_failed", step=what, reason="channel gone or command refused")
        except Exception as error:  # noqa: BLE001 -- an AGI error must not cost the ledger or the file deletion
            log.error("consent.midcall_step_failed", step=what, error=f"{type(error).__name__}: {error}"[:200])
        return False

    async def set(self, name: str, value: str) -> bool:
        return await self.run(f"set {name}", lambda: self.port._call(self.port.agi.set_variable, name, value))

    async def app(self, name: str, arguments: str) -> bool:
        return await self.run(name, lambda: self.port._call(self.port.agi.appexec, name, arguments))


async def run_midcall(runtime: AgiRuntime, agi: AgiCommands, action: Action, role: Role) -> bool:
    """A mid-call code in AGI mode (features.conf applicationmap → Gosub → here), on the caller's
    channel.  The state of the call lives in its channel variables, each validated here; the
    plan is carried out by the executor the ARI service uses too
    (:func:`consent_gate.core.midcall.execute_plan`).  Returns True if it acted."""
    settings = runtime.settings
    port = AgiPort(agi)
    steps = _Steps(port)
    channel = await read_channel_consent(port, settings)
    withdrawing = action is Action.WITHDRAW and role is Role.CALLER
    if channel.purpose is None or channel.consent_id is None:
        if withdrawing and channel.may_be_recording and not channel.withdrawn:
            # Nothing to log the withdrawal under: still block, stop and delete what we can name.
            await steps.set(WITHDRAWN_VARIABLE, "1")
            deleted = delete_files(settings.recordings_dir, channel.recording_id)
            await steps.app("StopMixMonitor", channel.mixmonitor_id or "")
            deleted += delete_files(settings.recordings_dir, channel.recording_id)
            log.error("consent.withdrawal_not_logged", reason="CONSENT_PURPOSE or CONSENT_ID unusable",
                      deleted_files=len(deleted))
            return True
        return False
    call = call_info(agi.env)
    structlog.contextvars.bind_contextvars(call_id=call.call_id)
    catalog = runtime.catalog()
    purposes = [name for name in str(await port._call(agi.get_variable, PURPOSES_VARIABLE) or "").split(",")
                if valid_purpose_name(name)]
    state = MidCallState(
        call=call, purpose=channel.purpose, consent_id=channel.consent_id,
        language=pick_language(call.language, catalog.languages, settings.default_language),
        recording_id=channel.recording_id, caller_records=channel.caller_records,
        withdrawn=channel.withdrawn, paused_at=channel.paused_at,
        kept_by_law=channel.may_be_recording and MidCallState.law_keeps(settings, channel.purpose, purposes),
        recording_unknown=channel.recording_id is None and channel.recording_id_invalid,
    )
    plan = state.plan(action, role, settings.dialog, utcnow())
    if plan is None:
        log.info("consent.midcall_ignored", action=action.value, role=role.value)
        return False
    async with runtime.ledger() as ledger:
        gate = GateContext(settings, catalog, ledger)
        notices = CallerNotices()
        acted = await execute_plan(
            plan, state, control=AgiRecordingControl(settings, steps, channel), ledger=ledger, gate=gate,
            notices=notices, source="agi", now=utcnow(),
            detail={"recording_id_invalid": True} if channel.recording_id_invalid else None)
        if not acted:
            return False
        # The channel variables: the state as it now is (a later routine reads them back).
        for name, value in ((CALLER_RECORDS_VARIABLE, "1" if state.caller_records else ""),
                            (PAUSED_AT_VARIABLE, state.paused_at.isoformat() if state.paused_at else "")):
            await steps.set(name, value)
        # A later agent (transfer) hears the greeting as it is now.
        await steps.set(f"__{AGENT_NOTICE_VARIABLE}", state.agent_greeting_media(gate))
        # The routine runs on the caller's channel: only the caller's notice can be played here
        # (mid-call agent notices need the ARI service's whispers).
        for name in notices.caller if role is Role.CALLER else []:
            prompt = gate.prompt(state.language, name)
            await steps.run("notice", lambda: steps.port.play(prompt, stop_keys=""))
        return True


@dataclass
class CallerNotices:
    """The executor's notices in AGI mode: the caller's are played after the plan; an agent
    cannot be reached from a routine on the caller's channel."""

    caller: list[str] = field(default_factory=list)

    def to_caller(self, prompt_name: str) -> None:
        self.caller.append(prompt_name)

    def to_agents(self, prompt_name: str) -> None:
        log.info("consent.agent_notice_not_in_agi_mode", prompt=prompt_name)


@dataclass
class AgiRecordingControl:
    """The call's MixMonitor through dialplan applications.  Dialplan has no "mute MixMonitor":
    a pause stops it, a resume appends to the same files (unless withdrawn meanwhile)."""

    settings: Settings
    steps: _Steps
    channel: ChannelConsent

    async def block(self) -> None:
        if not await self.steps.set(WITHDRAWN_VARIABLE, "1"):
            raise RecordingControlError(f"could not set {WITHDRAWN_VARIABLE}")

    async def stop(self) -> None:
        if not await self.steps.app("StopMixMonitor", self.channel.mixmonitor_id or ""):
            raise RecordingControlError("StopMixMonitor failed")

    async def mute(self, muted: bool) -> None:
        if muted:
            await self.stop()
        elif not await _resume_recording(self.settings, self.steps, self.channel, self.channel.recording_id):
            raise RecordingControlError("MixMonitor could not be restarted")


async def _resume_recording(settings: Settings, steps: _Steps, channel: ChannelConsent, file_id: str | None) -> bool:
    """Restart MixMonitor on the same files, unless the call was withdrawn meanwhile."""
    withdrawn: list[str] = []

    async def read_withdrawn() -> None:
        withdrawn.append(str(await steps.port._call(steps.port.agi.get_variable, WITHDRAWN_VARIABLE) or ""))

    if not await steps.run("check withdrawn", read_withdrawn) or withdrawn[0] != "":
        log.warning("consent.resume_refused", reason="withdrawn or unreadable")
        return False
    if file_id is None:
        log.warning("consent.resume_refused", reason="no usable recording id")
        return False
    if (unsafe := recordings_dir_problem(settings)) is not None:
        # The server checked the directory when it started; a resume may come hours later.
        log.error("consent.resume_refused", reason=unsafe)
        return False
    mix, caller_leg, agent_leg = (settings.recordings_dir / f"{file_id}{suffix}" for suffix in RECORDING_FILE_SUFFIXES)
    # b: only while bridged (a resume comes from features.conf, in a bridge; after a transfer
    # the wait for the next agent is not recorded).
    options = f"r({caller_leg})t({agent_leg})ab" if channel.record_legs else "ab"
    return await steps.app("MixMonitor", f"{mix},{options}i({MIXMONITOR_ID_VARIABLE})")

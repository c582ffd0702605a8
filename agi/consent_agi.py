"""consent-gate-agi: the consent dialog as a classic AGI script (pyst2 ``asterisk.agi``).

    exten => _X.,1,Gosub(consent-gate-agi,s,1(training))

The dialog itself is ``consent_gate.dialog`` — the same code the ARI service runs; this file
only translates it to AGI commands (STREAM FILE with escape digits, WAIT FOR DIGIT, SET
VARIABLE).  One process per call: pyst2 is blocking, so each AGI command runs in a worker
thread while the event loop keeps the ledger's connection alive.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import structlog

from consent_gate.config import ConfigError, Settings, load_settings
from consent_gate.dialog import (
    CallerHungUp,
    CallInfo,
    DialogResult,
    RESULT_VARIABLE,
    DialogState,
    GateContext,
    PromptRef,
    parse_purposes,
    run_gate,
)
from consent_gate.dialog import pick_language
from consent_gate.events import Decision, utcnow
from consent_gate.midcall import Action, MidCallState, Role
from consent_gate.journal import Journal
from consent_gate.ledger import Ledger
from consent_gate.logging import configure_logging
from consent_gate.prompts import PromptCatalog, PromptError
from consent_gate.recordings import check_private_dir
from consent_gate.retention import RECORDING_FILE_SUFFIXES, delete_recording_files, recording_files

log = structlog.get_logger(__name__)
# Read by the dialplan's [consent-gate-agent-notice] (Dial U() pre-bridge routine, AGI mode).
AGENT_NOTICE_VARIABLE = "CONSENT_AGENT_NOTICE"


def _agi_errors() -> tuple[type[BaseException], ...]:
    from asterisk.agi import AGIAppError, AGIHangup, AGIUnknownError

    # pyst2 raises AGIAppError (not an AGIHangup) for "result=-1", which is how Asterisk
    # reports a hangup during STREAM FILE / WAIT FOR DIGIT, and AGIUnknownError for
    # "511 Command Not Permitted on a dead channel".  For the bare "HANGUP" line Asterisk
    # writes when the channel goes away, and for the end of its input (Asterisk closed the
    # pipe), pyst2 fails to parse a result code and raises ValueError.  All mean the caller
    # is gone.
    return (AGIHangup, AGIAppError, AGIUnknownError, BrokenPipeError, EOFError, ValueError)


@dataclass
class AgiPort:
    """DialogPort over one AGI session."""

    agi: Any
    source: str = "agi"

    async def _call(self, func: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.to_thread(func, *args)
        except _agi_errors() as error:
            raise CallerHungUp() from error

    async def play(self, prompt: PromptRef, *, stop_keys: str) -> str | None:
        key = await self._call(self.agi.stream_file, prompt.media, stop_keys)
        return key or None

    async def wait_key(self, timeout: float) -> str | None:
        key = await self._call(self.agi.wait_for_digit, int(timeout * 1000))
        return key or None

    async def set_result(self, result: DialogResult) -> None:
        await self._call(self.agi.set_variable, RESULT_VARIABLE, result.packed())

    async def set_agent_notice(self, media: str) -> None:
        """What Dial's U(consent-gate-agent-notice) plays to each agent that answers. Inherited
        (``__``), so Dial copies it to every agent leg, also after a transfer."""
        await self._call(self.agi.set_variable, f"__{AGENT_NOTICE_VARIABLE}", media)


async def run_agi(settings: Settings, agi: Any, purpose_name: str) -> Decision | None:
    port = AgiPort(agi)
    env = agi.env
    purposes = parse_purposes(purpose_name, settings)
    if not purposes:
        log.warning("consent.unknown_purpose")
        return None  # CONSENT_STATUS stays "unavailable" (set by the dialplan before AGI)
    call = CallInfo(
        call_id=str(env.get("agi_uniqueid", ""))[:64],
        caller_number=str(env.get("agi_callerid", "")),
        language=str(env.get("agi_language", "")),
    )
    structlog.contextvars.bind_contextvars(call_id=call.call_id)
    catalog = PromptCatalog.load(settings.prompts_dir)
    ledger = Ledger(settings.database_dsn, Journal(settings.journal_dir),
                    write_timeout=settings.ledger_write_timeout)
    await ledger.start()
    try:
        gate = GateContext(settings, catalog, ledger)
        await port._call(agi.answer)
        state = DialogState()
        result = await run_gate(port, call, purposes, gate, state)
        if result.status is not Decision.ABANDONED:
            await port.set_result(result)
            primary = next((p for p in purposes if p.name == result.purpose), purposes[0])
            after = MidCallState.after_dialog(call, primary, result, state.language)
            await port.set_agent_notice(after.agent_greeting_media(gate))
        return result.status
    except CallerHungUp:
        return Decision.ABANDONED
    finally:
        await ledger.close()


MIDCALL_ACTIONS = {action.value: action for action in Action}


def parse_midcall(argument: str) -> tuple[Action, Role] | None:
    """'midcall-<action>-<caller|agent>', as the shipped [consent-gate-withdraw] etc. pass it."""
    if not argument.startswith("midcall-"):
        return None
    body, _, role = argument.removeprefix("midcall-").rpartition("-")
    if body not in MIDCALL_ACTIONS or role not in ("caller", "agent"):
        return None
    return MIDCALL_ACTIONS[body], Role(role)


async def run_midcall(settings: Settings, agi: Any, action: Action, role: Role) -> bool:
    """A mid-call code in AGI mode (features.conf applicationmap → Gosub → here), on the caller's
    channel.  The state of the call lives in its channel variables.  Returns True if it acted."""
    port = AgiPort(agi)

    async def var(name: str) -> str:
        return str(await port._call(agi.get_variable, name) or "")

    purpose = settings.purpose((await var("CONSENT_PURPOSE")).split("+")[0])
    consent_id = await var("CONSENT_ID")
    if purpose is None or not consent_id:
        return False
    recording_id = await var("CONSENT_RECORDING_ID")
    status = await var("CONSENT_STATUS")
    paused_at = await var("CONSENT_PAUSED_AT")
    env = agi.env
    call = CallInfo(call_id=str(env.get("agi_uniqueid", ""))[:64], caller_number=str(env.get("agi_callerid", "")),
                    language=str(env.get("agi_language", "")))
    catalog = PromptCatalog.load(settings.prompts_dir)
    state = MidCallState(
        call=call, purpose=purpose, consent_id=consent_id,
        language=pick_language(call.language, catalog.languages, settings.default_language),
        recording_id=recording_id if status == "granted" and len(recording_id) == 32 else None,
        caller_records=await var("CONSENT_CALLER_RECORDS") == "1",
        withdrawn=await var("CONSENT_WITHDRAWN") == "1",
        paused_at=datetime.fromisoformat(paused_at) if paused_at else None,
    )
    plan = state.plan(action, role, settings.dialog, utcnow())
    if plan is None:
        return False
    ledger = Ledger(settings.database_dsn, Journal(settings.journal_dir), write_timeout=settings.ledger_write_timeout)
    await ledger.start()
    try:
        gate = GateContext(settings, catalog, ledger)
        if plan.stop_recording or plan.mute:
            # Dialplan has no "mute MixMonitor": a pause stops it, a resume appends to the same files.
            await port._call(agi.appexec, "StopMixMonitor", "")
        if plan.mute is False and state.recording_id:
            mix, caller_leg, agent_leg = (settings.recordings_dir / f"{state.recording_id}{suffix}"
                                          for suffix in RECORDING_FILE_SUFFIXES)
            legs = await var("CONSENT_RECORD_LEGS") == "1"
            options = f"r({caller_leg})t({agent_leg})a" if legs else "a"
            await port._call(agi.appexec, "MixMonitor", f"{mix},{options}")
        deleted = 0
        if plan.delete_recording and state.recording_id:
            deleted = len(delete_recording_files(recording_files(settings.recordings_dir, state.recording_id)))
        if plan.ledger_event is not None:
            detail = dict(plan.detail, **({"deleted_files": deleted} if plan.delete_recording else {}))
            await ledger.append(state.event(gate, plan.ledger_event, "agi", **detail))
        for name, value in (("CONSENT_WITHDRAWN", "1" if state.withdrawn else ""),
                            ("CONSENT_CALLER_RECORDS", "1" if state.caller_records else ""),
                            ("CONSENT_PAUSED_AT", state.paused_at.isoformat() if state.paused_at else "")):
            await port._call(agi.set_variable, name, value)
        # A later agent (transfer) hears the greeting as it is now.
        await port.set_agent_notice(state.agent_greeting_media(gate))
        # The routine runs on the caller's channel: only the caller's notice can be played here
        # (mid-call agent notices need the ARI service's whispers).
        if plan.caller_notice and role is Role.CALLER:
            await port.play(gate.prompt(state.language, plan.caller_notice), stop_keys="")
        return True
    finally:
        await ledger.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="consent-gate-agi",
        description="Consent dialog as an AGI script: AGI(consent-gate-agi,<purpose>). "
        "Reads the same settings as consent-gate-ari (--config or $CONSENT_GATE_CONFIG).",
    )
    parser.add_argument("purpose", help="purpose name from the purpose catalogue, or midcall-<action>-<caller|agent> "
                        "(action: withdraw, caller-records, pause, resume) from the features.conf routines")
    parser.add_argument("--config", type=Path)
    args = parser.parse_args(argv)
    # AGI speaks on stdout; logs go to stderr (Asterisk's console), never caller data to a shell.
    configure_logging("json")
    midcall = parse_midcall(args.purpose)
    try:
        settings = load_settings(args.config, require_ari=False)
        if midcall is None or midcall[0] is Action.RESUME:
            # Only what may start MixMonitor is refused: withdrawing and pausing always work.
            # The script runs as the Asterisk user, so the directory must be its own.
            check_private_dir(settings.recordings_dir, os.geteuid())
    except ConfigError as error:
        print(f"consent-gate-agi: {error}", file=sys.stderr)
        return 2
    from asterisk.agi import AGI

    stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
    # pyst2 echoes the whole AGI environment (caller ID included) to stderr: silence it.
    agi = AGI(stdin=stdin, stdout=sys.stdout, stderr=open(os.devnull, "w"))
    try:
        if midcall is not None:
            asyncio.run(run_midcall(settings, agi, *midcall))
        else:
            asyncio.run(run_agi(settings, agi, args.purpose))
    except PromptError as error:
        log.error("consent.prompt_missing", error=str(error))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

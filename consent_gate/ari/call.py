"""One caller, from StasisStart to hangup: one task, one queue, one state object, named states.

    answering -> asking <-> storing -> handing-back -> watching -> ended
         \\           \\          \\            \\
          +-----------+----------+------------+--> released -> ended   (fail closed)

The app's router puts every ARI event for the call into ``Call.queue``; the call's task runs
the core dialog (``consent_gate.core.dialog``) with this class as its :class:`DialogPort`, hands the
result back in one variable, then -- in the same task, from the same queue, so no key is lost
or reordered -- watches the rest of the call for mid-call codes (``consent_gate.ari.watch``).
Whatever goes wrong in the dialog -- an exception, cancellation, the transport dropping -- the
call is released back to the dialplan with no result (shielded, time-limited), so a caller is
never stuck and never recorded without a stored grant.  Every transition is logged and counted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog

from consent_gate.ari.ami import AmiClient, AmiError
from consent_gate.ari.metrics import CallObserver, CallOutcome
from consent_gate.ari.router import Router, event_channel, sub_object
from consent_gate.ari.transport import AriClient, AriError, ChannelGone
from consent_gate.ari.watch import AriRecordingControl, MidCallWatch, Whispers
from consent_gate.config import Purpose
from consent_gate.contract import RELEASE_CONTEXT, RELEASE_LABEL, RESULT_VARIABLE
from consent_gate.core.dialog import (
    CallerHungUp,
    CallInfo,
    DialogResult,
    DialogState,
    GateContext,
    Phase,
    PromptRef,
    pick_language,
    run_gate,
)
from consent_gate.core.events import Decision
from consent_gate.core.midcall import MidCallState

log = structlog.get_logger(__name__)

RELEASE_TIMEOUT = 3.0
# After the caller's channel is gone, the call's last work (file sweep of a withdrawn recording,
# unsubscribing) gets this long, shielded from cancellation.
FINISH_TIMEOUT = 5.0
__all__ = ["RELEASE_CONTEXT", "RELEASE_LABEL", "Call", "CallState", "release_unrecorded"]


class CallState(enum.StrEnum):
    ANSWERING = "answering"
    ASKING = "asking"
    STORING = "storing"
    HANDING_BACK = "handing-back"
    WATCHING = "watching"
    RELEASED = "released"  # back in the dialplan without a result (fail closed)
    ENDED = "ended"


TRANSITIONS: dict[CallState, frozenset[CallState]] = {
    # ANSWERING -> WATCHING: a call adopted after a restart (its result was handed back before).
    CallState.ANSWERING: frozenset({CallState.ASKING, CallState.STORING, CallState.WATCHING, CallState.RELEASED,
                                    CallState.ENDED}),
    # Several purposes: asking and storing alternate, one question per purpose.
    CallState.ASKING: frozenset({CallState.STORING, CallState.RELEASED, CallState.ENDED}),
    CallState.STORING: frozenset({CallState.ASKING, CallState.HANDING_BACK, CallState.RELEASED, CallState.ENDED}),
    CallState.HANDING_BACK: frozenset({CallState.WATCHING, CallState.RELEASED, CallState.ENDED}),
    CallState.WATCHING: frozenset({CallState.ENDED}),
    CallState.RELEASED: frozenset({CallState.ENDED}),
    CallState.ENDED: frozenset(),
}
# Until the result is handed back, a failure releases the call without one.
UNFINISHED = frozenset({CallState.ANSWERING, CallState.ASKING, CallState.STORING, CallState.HANDING_BACK})


class IllegalTransition(RuntimeError):
    pass


async def release_unrecorded(
    client: AriClient, channel_id: str, *, fallback_timeout: float,
    ami: AmiClient | None = None, channel_name: str = "",
) -> None:
    """Put a channel back into the dialplan without a result (fail closed; the call goes on).

    A prompt still playing holds back every ARI command for the channel until it ends (up to
    the question's length), and a crashed process took the playback's id with it.  An AMI
    Redirect takes the channel out of Stasis at once, so it comes first when AMI is there; then
    ARI continue to the label; if the include lacks the label (an older one), clear the result
    and continue to the Stasis() call.  Raises AriError if the channel could not be released
    safely; it is then never continued."""
    channel = await client.get_channel(channel_id)
    if channel is None or (channel.get("dialplan") or {}).get("app_name") != "Stasis":
        # Hung up, or already back in the dialplan (a continue that did arrive): nothing to
        # release -- and a Redirect there would pull the caller out of the admin's next step.
        return
    if ami is not None and channel_name:
        try:
            await ami.action("Redirect", Channel=channel_name, Context=RELEASE_CONTEXT, Exten="s",
                             Priority=RELEASE_LABEL)
            return
        except AmiError as error:  # e.g. no AMI, or the channel is gone: ARI decides below
            log.info("ari.release_redirect_failed", channel=channel_id, error=str(error))
    try:
        await client.continue_in_dialplan(channel_id, context=RELEASE_CONTEXT, extension="s",
                                          label=RELEASE_LABEL, gone_ok=False)
        return
    except ChannelGone:
        # 404: the caller hung up, or the dialplan has no such label.
        if await client.get_channel(channel_id) is None:
            return
    await client.set_var(channel_id, RESULT_VARIABLE, "", timeout=fallback_timeout)
    await client.continue_in_dialplan(channel_id)


class TransportLost(RuntimeError):
    """The events websocket dropped: events for this call may be lost, so the dialog fails closed."""


HANGUP_EVENTS = frozenset({"StasisEnd", "ChannelDestroyed", "ChannelHangupRequest"})
_DIALOG_PHASES = {Phase.ASKING: CallState.ASKING, Phase.STORING: CallState.STORING}


@dataclass(eq=False)
class Call:
    """Per-call state, the DialogPort the core dialog talks to, and the mid-call watch after it."""

    client: AriClient
    gate: GateContext
    router: Router
    channel_id: str
    info: CallInfo
    purposes: list[Purpose] | None
    source: str = "ari"
    channel_name: str = ""
    ami: AmiClient | None = None  # releases the caller at once if the dialog fails mid-prompt
    state: CallState = CallState.ANSWERING
    dialog: DialogState = field(default_factory=DialogState)
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    pending_keys: collections.deque[str] = field(default_factory=collections.deque)
    caller_gone: bool = False
    result: DialogResult | None = None
    watch: MidCallWatch | None = None
    whispers: Whispers | None = None
    started_monotonic: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None
    # Told of every transition, of mid-call errors, and of the outcome once the result is back in
    # the dialplan (or the call released).
    metrics: CallObserver | None = None

    def __post_init__(self) -> None:
        self.dialog.on_phase = self._dialog_phase
        self.router.add(f"channel:{self.channel_id}", self)

    # -- state ------------------------------------------------------------------------------------
    def transition(self, new: CallState, **why: object) -> None:
        old = self.state
        if new is old:
            return
        if new not in TRANSITIONS[old]:
            raise IllegalTransition(f"{old} -> {new}")
        self.state = new
        log.info("call.transition", call_id=self.info.call_id, channel=self.channel_id,
                 from_state=str(old), to_state=str(new), **why)
        if self.metrics is not None:
            self.metrics.call_transition(str(old), str(new))

    def _dialog_phase(self, phase: Phase) -> None:
        new = _DIALOG_PHASES.get(phase)
        if new is not None and self.state in (CallState.ANSWERING, CallState.ASKING, CallState.STORING):
            self.transition(new)

    # -- event intake (called by the app's router) -------------------------------------------------
    def deliver(self, event: dict[str, Any]) -> None:
        if self.whispers is not None and self.whispers.resolve(event):
            return
        if event.get("type") in HANGUP_EVENTS and event_channel(event) == self.channel_id:
            self.caller_gone = True
        self.queue.put_nowait(event)

    def post(self, event: dict[str, Any]) -> None:
        """A synthetic event (timer, found bridge) handled in the call's own task, in order."""
        self.queue.put_nowait(event)

    # -- DialogPort ---------------------------------------------------------------------------------
    async def discard_keys(self) -> None:
        """Keys pressed before this question started are not answers to it (they may have been
        meant for the previous purpose's question)."""
        dropped = len(self.pending_keys)
        self.pending_keys.clear()
        kept = []
        while not self.queue.empty():
            event = self.queue.get_nowait()
            if event.get("type") == "ChannelDtmfReceived":
                dropped += 1
            else:
                kept.append(event)
        for event in kept:
            self.queue.put_nowait(event)
        if dropped:
            log.info("consent.keys_discarded", call_id=self.info.call_id, keys=dropped)

    async def play(self, prompt: PromptRef, *, stop_keys: str) -> str | None:
        if stop_keys and self.pending_keys:
            return self.pending_keys.popleft()  # keyed during the previous prompt: early answer
        playback_id = f"cg-{uuid.uuid4().hex}"
        self.router.add(f"playback:{playback_id}", self)
        try:
            try:
                await self.client.play(self.channel_id, f"sound:{prompt.media}", playback_id=playback_id)
            except ChannelGone:
                raise CallerHungUp() from None
            while True:
                event = await self._next_event(None)
                match event.get("type"):
                    case "PlaybackFinished" if sub_object(event.get("playback")).get("id") == playback_id:
                        return None
                    case "ChannelDtmfReceived" if isinstance(event.get("digit"), str) and event["digit"]:
                        digit = str(event["digit"])
                        if stop_keys and digit in stop_keys:
                            await self.client.stop_playback(playback_id)
                            return digit
                        self.pending_keys.append(digit)
                    case _:
                        continue
        finally:
            self.router.remove(f"playback:{playback_id}", self)

    async def wait_key(self, timeout: float) -> str | None:
        if self.pending_keys:
            return self.pending_keys.popleft()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            event = await self._next_event(remaining)
            if event.get("type") == "Timeout":
                return None
            if event.get("type") == "ChannelDtmfReceived" and isinstance(event.get("digit"), str) and event["digit"]:
                return str(event["digit"])

    async def _next_event(self, timeout: float | None) -> dict[str, Any]:
        if self.caller_gone and self.queue.empty():
            raise CallerHungUp()
        try:
            event = await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return {"type": "Timeout"}
        if event.get("type") in HANGUP_EVENTS and event_channel(event) == self.channel_id:
            raise CallerHungUp()
        if event.get("type") == "TransportDisconnected":
            raise TransportLost(str(event.get("reason", "")))
        return event

    # -- lifecycle -----------------------------------------------------------------------------------
    async def run(self) -> None:
        bound = log.bind(call_id=self.info.call_id, channel=self.channel_id)
        try:
            if self.state is CallState.ANSWERING:
                await self._dialog(bound)
            if self.state is CallState.WATCHING:
                await self._watch(bound)
        finally:
            await self._finish(bound)

    async def _dialog(self, bound: Any) -> None:
        try:
            if not self.purposes:
                bound.warning("consent.unknown_purpose")
                return
            await self.client.answer(self.channel_id)
            self.result = await run_gate(self, self.info, self.purposes, self.gate, self.dialog)
            if self.result.status is Decision.ABANDONED:
                self.transition(CallState.ENDED, why="abandoned")
                return
            await self._hand_back(self.result)
        except (CallerHungUp, ChannelGone):
            bound.info("consent.channel_gone")
            self.transition(CallState.ENDED, why="caller gone")
        except asyncio.CancelledError:
            await self._release_unavailable("cancelled")
            raise
        except Exception as error:  # fail closed: any bug or ARI failure means "no recording"
            bound.error("consent.dialog_failed", error=repr(error))
        finally:
            if self.state in UNFINISHED:
                await self._release_unavailable("dialog failed")
            if self.metrics is not None:
                self.metrics.call_finished(self.outcome())

    def outcome(self) -> CallOutcome:
        """What this call's dialog came to, for the metrics (purpose names and statuses only)."""
        now_mono, now_wall = time.monotonic(), time.time()
        started_wall = now_wall - (now_mono - self.started_monotonic)
        result = self.result
        if result is not None:
            status = str(result.status)
        else:
            status = "abandoned" if self.caller_gone else "unavailable"
        purpose = "+".join(p.name for p in self.purposes or []) or (result.purpose if result else "") or "unknown"
        state = self.dialog
        to_prompt = to_release = None
        if state.prompt_started_at is not None:
            to_prompt = max(0.0, state.prompt_started_at.timestamp() - started_wall)
        if state.decided_at is not None and state.digit is not None and status != "abandoned":
            to_release = max(0.0, now_wall - state.decided_at.timestamp())
        return CallOutcome(
            purpose=purpose, status=status,
            durability=str(state.durability) if state.durability is not None else None,
            dialog_seconds=now_mono - self.started_monotonic, stasis_to_prompt=to_prompt,
            decision_to_release=to_release,
        )

    async def _hand_back(self, result: DialogResult) -> None:
        """Subscribe for the rest of the call, then hand the result back in one variable (one
        request, atomic) and continue.  Keys pressed meanwhile wait in the queue for the watch."""
        self.transition(CallState.HANDING_BACK, status=str(result.status))
        purpose = self.gate.settings.purpose(result.purpose)
        if purpose is not None:
            self._make_watch(MidCallState.after_dialog(self.info, purpose, result, self.dialog.language,
                                                       self.gate.settings))
            assert self.watch is not None
            await self.watch.start()
            # Keys pressed while the decision was stored ("1" then "*0" at once): acted on while
            # the channel is still in Stasis, so a withdrawal is on the channel before the
            # dialplan reaches MixMonitor (which then never starts).
            while not self.queue.empty():
                await self._handle_watch_event(self.queue.get_nowait())
        await self.client.set_var(self.channel_id, RESULT_VARIABLE, result.packed())
        await self.client.continue_in_dialplan(self.channel_id)
        self.transition(CallState.WATCHING)

    async def adopt(self, result: DialogResult, *, withdrawn: bool, paused_at: datetime | None) -> None:
        """Watch a call that an earlier process handed back (service restart): its codes work
        again.  State from its channel variables (validated by the caller of this method)."""
        assert self.purposes
        language = pick_language(self.info.language, self.gate.prompts.languages, self.gate.settings.default_language)
        self.dialog.language = language
        self.result = result
        mid = MidCallState.after_dialog(self.info, self.purposes[0], result, language, self.gate.settings)
        mid.withdrawn = withdrawn
        mid.paused_at = None if withdrawn else paused_at
        self._make_watch(mid)
        assert self.watch is not None
        await self.watch.start(adopted=True)
        self.transition(CallState.WATCHING, why="adopted after a restart")

    def _make_watch(self, mid: MidCallState) -> None:
        self.whispers = Whispers(self.client, self.gate, self.router, self, self.dialog.language)
        self.watch = MidCallWatch(
            client=self.client, gate=self.gate, router=self.router, owner=self, channel_id=self.channel_id,
            state=mid, control=AriRecordingControl(self.client, self.ami, self.channel_id, self.channel_name),
            whispers=self.whispers, post=self.post, source=self.source)

    async def _watch(self, bound: Any) -> None:
        """The rest of the call: one event at a time; an unexpected error in one event is logged
        and the watch goes on, so the caller's codes keep working."""
        watch = self.watch
        if watch is None:
            return
        while not watch.ended:
            await self._handle_watch_event(await self.queue.get())

    async def _handle_watch_event(self, event: dict[str, Any]) -> None:
        assert self.watch is not None
        try:
            await self.watch.handle(event)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 -- never let one event end the call's rights
            log.error("midcall.event_failed", call_id=self.info.call_id, event_type=event.get("type"),
                      error=repr(error))
            if self.metrics is not None:
                self.metrics.midcall_error()

    async def _finish(self, bound: Any) -> None:
        async def finish() -> None:
            if self.watch is not None:
                await self.watch.finish()

        try:
            await asyncio.shield(asyncio.wait_for(finish(), FINISH_TIMEOUT))
        except TimeoutError:
            bound.warning("call.finish_timeout")
        except (AriError, OSError) as error:
            bound.warning("call.finish_failed", error=str(error))
        finally:
            self.router.remove_all(self)
            if self.state is not CallState.ENDED:
                self.transition(CallState.ENDED)

    async def _release_unavailable(self, why: str) -> None:
        """Shielded, time-limited: put the channel back into the dialplan without a recording."""
        if self.state not in UNFINISHED:
            return
        if self.caller_gone:
            self.transition(CallState.ENDED, why="caller gone")
            return
        self.transition(CallState.RELEASED, why=why)

        async def release() -> None:
            with contextlib.suppress(AriError, OSError, asyncio.TimeoutError):
                await release_unrecorded(self.client, self.channel_id, fallback_timeout=RELEASE_TIMEOUT,
                                         ami=self.ami, channel_name=self.channel_name)

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.shield(asyncio.wait_for(release(), RELEASE_TIMEOUT))

"""Mid-call rights over ARI: what a call does once its dialog has handed the result back.

Mechanism (and why):
* **ARI channel and bridge subscriptions** deliver every key the caller and the agents press,
  and every agent that joins the caller's bridge (first answer and after a transfer), without
  taking the channels out of the bridge.  No ``DYNAMIC_FEATURES`` are needed in ARI mode (the
  ``features.conf`` snippet in ``dialplan/`` is for the AGI mode).
* **The recorder** (:class:`AriRecordingControl`): ``CONSENT_WITHDRAWN=1`` on the caller's
  channel stops the dialplan from starting MixMonitor (it checks right before and right after
  ``MixMonitor``), AMI ``StopMixMonitor`` with the recorder's own ``MixMonitorID`` stops it,
  ``MixMonitorMute`` mutes it (Asterisk 22 has no id for mute: it mutes every MixMonitor on
  the channel, which is what a card-data pause needs anyway).
* **Whispers**: an ARI snoop channel with ``whisper=out`` on a party's channel plays a notice
  to that party only (the agent hears "the caller withdrew consent", the caller hears the
  confirmation), while the bridge goes on.

The policy and the plan executor are ``consent_gate.core.midcall``; this module gives them their
ports and keeps track of the call's bridges and agents.  It runs inside the call's one task
(``consent_gate.ari.call``): every state change happens there, in event order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from consent_gate.ari.ami import AmiClient, AmiError
from consent_gate.ari.router import Router, event_channel, sub_object
from consent_gate.ari.transport import AriClient, AriError, ChannelGone
from consent_gate.contract import (
    CALLER_RECORDS_VARIABLE,
    MIXMONITOR_ID_VARIABLE,
    PAUSED_AT_VARIABLE,
    WITHDRAWN_VARIABLE,
    valid_mixmonitor_id,
)
from consent_gate.core.dialog import GateContext
from consent_gate.core.events import utcnow
from consent_gate.core.midcall import (
    Action,
    CodeMatcher,
    MidCallState,
    Plan,
    RecordingControlError,
    Role,
    delete_files,
    execute_plan,
    stop_with_retry,
)
from consent_gate.prompts.catalog import PromptError

log = structlog.get_logger(__name__)

SNOOP_ARG = "consent-gate-whisper"
SNOOP_PREFIX = "cg-snoop-"
WHISPER_TIMEOUT = 30.0
WHISPER_READY_TIMEOUT = 5.0
# A withdrawal whose recorder could not be stopped keeps trying this often until the call ends.
STOP_RETRY_INTERVAL = 1.0
# After the call, MixMonitor's thread may still close (or, having opened lazily, create) the
# file of a withdrawn recording: the files are swept again once this long after the hangup.
FINAL_SWEEP_DELAY = 1.0

# Synthetic events a call posts to its own queue, so timers change state in the call's task.
AUTO_RESUME = "ConsentGateAutoResume"
RETRY_STOP = "ConsentGateRetryStop"
BRIDGE_FOUND = "ConsentGateBridgeFound"


class AriRecordingControl:
    """The call's MixMonitor as the plan executor sees it (ARI for variables, AMI for the recorder)."""

    def __init__(self, client: AriClient, ami: AmiClient | None, channel_id: str, channel_name: str) -> None:
        self._client = client
        self._ami = ami
        self._channel_id = channel_id
        self._channel_name = channel_name
        self._blocked = False

    async def set_channel_var(self, name: str, value: str) -> None:
        """Set a variable on the caller's channel.  ARI refuses (409) once the channel has left
        Stasis, so AMI ``Setvar`` does it then.  Raises RecordingControlError."""
        try:
            await self._client.set_var(self._channel_id, name, value)
            return
        except ChannelGone:
            return  # hung up: no dialplan left to read it
        except (AriError, OSError) as error:
            if not (isinstance(error, AriError) and error.status == 409) or self._ami is None:
                raise RecordingControlError(f"could not set {name}: {error}") from error
        try:
            await self._ami.action("Setvar", Channel=self._channel_name, Variable=name, Value=value)
        except AmiError as error:
            if await self._client.get_channel(self._channel_id) is None:
                return
            raise RecordingControlError(f"could not set {name}: {error}") from error

    async def block(self) -> None:
        await self.set_channel_var(WITHDRAWN_VARIABLE, "1")
        self._blocked = True

    async def _recorder_id(self) -> str | None:
        try:
            raw = await self._client.get_var(self._channel_id, MIXMONITOR_ID_VARIABLE)
        except (AriError, OSError) as error:
            raise RecordingControlError(f"could not read {MIXMONITOR_ID_VARIABLE}: {error}") from error
        if raw and valid_mixmonitor_id(raw) is None:
            raise RecordingControlError(f"{MIXMONITOR_ID_VARIABLE} is malformed")
        return raw or None

    async def stop(self) -> None:
        if self._ami is None:
            raise RecordingControlError("no AMI configured: MixMonitor cannot be stopped")
        if await self._client.get_channel(self._channel_id) is None:
            return  # hung up: MixMonitor ended with the channel
        recorder = await self._recorder_id()
        if recorder is None:
            if self._blocked:
                # MixMonitor has not started (its i() sets the id before the app returns): the
                # dialplan's check right after MixMonitor sees CONSENT_WITHDRAWN and stops it.
                return
            raise RecordingControlError("MixMonitor not started yet and the channel is not blocked")
        try:
            await self._ami.action("StopMixMonitor", Channel=self._channel_name, MixMonitorID=recorder)
        except AmiError as error:
            if await self._client.get_channel(self._channel_id) is None:
                return
            if await self._stopped_by_dialplan(recorder):
                return
            raise RecordingControlError(str(error)) from error

    async def _stopped_by_dialplan(self, recorder: str) -> bool:
        """StopMixMonitor "could not stop": the dialplan's post-check (or the hangup) already did."""
        try:
            filename = await self._client.get_var(self._channel_id, f"MIXMONITOR({recorder},filename)")
        except (AriError, OSError):
            return False
        return not filename

    async def mute(self, muted: bool) -> None:
        if self._ami is None:
            raise RecordingControlError("no AMI configured: the recording cannot be muted")
        try:
            await self._ami.action("MixMonitorMute", Channel=self._channel_name, Direction="both",
                                   State="1" if muted else "0")
        except AmiError as error:
            raise RecordingControlError(str(error)) from error


@dataclass
class Whispers:
    """Notices to one party through snoop channels; each runs in its own task (a long prompt
    never delays the next key), notices to one party one after the other."""

    client: AriClient
    gate: GateContext
    router: Router
    owner: Any  # the call: registered in the router for its snoop channels and playbacks
    language: str
    chains: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    playbacks: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    snoops: dict[str, asyncio.Future[None]] = field(default_factory=dict)

    @property
    def app(self) -> str:
        return self.gate.settings.ari_app

    def later(self, channel_id: str, prompt_name: str) -> None:
        previous = self.chains.get(channel_id)
        self.chains[channel_id] = asyncio.ensure_future(self._whisper(channel_id, prompt_name, previous))

    def resolve(self, event: dict[str, Any]) -> bool:
        """A snoop channel entering Stasis or a whisper's PlaybackFinished (called at delivery)."""
        kind = event.get("type")
        if kind == "StasisStart":
            channel_id = str((event.get("channel") or {}).get("id") or "")
            ready = self.snoops.get(channel_id)
            if ready is not None and not ready.done():
                ready.set_result(None)
            return ready is not None
        if kind == "PlaybackFinished":
            finished = self.playbacks.get(str((event.get("playback") or {}).get("id") or ""))
            if finished is not None and not finished.done():
                finished.set_result(None)
            return finished is not None
        return False

    async def _whisper(self, channel_id: str, prompt_name: str, previous: asyncio.Future[None] | None) -> None:
        if previous is not None:  # notices to one party play one after the other
            with contextlib.suppress(Exception):
                await previous
        try:
            prompt = self.gate.prompt(self.language, prompt_name)
        except PromptError as error:
            log.warning("midcall.notice_missing", prompt=prompt_name, error=str(error))
            return
        snoop_id = f"{SNOOP_PREFIX}{uuid.uuid4().hex[:16]}"
        playback_id = f"cg-{uuid.uuid4().hex}"
        loop = asyncio.get_running_loop()
        ready = self.snoops[snoop_id] = loop.create_future()
        finished = self.playbacks[playback_id] = loop.create_future()
        self.router.add(f"channel:{snoop_id}", self.owner)
        self.router.add(f"playback:{playback_id}", self.owner)
        try:
            await self.client.request("POST", f"/channels/{channel_id}/snoop", params={
                "app": self.app, "appArgs": SNOOP_ARG, "spy": "none", "whisper": "out", "snoopId": snoop_id})
            await asyncio.wait_for(ready, WHISPER_READY_TIMEOUT)
            await self.client.play(snoop_id, f"sound:{prompt.media}", playback_id=playback_id)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(finished, WHISPER_TIMEOUT)
        except (TimeoutError, AriError, OSError) as error:
            log.warning("midcall.whisper_failed", prompt=prompt_name, error=str(error) or "snoop not ready")
        finally:
            self.playbacks.pop(playback_id, None)
            self.snoops.pop(snoop_id, None)
            self.router.remove(f"channel:{snoop_id}", self.owner)
            self.router.remove(f"playback:{playback_id}", self.owner)
            with contextlib.suppress(AriError, OSError):
                await self.client.hangup(snoop_id)

    def cancel(self) -> None:
        for chain in self.chains.values():
            chain.cancel()


@dataclass
class Notices:
    """The plan executor's notices, as whispers to the caller and the agents in the bridge."""

    whispers: Whispers
    caller: str
    agents: Callable[[], set[str]]

    def to_caller(self, prompt_name: str) -> None:
        self.whispers.later(self.caller, prompt_name)

    def to_agents(self, prompt_name: str) -> None:
        for agent in self.agents():
            self.whispers.later(agent, prompt_name)


@dataclass
class MidCallWatch:
    """The watching part of one call: its bridges, agents, key matchers and recorder.

    Not a task of its own: the call's task feeds it events (``on_<EventType>``) one at a time."""

    client: AriClient
    gate: GateContext
    router: Router
    owner: Any  # the call that routes events here
    channel_id: str
    state: MidCallState
    control: AriRecordingControl
    whispers: Whispers
    post: Callable[[dict[str, Any]], None]  # put a synthetic event into the call's queue
    source: str = "ari"
    agents: set[str] = field(default_factory=set)
    greeted: set[str] = field(default_factory=set)
    bridges: set[str] = field(default_factory=set)
    matchers: dict[str, CodeMatcher] = field(default_factory=dict)
    timers: set[asyncio.Task[None]] = field(default_factory=set)
    resume_timer: asyncio.Task[None] | None = None
    stop_retry: asyncio.Task[None] | None = None
    ended: bool = False
    bridge_retries: int = 3
    greet_present: bool = True  # False once: agents found in the bridge of an adopted call heard it

    @property
    def app(self) -> str:
        return self.gate.settings.ari_app

    @property
    def notices(self) -> Notices:
        return Notices(self.whispers, self.channel_id, lambda: set(self.agents))

    async def start(self, *, adopted: bool = False) -> None:
        """Keys and bridge changes of the caller's channel for the rest of the call (also once it
        has left Stasis): subscribed before the channel goes back to the dialplan.  An adopted
        call (service restart) is usually bridged already: find its bridge, do not greet the
        agents in it again, and re-arm the pause limit for what is left of it."""
        self.router.add(f"channel:{self.channel_id}", self.owner)
        await self._subscribe(f"channel:{self.channel_id}")
        if adopted:
            self.greet_present = False
            self._find_bridge_later(attempts=1)
            if self.state.paused_at is not None:
                elapsed = (utcnow() - self.state.paused_at).total_seconds()
                self._start_resume_timer(max(0.0, self.gate.settings.dialog.pause_limit - elapsed))
            if self.state.withdrawn:
                self.state.recorder_stopped = False  # not known: make sure, once more
                self.post({"type": RETRY_STOP})

    async def handle(self, event: dict[str, Any]) -> None:
        handler = getattr(self, f"on_{event.get('type')}", None)
        if handler is not None:
            await handler(event, event_channel(event))

    # -- events ---------------------------------------------------------------------------------
    async def on_ChannelDtmfReceived(self, event: dict[str, Any], channel: str | None) -> None:
        if channel is None or (channel != self.channel_id and channel not in self.agents):
            return
        digit = event.get("digit")
        if not isinstance(digit, str) or len(digit) != 1:
            return
        role = Role.CALLER if channel == self.channel_id else Role.AGENT
        matcher = self.matchers.setdefault(channel, CodeMatcher(self.gate.settings.dialog))
        action = matcher.feed(digit, time.monotonic())
        if action is None:
            return
        plan = self.state.plan(action, role, self.gate.settings.dialog, utcnow())
        log.info("midcall.code", call_id=self.state.call.call_id, action=action.value, role=role.value,
                 acted=plan is not None)
        if plan is not None:
            await self.carry_out(plan)

    async def on_ChannelEnteredBridge(self, event: dict[str, Any], channel: str | None) -> None:
        await self._on_bridge(sub_object(event.get("bridge")))

    async def on_ChannelVarset(self, event: dict[str, Any], channel: str | None) -> None:
        # Bridge events come on the bridge's topic, not the channel's; Asterisk sets BRIDGEPEER
        # whenever the caller is bridged (answer, transfer), so find that bridge.
        if channel == self.channel_id and event.get("variable") == "BRIDGEPEER" and event.get("value"):
            self._find_bridge_later()

    async def on_ConsentGateBridgeFound(self, event: dict[str, Any], channel: str | None) -> None:
        await self._on_bridge(sub_object(event.get("bridge")))

    async def on_ChannelLeftBridge(self, event: dict[str, Any], channel: str | None) -> None:
        if channel in self.agents:
            self._drop_agent(channel)

    async def on_ChannelDestroyed(self, event: dict[str, Any], channel: str | None) -> None:
        if channel == self.channel_id:
            self.ended = True
        elif channel in self.agents:
            self._drop_agent(channel)

    async def on_ChannelHangupRequest(self, event: dict[str, Any], channel: str | None) -> None:
        if channel == self.channel_id:
            self.ended = True

    async def on_ConsentGateAutoResume(self, event: dict[str, Any], channel: str | None) -> None:
        self.resume_timer = None
        plan = self.state.auto_resume(utcnow())
        if plan is not None:
            await self.carry_out(plan)

    async def on_ConsentGateRetryStop(self, event: dict[str, Any], channel: str | None) -> None:
        if self.state.withdrawn and not self.state.recorder_stopped:
            plan = self.state.plan(Action.WITHDRAW, Role.CALLER, self.gate.settings.dialog, utcnow())
            if plan is not None:
                await self.carry_out(plan)

    # -- acting ---------------------------------------------------------------------------------
    async def carry_out(self, plan: Plan) -> None:
        acted = await execute_plan(plan, self.state, control=self.control, ledger=self.gate.ledger,
                                     gate=self.gate, notices=self.notices, source=self.source, now=utcnow())
        if plan.action is Action.PAUSE and acted:
            self._start_resume_timer(self.gate.settings.dialog.pause_limit)
        elif plan.action in (Action.RESUME, Action.WITHDRAW) and acted:
            self._cancel_resume_timer()
        if acted:
            await self._remember(plan.action)
        if plan.action is Action.WITHDRAW:
            if self.state.recorder_stopped:
                self._cancel_stop_retry()
            elif self.stop_retry is None:
                self.stop_retry = self._timer(STOP_RETRY_INTERVAL, RETRY_STOP, repeat=True)

    async def _remember(self, action: Action) -> None:
        """Keep the call's mid-call state on its channel too, so a restarted service can adopt
        the call (CONSENT_WITHDRAWN is set by the recorder control itself)."""
        values = {
            Action.PAUSE: (PAUSED_AT_VARIABLE, self.state.paused_at.isoformat() if self.state.paused_at else ""),
            Action.RESUME: (PAUSED_AT_VARIABLE, ""),
            Action.CALLER_RECORDS: (CALLER_RECORDS_VARIABLE, "1"),
        }
        if action in values:
            name, value = values[action]
            try:
                await self.control.set_channel_var(name, value)
            except RecordingControlError as error:
                log.warning("midcall.remember_failed", variable=name, error=str(error))

    def _start_resume_timer(self, limit: float) -> None:
        self._cancel_resume_timer()
        self.resume_timer = self._timer(limit, AUTO_RESUME)

    def _cancel_resume_timer(self) -> None:
        if self.resume_timer is not None:
            self.resume_timer.cancel()
            self.resume_timer = None

    def _cancel_stop_retry(self) -> None:
        if self.stop_retry is not None:
            self.stop_retry.cancel()
            self.stop_retry = None

    def _timer(self, delay: float, kind: str, *, repeat: bool = False) -> asyncio.Task[None]:
        async def fire() -> None:
            while True:
                await asyncio.sleep(delay)  # the PCI pause limit / the retry interval itself
                self.post({"type": kind})
                if not repeat:
                    return

        task = asyncio.create_task(fire(), name=f"{kind}-{self.channel_id}")
        self.timers.add(task)
        task.add_done_callback(self.timers.discard)
        return task

    def _find_bridge_later(self, attempts: int = 20, interval: float = 0.1, delay: float = 0.0) -> None:
        async def find() -> None:
            if delay:
                await asyncio.sleep(delay)  # a retry after a refused bridge subscription
            for _ in range(attempts):
                with contextlib.suppress(AriError, OSError):
                    for bridge in await self.client.request("GET", "/bridges") or []:
                        if self.channel_id in sub_object(bridge).get("channels", []):
                            self.post({"type": BRIDGE_FOUND, "bridge": bridge})
                            return
                await asyncio.sleep(interval)  # Dial answered; the bridge follows within milliseconds
            log.warning("midcall.no_bridge_found", channel=self.channel_id)

        task = asyncio.create_task(find(), name=f"find-bridge-{self.channel_id}")
        self.timers.add(task)
        task.add_done_callback(self.timers.discard)

    async def _on_bridge(self, bridge: dict[str, Any]) -> None:
        bridge_id = str(bridge.get("id") or "")
        channels = [c for c in bridge.get("channels", []) if isinstance(c, str)]
        if not bridge_id or (bridge_id not in self.bridges and self.channel_id not in channels):
            return
        if bridge_id not in self.bridges:
            try:
                await self._subscribe(f"bridge:{bridge_id}")  # later joins: a transferred agent
                self.bridges.add(bridge_id)
                self.router.add(f"bridge:{bridge_id}", self.owner)
            except (AriError, OSError) as error:
                # Seen right after Dial answers (422 "Event source does not exist"): the agents
                # in it are taken all the same, and the bridge is looked up again shortly.
                log.warning("midcall.bridge_subscribe_failed", bridge=bridge_id, error=str(error))
                if self.bridge_retries > 0:
                    self.bridge_retries -= 1
                    self._find_bridge_later(delay=0.2)
        greet_present, self.greet_present = self.greet_present, True
        for other in channels:
            if other == self.channel_id or other in self.agents or other.startswith(SNOOP_PREFIX):
                continue
            self.agents.add(other)
            self.router.add(f"channel:{other}", self.owner)
            try:
                await self._subscribe(f"channel:{other}")  # the agent's keys (secure pause)
            except (AriError, OSError) as error:
                log.warning("midcall.agent_subscribe_failed", channel=other, error=str(error))
            if not greet_present:
                self.greeted.add(other)
            if other not in self.greeted:
                # The agent (first answer, or the new one after a transfer) hears how this call is handled.
                self.greeted.add(other)
                for notice in self.state.agent_greeting():
                    self.whispers.later(other, notice)

    def _drop_agent(self, channel: str) -> None:
        self.agents.discard(channel)
        self.router.remove(f"channel:{channel}", self.owner)

    async def _subscribe(self, source: str) -> None:
        log.debug("midcall.subscribe", source=source)
        await self.client.request("POST", f"/applications/{self.app}/subscription", params={"eventSource": source})

    # -- the end --------------------------------------------------------------------------------
    async def finish(self) -> None:
        """After the caller's channel is gone (shielded and time-limited by the call)."""
        for task in list(self.timers):
            task.cancel()
        self.whispers.cancel()
        if self.state.withdrawn:
            recordings = self.gate.settings.recordings_dir
            if not self.state.recorder_stopped:
                # The channel is gone, so is its MixMonitor; one last try costs nothing.
                await stop_with_retry(self.control, attempts=1)
            delete_files(recordings, self.state.recording_id)
            await asyncio.sleep(FINAL_SWEEP_DELAY)  # MixMonitor's thread closes its files after the hangup
            swept = delete_files(recordings, self.state.recording_id)
            if swept:
                log.warning("midcall.withdrawn_files_swept_after_call", recording_id=self.state.recording_id,
                            files=len(swept))
        sources = [f"channel:{c}" for c in (self.channel_id, *self.agents)] + [f"bridge:{b}" for b in self.bridges]
        for source in sources:
            if self.router.others(source, self.owner):
                continue  # a newer gate on the same channel still needs it
            with contextlib.suppress(AriError, OSError):
                await self.client.request("DELETE", f"/applications/{self.app}/subscription",
                                          params={"eventSource": source})

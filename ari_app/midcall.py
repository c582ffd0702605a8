"""Mid-call rights over ARI: one watcher per consented call, for the rest of the call.

Mechanism (and why):
* **ARI channel and bridge subscriptions** deliver every key the caller and the agents press,
  and every agent that joins the caller's bridge (first answer and after a transfer), without
  taking the channels out of the bridge.  No ``DYNAMIC_FEATURES`` are needed in ARI mode (the
  ``features.conf`` snippet in ``dialplan/`` is for the AGI mode).
* **AMI** ``StopMixMonitor`` / ``MixMonitorMute``: the only interface that can stop or mute a
  MixMonitor the dialplan started.
* **Whispers**: an ARI snoop channel with ``whisper=out`` on a party's channel plays a notice
  to that party only (the agent hears "the caller withdrew consent", the caller hears the
  confirmation), while the bridge goes on.

The policy (what a code means, what it must cause) is ``consent_gate.midcall``; this module
only carries out its plans.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import structlog

from consent_gate.dialog import GateContext
from consent_gate.events import utcnow
from consent_gate.midcall import Action, CodeMatcher, MidCallState, Plan, Role
from consent_gate.prompts import PromptError
from consent_gate.retention import delete_recording_files, recording_files

from .ami import AmiClient, AmiError
from .transport import AriClient, AriError

log = structlog.get_logger(__name__)

SNOOP_ARG = "consent-gate-whisper"
WHISPER_TIMEOUT = 30.0
WHISPER_READY_TIMEOUT = 5.0


@dataclass
class CallWatch:
    client: AriClient
    ami: AmiClient | None
    gate: GateContext
    channel_id: str
    channel_name: str
    state: MidCallState
    source: str = "ari"
    agents: set[str] = field(default_factory=set)
    bridges: set[str] = field(default_factory=set)
    matchers: dict[str, CodeMatcher] = field(default_factory=dict)
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    # Notices to one party play one after the other: the last one queued for each channel.
    notice_chain: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    # Whisper playbacks in progress, finished by the app's PlaybackFinished routing.
    playbacks: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    # Snoop channels being created: ready once their StasisStart arrives (play before it is refused).
    snoops: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    _resume_timer: asyncio.Task[None] | None = None
    ended: bool = False

    @property
    def app(self) -> str:
        return self.gate.settings.ari_app

    def deliver(self, event: dict[str, Any]) -> None:
        self.queue.put_nowait(event)

    def channel_ids(self) -> set[str]:
        return {self.channel_id, *self.agents}

    async def run(self) -> None:
        bound = log.bind(call_id=self.state.call.call_id, consent_id=self.state.consent_id)
        try:
            while not self.ended:
                event = await self.queue.get()
                try:
                    await self._handle(event)
                except (AriError, AmiError, OSError) as error:
                    bound.warning("midcall.action_failed", event_type=event.get("type"), error=str(error))
        finally:
            if self._resume_timer is not None:
                self._resume_timer.cancel()
            await self._cleanup()

    async def _handle(self, event: dict[str, Any]) -> None:
        channel = event["channel"].get("id") if isinstance(event.get("channel"), dict) else None
        log.debug("midcall.event", type=event.get("type"), channel=channel)
        match event.get("type"):
            case "ChannelEnteredBridge":
                bridge = event.get("bridge") if isinstance(event.get("bridge"), dict) else {}
                await self._on_bridge(bridge, channel)
            case "ChannelVarset" if event.get("variable") == "BRIDGEPEER" and channel == self.channel_id:
                # Bridge events come on the bridge's topic, not the channel's; Asterisk sets
                # BRIDGEPEER whenever the caller is bridged (answer, transfer), so find that bridge.
                if event.get("value"):
                    await self._find_bridge()
            case "ChannelLeftBridge" if channel in self.agents:
                self.agents.discard(channel)
            case "ChannelDtmfReceived" if channel in self.channel_ids():
                role = Role.CALLER if channel == self.channel_id else Role.AGENT
                matcher = self.matchers.setdefault(channel, CodeMatcher(self.gate.settings.dialog))
                action = matcher.feed(str(event.get("digit", "")), time.monotonic())
                if action is not None:
                    plan = self.state.plan(action, role, self.gate.settings.dialog, utcnow())
                    log.info("midcall.code", action=action.value, role=role.value, acted=plan is not None)
                    if plan is not None:
                        await self._carry_out(plan)
            case "ChannelDestroyed" | "ChannelHangupRequest" if channel == self.channel_id:
                self.ended = True
            case "ChannelDestroyed" if channel in self.agents:
                self.agents.discard(channel)

    async def _find_bridge(self, attempts: int = 20, interval: float = 0.1) -> None:
        for _ in range(attempts):
            bridges = await self.client.request("GET", "/bridges") or []
            for bridge in bridges:
                if self.channel_id in bridge.get("channels", []):
                    await self._on_bridge(bridge, None)
                    return
            await asyncio.sleep(interval)  # Dial answered; the bridge follows within milliseconds
        log.warning("midcall.no_bridge_found", channel=self.channel_id)

    async def _on_bridge(self, bridge: dict[str, Any], entered: str | None) -> None:
        bridge_id = str(bridge.get("id") or "")
        if bridge_id and bridge_id not in self.bridges and self.channel_id in bridge.get("channels", []):
            self.bridges.add(bridge_id)
            await self._subscribe(f"bridge:{bridge_id}")
        if bridge_id not in self.bridges:
            return
        for other in bridge.get("channels", []):
            if other != self.channel_id and other not in self.agents and not other.startswith("cg-snoop-"):
                self.agents.add(other)
                try:
                    await self._subscribe(f"channel:{other}")  # the agent's keys (secure pause)
                except AriError as error:
                    log.warning("midcall.agent_subscribe_failed", channel=other, error=str(error))
                # The agent (first answer, or the new one after a transfer) hears how this call is handled.
                for notice in self.state.agent_greeting():
                    self._whisper_later(other, notice)

    async def _carry_out(self, plan: Plan) -> None:
        if plan.stop_recording and self.ami is not None:
            await self.ami.action("StopMixMonitor", Channel=self.channel_name)
        if plan.mute is not None and self.ami is not None:
            await self.ami.action("MixMonitorMute", Channel=self.channel_name, Direction="both",
                                  State="1" if plan.mute else "0")
        deleted = self._delete_recording() if plan.delete_recording else []
        if plan.ledger_event is not None:
            detail = dict(plan.detail)
            if plan.delete_recording:
                detail["deleted_files"] = len(deleted)
            await self.gate.ledger.append(self.state.event(self.gate, plan.ledger_event, self.source, **detail))
        if plan.action is Action.PAUSE:
            self._resume_timer = asyncio.create_task(self._auto_resume(self.gate.settings.dialog.pause_limit))
        elif plan.action in (Action.RESUME, Action.WITHDRAW) and self._resume_timer is not None:
            if self._resume_timer is not asyncio.current_task():
                self._resume_timer.cancel()
            self._resume_timer = None
        if plan.caller_notice:
            self._whisper_later(self.channel_id, plan.caller_notice)
        if plan.agent_notice:
            for agent in self.agents:
                self._whisper_later(agent, plan.agent_notice)

    async def _auto_resume(self, limit: float) -> None:
        await asyncio.sleep(limit)  # the PCI pause limit itself, not synchronisation
        plan = self.state.auto_resume(utcnow())
        if plan is not None:
            with contextlib.suppress(AriError, AmiError, OSError):
                await self._carry_out(plan)

    def _delete_recording(self) -> list[str]:
        """Withdrawn means gone: the mix and any legs.  Names are built from the opaque id only."""
        try:
            files = recording_files(self.gate.settings.recordings_dir, self.state.recording_id or "")
        except ValueError:
            return []
        return delete_recording_files(files)

    def _whisper_later(self, channel_id: str, prompt_name: str) -> None:
        """Notices run in their own tasks so a long prompt does not delay the next key."""
        previous = self.notice_chain.get(channel_id)
        self.notice_chain[channel_id] = asyncio.ensure_future(self._whisper(channel_id, prompt_name, previous))

    async def _whisper(self, channel_id: str, prompt_name: str, previous: asyncio.Future[None] | None) -> None:
        if previous is not None:  # notices to one party play one after the other
            with contextlib.suppress(Exception):
                await previous
        try:
            prompt = self.gate.prompt(self.state.language, prompt_name)
        except PromptError as error:
            log.warning("midcall.notice_missing", prompt=prompt_name, error=str(error))
            return
        snoop_id = f"cg-snoop-{uuid.uuid4().hex[:16]}"
        playback_id = f"cg-{uuid.uuid4().hex}"
        loop = asyncio.get_running_loop()
        finished = loop.create_future()
        ready = self.snoops[snoop_id] = loop.create_future()
        self.playbacks[playback_id] = finished
        try:
            await self.client.request("POST", f"/channels/{channel_id}/snoop", params={
                "app": self.app, "appArgs": SNOOP_ARG, "spy": "none", "whisper": "out", "snoopId": snoop_id})
            await asyncio.wait_for(ready, WHISPER_READY_TIMEOUT)
            await self.client.play(snoop_id, f"sound:{prompt.media}", playback_id=playback_id)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(finished, WHISPER_TIMEOUT)
        except (AriError, asyncio.TimeoutError) as error:
            log.warning("midcall.whisper_failed", prompt=prompt_name, error=str(error) or "snoop not ready")
        finally:
            self.playbacks.pop(playback_id, None)
            self.snoops.pop(snoop_id, None)
            with contextlib.suppress(AriError):
                await self.client.hangup(snoop_id)

    def snoop_started(self, snoop_id: str) -> bool:
        ready = self.snoops.get(snoop_id)
        if ready is not None and not ready.done():
            ready.set_result(None)
            return True
        return False

    def playback_finished(self, playback_id: str) -> bool:
        finished = self.playbacks.get(playback_id)
        if finished is not None and not finished.done():
            finished.set_result(None)
            return True
        return False

    async def subscribe_caller(self) -> None:
        """Keys and bridge changes of the caller's channel for the rest of the call (also once it
        has left Stasis)."""
        await self._subscribe(f"channel:{self.channel_id}")

    async def _subscribe(self, source: str) -> None:
        log.debug("midcall.subscribe", source=source)
        await self.client.request("POST", f"/applications/{self.app}/subscription", params={"eventSource": source})

    async def _cleanup(self) -> None:
        for notice in self.notice_chain.values():
            notice.cancel()
        sources = [f"channel:{c}" for c in self.channel_ids()] + [f"bridge:{b}" for b in self.bridges]
        for source in sources:
            with contextlib.suppress(AriError, OSError):
                await self.client.request("DELETE", f"/applications/{self.app}/subscription",
                                          params={"eventSource": source})

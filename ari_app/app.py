"""The ARI application: routes events to per-call sessions and owns their lifetimes."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import structlog

from consent_gate.dialog import CallInfo, DialogResult, GateContext, parse_purposes
from consent_gate.events import Decision
from consent_gate.midcall import MidCallState

from . import metrics
from .ami import AmiClient
from .call import CallSession, release_unrecorded
from .midcall import SNOOP_ARG, CallWatch
from .transport import AriClient, AriError

log = structlog.get_logger(__name__)

# After StasisEnd a session gets this long to finish its shielded work before it is cancelled.
CLEANUP_GRACE = 5.0
# Longer than the longest prompt a dead process may have left playing.
ORPHAN_RELEASE_TIMEOUT = 60.0


@dataclass
class ConsentGateApp:
    client: AriClient
    gate: GateContext
    ami: AmiClient | None = None
    sessions: dict[str, CallSession] = field(default_factory=dict)
    watches: dict[str, CallWatch] = field(default_factory=dict)
    _reapers: set[asyncio.Task[None]] = field(default_factory=set)
    connected: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        """Consume ARI events until cancelled; on cancel, release every live call (fail closed)."""
        try:
            async with contextlib.aclosing(self.client.events()) as events:
                async for event in events:
                    await self.dispatch(event)
        finally:
            await self.shutdown()

    async def dispatch(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        match kind:
            case "TransportConnected":
                self.connected.set()
                metrics.ari_connected()
                await self._release_orphans()
            case "TransportDisconnected":
                self.connected.clear()
                metrics.ari_disconnected()
                # A PlaybackFinished or DTMF may have been lost: every open dialog fails closed.
                for session in list(self.sessions.values()):
                    session.deliver(event)
            case "StasisStart":
                self._on_stasis_start(event)
            case "PlaybackFinished" if self._whisper_finished(event):
                pass
            case _:
                channel_id = _channel_id(event)
                session = self.sessions.get(channel_id) if channel_id else None
                if session is not None and not session.handed_over:
                    session.deliver(event)
                    if kind in ("StasisEnd", "ChannelDestroyed"):
                        self._schedule_cleanup(session)
                    return
                bridge_id = str(_object(event.get("bridge")).get("id") or "")
                for watch in self.watches.values():
                    if channel_id in watch.channel_ids() or (bridge_id and bridge_id in watch.bridges):
                        watch.deliver(event)

    def _on_stasis_start(self, event: dict[str, Any]) -> None:
        channel = _object(event.get("channel"))
        channel_id = str(channel.get("id") or "")
        if not channel_id or channel_id in self.sessions:
            return
        args = event.get("args") if isinstance(event.get("args"), list) else []
        purpose_name = str(args[0]) if args else ""
        if purpose_name == SNOOP_ARG:
            # Our own whisper channel: its CallWatch plays the notice once it is in Stasis.
            for watch in self.watches.values():
                if watch.snoop_started(channel_id):
                    break
            return
        caller = _object(channel.get("caller"))
        call = CallInfo(
            call_id=channel_id,
            caller_number=str(caller.get("number") or ""),
            language=str(channel.get("language") or ""),
        )
        session = CallSession(
            client=self.client, gate=self.gate, channel_id=channel_id, call=call,
            purposes=parse_purposes(purpose_name, self.gate.settings),
            channel_name=str(channel.get("name") or ""), on_decided=self._watch_call, ami=self.ami,
        )
        self.sessions[channel_id] = session
        session.task = asyncio.create_task(self._run_session(session), name=f"call-{channel_id}")

    async def _run_session(self, session: CallSession) -> None:
        try:
            await session.run()
        finally:
            self.sessions.pop(session.channel_id, None)

    def _whisper_finished(self, event: dict[str, Any]) -> bool:
        playback_id = str(_object(event.get("playback")).get("id") or "")
        return any(watch.playback_finished(playback_id) for watch in self.watches.values())

    async def _watch_call(self, session: CallSession, result: DialogResult) -> None:
        """The rest of the call: withdrawal, caller-records notice, secure pause, agent notices.
        Runs before the channel leaves Stasis: the subscription is in place before it does."""
        purpose = self.gate.settings.purpose(result.purpose)
        if purpose is None or result.status is Decision.ABANDONED:
            return
        state = MidCallState.after_dialog(session.call, purpose, result, session.state.language)
        watch = CallWatch(self.client, self.ami, self.gate, session.channel_id, session.channel_name, state)
        await watch.subscribe_caller()
        self.watches[session.channel_id] = watch
        for event in session.hand_over_events():
            if event.get("type") == "ChannelDtmfReceived":
                watch.deliver(event)  # keyed while the decision was being stored
        watch.task = asyncio.create_task(watch.run(), name=f"watch-{session.channel_id}")
        watch.task.add_done_callback(lambda _: self.watches.pop(session.channel_id, None))

    def _schedule_cleanup(self, session: CallSession) -> None:
        """Cancel a session that outlives its channel by more than the grace period."""
        task = session.task
        if task is None or task.done():
            return

        async def reap() -> None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), CLEANUP_GRACE)
            if not task.done():
                task.cancel()

        reaper = asyncio.create_task(reap())
        self._reapers.add(reaper)
        reaper.add_done_callback(self._reapers.discard)

    async def _release_orphans(self) -> None:
        """Channels left in our app by an earlier process (crash, restart) go on without recording."""
        try:
            info = await self.client.request("GET", f"/applications/{self.client_app}")
        except AriError as error:
            log.warning("ari.orphan_scan_failed", error=str(error))
            return
        for channel_id in (info or {}).get("channel_ids", []):
            if channel_id in self.sessions or any(channel_id in w.channel_ids() for w in self.watches.values()):
                continue
            try:
                channel = await self.client.request("GET", f"/channels/{channel_id}")
            except AriError:
                continue
            if (channel or {}).get("dialplan", {}).get("app_name") != "Stasis":
                # Subscribed by an earlier process for mid-call keys, not waiting in Stasis.
                with contextlib.suppress(AriError):
                    await self.client.request("DELETE", f"/applications/{self.client_app}/subscription",
                                              params={"eventSource": f"channel:{channel_id}"})
                continue
            log.warning("ari.orphan_released", channel=channel_id)
            # Its own task: without AMI, ARI runs the release behind the dead process's playback
            # (up to the prompt's length), and new calls' events must not wait for that.
            name = str((channel or {}).get("name") or "")
            release = asyncio.create_task(self._release_orphan(channel_id, name), name=f"orphan-{channel_id}")
            self._reapers.add(release)
            release.add_done_callback(self._reapers.discard)

    async def _release_orphan(self, channel_id: str, channel_name: str) -> None:
        """Fail closed: the caller goes on unrecorded, even if the dead process had already
        handed back a grant; with AMI at once, even while its question still plays."""
        try:
            await release_unrecorded(self.client, channel_id, fallback_timeout=ORPHAN_RELEASE_TIMEOUT,
                                     ami=self.ami, channel_name=channel_name)
        except AriError as error:
            # Never continued: a channel whose result could still say "granted" stays put.
            log.warning("ari.orphan_release_failed", channel=channel_id, error=str(error))

    @property
    def client_app(self) -> str:
        return self.gate.settings.ari_app

    async def shutdown(self) -> None:
        tasks = [s.task for s in self.sessions.values() if s.task is not None]
        tasks += [w.task for w in self.watches.values() if w.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        for reaper in list(self._reapers):
            reaper.cancel()
        if self._reapers:
            await asyncio.wait(list(self._reapers), timeout=1)


def _object(value: Any) -> dict[str, Any]:
    """A sub-object of an event, or {} when a malformed frame put something else there."""
    return value if isinstance(value, dict) else {}


def _channel_id(event: dict[str, Any]) -> str | None:
    channel = event.get("channel")
    if isinstance(channel, dict) and channel.get("id"):
        return str(channel["id"])
    playback = event.get("playback")
    if isinstance(playback, dict):
        target = str(playback.get("target_uri") or "")
        if target.startswith("channel:"):
            return target.removeprefix("channel:")
    return None

"""One caller in the consent dialog: one task, one queue, one state object.

The app routes every ARI event for the channel into ``CallSession.queue``; the session's task
runs the core dialog (``consent_gate.dialog``) with this class as its :class:`DialogPort`.
Whatever goes wrong — an exception, cancellation, the transport dropping — the session releases
the channel back to the dialplan with ``CONSENT_STATUS=unavailable`` (shielded, time-limited),
so a caller is never stuck and never recorded without a stored grant.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import structlog

from consent_gate.config import Purpose
from consent_gate.dialog import (
    CallerHungUp,
    CallInfo,
    DialogResult,
    RESULT_VARIABLE,
    DialogState,
    GateContext,
    PromptRef,
    run_gate,
)
from consent_gate.events import Decision

from . import metrics
from .ami import AmiClient, AmiError
from .transport import AriClient, AriError, ChannelGone

log = structlog.get_logger(__name__)

RELEASE_TIMEOUT = 3.0
# Where the service sends a call it will not finish: [consent-gate-released] clears the result,
# so nothing handed back before can start a recording, then applies and returns like the gate.
RELEASE_CONTEXT = "consent-gate-released"
RELEASE_LABEL = "release"


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


@dataclass
class CallSession:
    """Per-call state and the DialogPort the core dialog talks to."""

    client: AriClient
    gate: GateContext
    channel_id: str
    call: CallInfo
    purposes: list[Purpose] | None
    source: str = "ari"
    channel_name: str = ""
    # Called with the decision before the channel goes back to the dialplan: the app starts the
    # mid-call watcher (and its channel subscription) there, so no key is lost in between.
    on_decided: Callable[["CallSession", DialogResult], Awaitable[None]] | None = None
    ami: AmiClient | None = None  # to release the caller at once if the dialog fails mid-prompt
    handed_over: bool = False
    state: DialogState = field(default_factory=DialogState)
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    pending_keys: collections.deque[str] = field(default_factory=collections.deque)
    hung_up: bool = False
    released: bool = False
    result: DialogResult | None = None
    started_monotonic: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None

    # -- event intake (called by the app's router) ----------------------------------------
    def deliver(self, event: dict[str, Any]) -> None:
        if event.get("type") in HANGUP_EVENTS:
            self.hung_up = True
        self.queue.put_nowait(event)

    # -- DialogPort ---------------------------------------------------------------------------
    async def play(self, prompt: PromptRef, *, stop_keys: str) -> str | None:
        if stop_keys and self.pending_keys:
            return self.pending_keys.popleft()  # keyed during the previous prompt: early answer
        playback_id = f"cg-{uuid.uuid4().hex}"
        try:
            await self.client.play(self.channel_id, f"sound:{prompt.media}", playback_id=playback_id)
        except ChannelGone:
            raise CallerHungUp() from None
        while True:
            event = await self._next_event(None)
            match event.get("type"):
                case "PlaybackFinished" if event.get("playback", {}).get("id") == playback_id:
                    return None
                case "ChannelDtmfReceived" if event.get("digit"):
                    digit = str(event.get("digit"))
                    if stop_keys and digit in stop_keys:
                        await self.client.stop_playback(playback_id)
                        return digit
                    self.pending_keys.append(digit)
                case _:
                    continue

    async def wait_key(self, timeout: float) -> str | None:
        if self.pending_keys:
            return self.pending_keys.popleft()
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return None
            event = await self._next_event(remaining)
            if event.get("type") == "Timeout":
                return None
            if event.get("type") == "ChannelDtmfReceived" and event.get("digit"):
                return str(event.get("digit"))

    async def _next_event(self, timeout: float | None) -> dict[str, Any]:
        if self.hung_up and self.queue.empty():
            raise CallerHungUp()
        try:
            event = await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return {"type": "Timeout"}
        if event.get("type") in HANGUP_EVENTS:
            raise CallerHungUp()
        if event.get("type") == "TransportDisconnected":
            raise TransportLost(str(event.get("reason", "")))
        return event

    # -- lifecycle ------------------------------------------------------------------------------
    async def run(self) -> None:
        bound = log.bind(call_id=self.call.call_id, channel=self.channel_id)
        try:
            if not self.purposes:
                bound.warning("consent.unknown_purpose")
                return
            await self.client.answer(self.channel_id)
            self.result = await run_gate(self, self.call, self.purposes, self.gate, self.state)
            if self.result.status is not Decision.ABANDONED:
                await self._hand_back(self.result)
        except (CallerHungUp, ChannelGone):
            bound.info("consent.channel_gone")
        except asyncio.CancelledError:
            await self._release_unavailable()
            raise
        except Exception as error:  # fail closed: any bug or ARI failure means "no recording"
            bound.error("consent.dialog_failed", error=repr(error))
        finally:
            if not self.released:
                await self._release_unavailable()
            metrics.observe_call(self)

    async def _hand_back(self, result: DialogResult) -> None:
        """Hand the result back in one variable (one request, atomic) and continue."""
        if self.on_decided is not None:
            await self.on_decided(self, result)
        await self.client.set_var(self.channel_id, RESULT_VARIABLE, result.packed())
        await self.client.continue_in_dialplan(self.channel_id)
        self.released = True

    def hand_over_events(self) -> list[dict[str, Any]]:
        """From now on the channel's events go to its watcher; returns what is still queued."""
        self.handed_over = True
        pending = []
        while not self.queue.empty():
            pending.append(self.queue.get_nowait())
        return pending

    async def _release_unavailable(self) -> None:
        """Shielded, time-limited: put the channel back into the dialplan without a recording."""
        if self.released or self.hung_up:
            self.released = True
            return
        self.released = True

        async def release() -> None:
            with contextlib.suppress(AriError, OSError, asyncio.TimeoutError):
                await release_unrecorded(self.client, self.channel_id, fallback_timeout=RELEASE_TIMEOUT,
                                         ami=self.ami, channel_name=self.channel_name)

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.shield(asyncio.wait_for(release(), RELEASE_TIMEOUT))

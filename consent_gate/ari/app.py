"""The ARI application: turns StasisStart into calls, routes every other event by index
(``consent_gate.ari.router``) and owns the calls' lifetimes."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import structlog

from consent_gate import contract
from consent_gate.ari.ami import AmiClient
from consent_gate.ari.call import Call, CallState, release_unrecorded
from consent_gate.ari.metrics import ServiceMetrics
from consent_gate.ari.router import Router, event_channel, sub_object
from consent_gate.ari.transport import AriClient, AriError
from consent_gate.ari.watch import SNOOP_ARG
from consent_gate.contract import (
    CALLER_RECORDS_VARIABLE,
    ID_VARIABLE,
    PURPOSE_VARIABLE,
    PURPOSES_VARIABLE,
    RECORDING_ID_VARIABLE,
    STATUS_VARIABLE,
)
from consent_gate.core.dialog import CallInfo, DialogResult, GateContext, parse_purposes
from consent_gate.core.events import Decision

log = structlog.get_logger(__name__)

# After StasisEnd a call still in its dialog gets this long to finish its shielded work before
# it is cancelled.  (A call that handed its result back lives on until the hangup.)
CLEANUP_GRACE = 5.0
# Longer than the longest prompt a dead process may have left playing.
ORPHAN_RELEASE_TIMEOUT = 60.0


@dataclass
class ConsentGateApp:
    client: AriClient
    gate: GateContext
    ami: AmiClient | None = None
    router: Router = field(default_factory=Router)
    calls: set[Call] = field(default_factory=set)
    _helpers: set[asyncio.Task[None]] = field(default_factory=set)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    cleanup_grace: float = CLEANUP_GRACE
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)

    async def run(self) -> None:
        """Consume ARI events until cancelled; on cancel, release every live call (fail closed)."""
        try:
            async with contextlib.aclosing(self.client.events()) as events:
                async for event in events:
                    await self.dispatch(event)
        finally:
            await self.shutdown()

    async def dispatch(self, event: dict[str, Any]) -> None:
        match event.get("type"):
            case "TransportConnected":
                self.connected.set()
                self.metrics.ari_connected()
                self._in_background(self._adopt_or_release_orphans(), "orphans")
            case "TransportDisconnected":
                self.connected.clear()
                self.metrics.ari_disconnected()
                # A PlaybackFinished or DTMF may have been lost: every open dialog fails closed.
                for call in self.calls:
                    if call.state in (CallState.ANSWERING, CallState.ASKING, CallState.STORING):
                        call.deliver(event)
            case "StasisStart":
                self._on_stasis_start(event)
            case _:
                self.router.route(event)
                if event.get("type") in ("StasisEnd", "ChannelDestroyed"):
                    channel_id = event_channel(event)
                    for handler in self.router.handlers(f"channel:{channel_id}"):
                        if isinstance(handler, Call) and handler.channel_id == channel_id:
                            self._schedule_cleanup(handler)

    def count_dialogs(self) -> int:
        return sum(1 for call in self.calls if call.state not in (CallState.WATCHING, CallState.ENDED))

    def count_watches(self) -> int:
        return sum(1 for call in self.calls if call.state is CallState.WATCHING)

    def _on_stasis_start(self, event: dict[str, Any]) -> None:
        channel = sub_object(event.get("channel"))
        channel_id = str(channel.get("id") or "")
        if not channel_id:
            return
        args = event.get("args") if isinstance(event.get("args"), list) else []
        purpose_name = str(args[0]) if args else ""
        if purpose_name == SNOOP_ARG:
            # Our own whisper channel: the call that made it plays the notice once it is in Stasis.
            self.router.route(event)
            return
        if any(call.channel_id == channel_id and call.state not in (CallState.WATCHING, CallState.ENDED)
               for call in self.calls):
            return  # a duplicate StasisStart for a dialog that runs already
        caller = sub_object(channel.get("caller"))
        number = contract.valid_caller_text(str(caller.get("number") or ""))
        if number is None:
            # Refused, not cleaned: the call goes on as from an unknown number (no pseudonym).
            log.warning("consent.caller_number_refused", channel=channel_id, reason="control character or too long")
        info = CallInfo(
            call_id=channel_id,
            caller_number=number or "",
            language=str(channel.get("language") or ""),
        )
        call = Call(
            client=self.client, gate=self.gate, router=self.router, channel_id=channel_id, info=info,
            purposes=parse_purposes(purpose_name, self.gate.settings),
            channel_name=str(channel.get("name") or ""), ami=self.ami, metrics=self.metrics,
        )
        self._start(call)

    def _start(self, call: Call) -> None:
        self.calls.add(call)
        call.task = asyncio.create_task(self._run_call(call), name=f"call-{call.channel_id}")

    async def _run_call(self, call: Call) -> None:
        try:
            await call.run()
        finally:
            self.calls.discard(call)  # by identity: a newer call on the same channel stays

    def _schedule_cleanup(self, call: Call) -> None:
        """Cancel a call still in its dialog that outlives its channel by more than the grace period."""
        task = call.task
        if task is None or task.done() or call.state in (CallState.WATCHING, CallState.ENDED):
            return

        async def reap() -> None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), self.cleanup_grace)
            # Decided now, not when the event came: the StasisEnd of a continue arrives while
            # the call is still handing back, and a watching call lives on until the hangup.
            if not task.done() and call.state not in (CallState.WATCHING, CallState.ENDED):
                task.cancel()

        self._in_background(reap(), f"reap-{call.channel_id}")

    def _in_background(self, work: Any, name: str) -> None:
        helper = asyncio.create_task(work, name=name)
        self._helpers.add(helper)
        helper.add_done_callback(self._helpers.discard)

    # -- after a restart -------------------------------------------------------------------------
    async def _adopt_or_release_orphans(self) -> None:
        """Channels left in our app by an earlier process (crash, restart): a caller still in
        Stasis goes on without recording; a call that had handed its result back gets its
        mid-call rights back (withdrawal, pause), rebuilt from its channel variables."""
        try:
            info = await self.client.request("GET", f"/applications/{self.client_app}")
        except AriError as error:
            log.warning("ari.orphan_scan_failed", error=str(error))
            return
        known = {call.channel_id for call in self.calls}
        for channel_id in sub_object(info).get("channel_ids", []):
            if not isinstance(channel_id, str) or channel_id in known or channel_id.startswith("cg-snoop-"):
                continue
            try:
                channel = await self.client.get_channel(channel_id)
            except AriError:
                continue
            if channel is None:
                continue
            if sub_object(channel.get("dialplan")).get("app_name") != "Stasis":
                await self._adopt(channel_id, channel)
                continue
            log.warning("ari.orphan_released", channel=channel_id)
            # Its own task: without AMI, ARI runs the release behind the dead process's playback
            # (up to the prompt's length), and new calls' events must not wait for that.
            name = str(channel.get("name") or "")
            self._in_background(self._release_orphan(channel_id, name), f"orphan-{channel_id}")

    async def _adopt(self, channel_id: str, channel: dict[str, Any]) -> None:
        """A call an earlier process handed back and watched: watch it again."""
        try:
            fields = contract.unpack_result(await self.client.get_var(channel_id, contract.RESULT_VARIABLE))
            withdrawn = await self.client.get_var(channel_id, contract.WITHDRAWN_VARIABLE) == "1"
            caller_records = await self.client.get_var(channel_id, contract.CALLER_RECORDS_VARIABLE) == "1"
            paused_at = contract.valid_time(await self.client.get_var(channel_id, contract.PAUSED_AT_VARIABLE))
        except AriError as error:
            log.warning("ari.adopt_failed", channel=channel_id, error=str(error))
            return
        purpose = self.gate.settings.purpose(fields[PURPOSE_VARIABLE]) if fields else None
        if fields is None or purpose is None:
            # Not ours to watch (or unreadable): drop the earlier process's subscription.
            with contextlib.suppress(AriError):
                await self.client.request("DELETE", f"/applications/{self.client_app}/subscription",
                                          params={"eventSource": f"channel:{channel_id}"})
            return
        caller = sub_object(channel.get("caller"))
        info = CallInfo(call_id=channel_id, caller_number=str(caller.get("number") or ""),
                        language=str(channel.get("language") or ""))
        status = Decision(fields[STATUS_VARIABLE])
        result = DialogResult(
            status=status, consent_id=fields[ID_VARIABLE],
            recording_id=(fields[RECORDING_ID_VARIABLE] or None) if status in (
                Decision.GRANTED, Decision.NOTIFIED) else None,
            confirmation=None, caller_records=fields[CALLER_RECORDS_VARIABLE] == "1" or caller_records,
            purpose=purpose.name, purposes=[name for name in fields[PURPOSES_VARIABLE].split(",") if name])
        call = Call(client=self.client, gate=self.gate, router=self.router, channel_id=channel_id, info=info,
                    purposes=[purpose], channel_name=str(channel.get("name") or ""), ami=self.ami,
                    metrics=self.metrics)
        try:
            await call.adopt(result, withdrawn=withdrawn, paused_at=paused_at)
        except AriError as error:
            self.router.remove_all(call)
            log.warning("ari.adopt_failed", channel=channel_id, error=str(error))
            return
        log.info("ari.call_adopted", channel=channel_id, consent_id=fields[ID_VARIABLE], status=str(status),
                 withdrawn=withdrawn, paused=paused_at is not None)
        self._start(call)

    async def _release_orphan(self, channel_id: str, channel_name: str) -> None:
        """Fail closed: the caller goes on unrecorded, even if the dead process had already
        handed back a grant; with AMI at once, even while its question still plays."""
        try:
            await release_unrecorded(self.client, channel_id, fallback_timeout=ORPHAN_RELEASE_TIMEOUT,
                                     ami=self.ami, channel_name=channel_name)
        except AriError as error:
            # Never continued: a channel whose result could still say "granted" stays put.
            log.warning("ari.orphan_release_failed", channel=channel_id, error=str(error))

    async def background_done(self) -> None:
        """Until the background work started so far (reapers, orphan scans) has finished."""
        while self._helpers:
            await asyncio.wait(list(self._helpers))

    @property
    def client_app(self) -> str:
        return self.gate.settings.ari_app

    async def shutdown(self) -> None:
        tasks = [call.task for call in self.calls if call.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        for helper in list(self._helpers):
            helper.cancel()
        if self._helpers:
            await asyncio.wait(list(self._helpers), timeout=1)

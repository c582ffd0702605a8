"""A minimal asyncio AMI client: just enough to stop and mute MixMonitor mid-call.

ARI cannot stop or mute a MixMonitor that the dialplan started; AMI's ``StopMixMonitor`` and
``MixMonitorMute`` actions can (wazo-calld drives MixMonitor over AMI for the same reason).
Events are switched off at login: this client only sends actions and reads their responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger(__name__)


class AmiError(RuntimeError):
    pass


@dataclass(frozen=True)
class AmiConfig:
    host: str
    port: int
    username: str
    secret: str = field(repr=False)
    timeout: float = 3.0


def _encode(action: str, fields: dict[str, str]) -> bytes:
    lines = [f"Action: {action}"]
    for key, value in fields.items():
        if any(c in str(value) for c in "\r\n"):
            raise AmiError(f"AMI field {key} contains a line break")
        lines.append(f"{key}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class AmiClient:
    """Connects and logs in on first use; one action at a time; reconnects after a failure."""

    def __init__(self, config: AmiConfig) -> None:
        self._config = config
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def _connect(self) -> None:
        cfg = self._config
        reader, self._writer = await asyncio.wait_for(asyncio.open_connection(cfg.host, cfg.port), cfg.timeout)
        self._reader = reader
        await asyncio.wait_for(reader.readline(), cfg.timeout)  # "Asterisk Call Manager/x.y"
        reply = await self._send("Login", {"Username": cfg.username, "Secret": cfg.secret, "Events": "off"})
        if reply.get("Response") != "Success":
            await self.close()
            raise AmiError(f"AMI login as {cfg.username!r} refused: {reply.get('Message', '')}")

    async def _send(self, action: str, fields: dict[str, str]) -> dict[str, str]:
        assert self._reader is not None and self._writer is not None
        action_id = f"cg-{next(self._ids)}"
        self._writer.write(_encode(action, {**fields, "ActionID": action_id}))
        await self._writer.drain()
        while True:
            message = await asyncio.wait_for(self._read_message(), self._config.timeout)
            if message.get("ActionID") == action_id:
                return message

    async def _read_message(self) -> dict[str, str]:
        assert self._reader is not None
        message: dict[str, str] = {}
        while True:
            line = await self._reader.readline()
            if not line:
                raise AmiError("AMI connection closed")
            text = line.decode(errors="replace").rstrip("\r\n")
            if not text:
                if message:
                    return message
                continue
            key, _, value = text.partition(":")
            message[key.strip()] = value.strip()

    async def action(self, action: str, **fields: str) -> dict[str, str]:
        """Send one action; returns the response (raises AmiError if it is not a success)."""
        async with self._lock:
            for attempt in (1, 2):
                try:
                    if self._writer is None:
                        await self._connect()
                    reply = await self._send(action, fields)
                    break
                except (TimeoutError, OSError, AmiError) as error:
                    await self.close()
                    if attempt == 2:
                        raise AmiError(f"AMI {action} failed: {error}") from error
                    log.info("ami.reconnect", action=action, error=str(error))
        if reply.get("Response") != "Success":
            raise AmiError(f"AMI {action} refused: {reply.get('Message', '')}")
        return reply

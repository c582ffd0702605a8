"""ARI transport: a small asyncio client for the Asterisk REST Interface.

Why our own: ari-py does not import on Python 3, asyncari and ari-client mishandle a
websocket drop, aioari is unmaintained. This layer only moves bytes; call logic lives
elsewhere.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import structlog
from yarl import URL

log = structlog.get_logger(__name__)

__all__ = ["AriClient", "AriConfig", "AriError", "ChannelGone", "backoff_delay"]

# 404 on these resources means "the channel (or its playback) no longer exists", which
# in practice means the caller hung up. Other 404s (e.g. unknown route) are plain errors.
_GONE_PATH = re.compile(r"^/(channels|playbacks)/[^/?]+")

# Transport-level failures (no HTTP response at all) that are worth retrying/reporting.
_NET_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)


class AriError(Exception):
    """A failed ARI REST call. status is the HTTP status, or 0 if no response arrived."""

    def __init__(self, status: int, method: str, path: str, body: Any = None) -> None:
        self.status = status
        self.method = method
        self.path = path
        self.body = body
        detail = body.get("message", body) if isinstance(body, dict) else body
        what = f"HTTP {status}" if status else "no response"
        super().__init__(f"ARI {method} {path} failed: {what}: {str(detail)[:200]}")


class ChannelGone(AriError):
    """404 on /channels/{id}... or /playbacks/{id}: the channel hung up under us."""


@dataclass(frozen=True)
class AriConfig:
    base_url: str  # e.g. "http://127.0.0.1:8088" (no trailing /ari)
    username: str
    # repr=False: configs end up in logs and tracebacks; the password must not.
    password: str = field(repr=False)
    app: str
    request_timeout: float = 5.0
    reconnect_initial: float = 0.2
    reconnect_max: float = 5.0
    # Ping interval on the events websocket: without it a silently dead peer (NAT drop,
    # pulled cable) would leave us "connected" forever with calls stuck open.
    heartbeat: float | None = 10.0


def backoff_delay(attempt: int, initial: float, maximum: float) -> float:
    """Exponential backoff with jitter in [d/2, d], d = min(maximum, initial * 2**attempt).

    Jitter keeps several app instances from hammering a restarted Asterisk in lockstep.
    """
    delay = min(maximum, initial * 2.0 ** min(attempt, 30))
    return delay * random.uniform(0.5, 1.0)


def _describe(exc: BaseException) -> str:
    # str(), never repr(): aiohttp exception reprs embed request_info with headers,
    # i.e. the Authorization header (our password, base64-encoded).
    return f"{type(exc).__name__}: {exc}"


def _clean_params(params: dict[str, Any] | None) -> dict[str, str]:
    # None means "omit"; yarl rejects bools and ARI wants lowercase "true"/"false".
    return {
        k: (str(v).lower() if isinstance(v, bool) else str(v))
        for k, v in (params or {}).items()
        if v is not None
    }


def _decode_body(raw: bytes) -> Any:
    text = raw.decode("utf-8", errors="replace")
    try:
        return json.loads(text) if text else None
    except ValueError:  # ARI errors are JSON, but a proxy or odd build may send text
        return text


class AriClient:
    """One ARI connection: REST calls plus a self-healing events websocket."""

    def __init__(self, config: AriConfig) -> None:
        self._config = config
        base = config.base_url.rstrip("/")
        self._rest_base = base + "/ari"
        self._ws_url = re.sub(r"^http", "ws", base) + "/ari/events"
        # Header auth (not api_key in the URL) so credentials never show up in URLs we log.
        token = base64.b64encode(f"{config.username}:{config.password}".encode()).decode()
        self._auth_header = {"Authorization": f"Basic {token}"}
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._closed = asyncio.Event()
        self._streaming = False

    async def __aenter__(self) -> AriClient:
        # Total timeout is per REST call (see request); the session itself has none, so
        # the long-lived websocket is not killed by a session-wide deadline.
        self._session = aiohttp.ClientSession(
            headers=self._auth_header,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._config.request_timeout),
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close websocket and session; a running events() iteration ends promptly."""
        self._closed.set()
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()
        if self._session is not None:
            await self._session.close()

    @property
    def connected(self) -> bool:
        """True while the events websocket is open."""
        return self._ws is not None and not self._ws.closed

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._closed.is_set():
            raise RuntimeError("AriClient is not open; use 'async with AriClient(...)'")
        return self._session

    async def request(
        self, method: str, path: str, *, params: dict[str, Any] | None = None,
        json: Any = None, gone_ok: bool = False, timeout: float | None = None,
    ) -> Any:
        """Call ARI: path like "/channels/ID/answer" (ids already quoted by the caller).

        Returns the decoded JSON body (None when empty). Raises ChannelGone on a 404 for a
        channel/playback (or returns None if gone_ok: "404 on hangup is success"), AriError
        on any other non-2xx or when no response arrives (status 0).
        """
        session = self._require_session()
        method = method.upper()
        # encoded=True: the wrappers already quoted the ids; yarl must not re-quote them.
        url = URL(self._rest_base + path, encoded=True)
        try:
            # A per-call timeout for commands ARI queues behind a playback (orphan release).
            limit = aiohttp.ClientTimeout(total=timeout or self._config.request_timeout)
            async with session.request(
                method, url, params=_clean_params(params), json=json, timeout=limit
            ) as resp:
                status = resp.status
                body = _decode_body(await resp.read())
        except _NET_ERRORS as exc:
            raise AriError(0, method, path, _describe(exc)) from exc
        if 200 <= status < 300:
            return body
        if status == 404 and _GONE_PATH.match(path):
            if gone_ok:
                log.debug("ari.gone_ok", method=method, path=path)
                return None
            raise ChannelGone(status, method, path, body)
        raise AriError(status, method, path, body)

    async def node_identity(self) -> tuple[str, str]:
        """(systemname, entity id) of this Asterisk.  The systemname (asterisk.conf [options];
        "" when unset) prefixes every channel uniqueid, so it keeps call ids apart when several
        nodes share one ledger; the entity id (``entityid``, by default from a MAC address)
        tells the nodes apart."""
        body = await self.request("GET", "/asterisk/info")
        body = body if isinstance(body, dict) else {}
        name = (body.get("config") or {}).get("name", "")
        entity = (body.get("system") or {}).get("entity_id", "")
        return (name if isinstance(name, str) else "", entity if isinstance(entity, str) else "")

    async def answer(self, channel_id: str) -> None:
        await self.request("POST", f"/channels/{_q(channel_id)}/answer")

    async def hangup(self, channel_id: str, reason: str = "normal") -> None:
        # gone_ok: the goal (channel not up) is already achieved if it hung up itself.
        await self.request(
            "DELETE", f"/channels/{_q(channel_id)}", params={"reason": reason}, gone_ok=True
        )

    async def play(
        self, channel_id: str, media: str | list[str], *, playback_id: str, lang: str | None = None
    ) -> dict[str, Any]:
        """Start playback with a caller-chosen id (so we can stop it without a race)."""
        # ARI takes a media list comma-separated; a repeated query key would keep only one.
        media_param = media if isinstance(media, str) else ",".join(media)
        result = await self.request(
            "POST",
            f"/channels/{_q(channel_id)}/play/{_q(playback_id)}",
            params={"media": media_param, "lang": lang},
        )
        return result if isinstance(result, dict) else {}

    async def stop_playback(self, playback_id: str) -> None:
        # gone_ok: a finished playback (or hung-up channel) is already stopped.
        await self.request("DELETE", f"/playbacks/{_q(playback_id)}", gone_ok=True)

    async def set_var(self, channel_id: str, name: str, value: str, *, timeout: float | None = None) -> None:
        params = {"variable": name, "value": value}
        await self.request("POST", f"/channels/{_q(channel_id)}/variable", params=params, timeout=timeout)

    async def get_var(self, channel_id: str, name: str) -> str | None:
        """Value of a channel variable, or None on 404.

        ARI answers 404 for an unset variable and for a vanished channel alike; callers that
        must know the channel is gone should rely on StasisEnd/ChannelDestroyed events.
        """
        result = await self.request(
            "GET", f"/channels/{_q(channel_id)}/variable", params={"variable": name}, gone_ok=True
        )
        value = result.get("value") if isinstance(result, dict) else None
        return None if value is None else str(value)

    async def continue_in_dialplan(
        self, channel_id: str, *, context: str | None = None, extension: str | None = None,
        priority: int | None = None, label: str | None = None, gone_ok: bool = True,
    ) -> None:
        # gone_ok: if the caller already hung up there is nothing left to continue.  ARI also
        # answers 404 for an unknown label; callers that must tell the two apart pass False.
        params = {"context": context, "extension": extension, "priority": priority, "label": label}
        path = f"/channels/{_q(channel_id)}/continue"
        await self.request("POST", path, params=params, gone_ok=gone_ok)

    async def get_channel(self, channel_id: str) -> dict[str, Any] | None:
        """The channel's snapshot, or None if it is gone."""
        body = await self.request("GET", f"/channels/{_q(channel_id)}", gone_ok=True)
        return body if isinstance(body, dict) else None

    async def events(self) -> AsyncGenerator[dict[str, Any], None]:
        """Yield ARI events forever, reconnecting on failure, until close() or the consumer stops.

        Synthetic {"type": "TransportConnected"} follows each (re)connect and
        {"type": "TransportDisconnected", "reason": ...} each drop of an established
        connection, so the app can fail calls closed (events may have been lost meanwhile).
        Failed connect attempts are only logged. Use with contextlib.aclosing() to release
        the socket deterministically when breaking out early.
        """
        session = self._require_session()
        if self._streaming:
            raise RuntimeError("events() is already being iterated on this client")
        self._streaming = True
        cfg = self._config
        attempt = 0
        first = True
        try:
            while True:
                if not first:
                    delay = backoff_delay(attempt, cfg.reconnect_initial, cfg.reconnect_max)
                    attempt += 1
                    log.info("ari.ws.reconnect_wait", delay=round(delay, 3))
                    if await self._wait_closed(delay):
                        return
                first = False
                if self._closed.is_set():
                    return
                try:
                    async with asyncio.timeout(cfg.request_timeout):
                        ws = await session.ws_connect(
                            self._ws_url,
                            params={"app": cfg.app, "subscribeAll": "false"},
                            heartbeat=cfg.heartbeat,
                            # bounded close handshake so close()/cancel never hang on a dead peer
                            timeout=aiohttp.ClientWSTimeout(ws_close=min(cfg.request_timeout, 2.0)),
                        )
                except _NET_ERRORS as exc:
                    if self._closed.is_set():
                        return
                    log.warning("ari.ws.connect_failed", url=self._ws_url, error=_describe(exc))
                    continue
                self._ws = ws
                attempt = 0  # reset backoff only after a successful connect
                log.info("ari.ws.connected", url=self._ws_url, app=cfg.app)
                try:
                    yield {"type": "TransportConnected"}
                    while True:
                        msg = await ws.receive()
                        if msg.type is aiohttp.WSMsgType.TEXT:
                            event = _parse_event(msg.data)
                            if event is not None:
                                yield event
                        elif msg.type is aiohttp.WSMsgType.BINARY:
                            log.warning("ari.ws.bad_frame", problem="binary", size=len(msg.data))
                        elif msg.type not in (aiohttp.WSMsgType.PING, aiohttp.WSMsgType.PONG):
                            break  # CLOSE / CLOSING / CLOSED / ERROR (e.g. no PONG)
                finally:
                    if self._ws is ws:
                        self._ws = None
                    await ws.close()
                if self._closed.is_set():
                    return
                err = ws.exception()
                reason = f"closed (code {ws.close_code})" + (f": {_describe(err)}" if err else "")
                log.warning("ari.ws.disconnected", reason=reason)
                yield {"type": "TransportDisconnected", "reason": reason}
        finally:
            self._streaming = False

    async def _wait_closed(self, delay: float) -> bool:
        """Sleep up to delay; True if close() happened meanwhile (so stop promptly)."""
        try:
            async with asyncio.timeout(delay):
                await self._closed.wait()
            return True
        except TimeoutError:
            return False


def _q(value: str) -> str:
    # safe="": a "/" in an id must not become a path separator.
    return quote(str(value), safe="")


def _parse_event(data: str) -> dict[str, Any] | None:
    """Decode one text frame; malformed ones are logged and dropped (never crash the loop)."""
    try:
        event = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        log.warning("ari.ws.bad_frame", problem="not JSON", frame=data[:200])
        return None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        log.warning("ari.ws.bad_frame", problem="no event type", frame=data[:200])
        return None
    return event

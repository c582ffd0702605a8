"""A small HTTP API for data-subject requests, for CRM integration (aiohttp).

    POST /v1/subject/export   {"caller_number": "+45 12 34 56 78"}  or  {"consent_id": "<uuid>"}
                              -> 200 application/zip (recordings + consent-records.json)
    POST /v1/subject/erase    {"consent_id": "<uuid>", "reason": "...", "request_ref": "CRM-123"}
                              -> 200 {"status": "erased" | "partial" | "refused", ...}

Every request needs ``Authorization: Bearer <token>`` (``api.token_file``,
``$CONSENT_GATE_API_TOKEN`` or ``$CONSENT_GATE_API_TOKEN_FILE``); a missing or wrong token is
401 before anything else is looked at, compared in constant time.  A person the request does
not match -- unknown number, unknown or malformed reference -- is 404 with the same body
whatever the reason; responses never echo the number or say anything about other callers.
The caller number travels in the body, never in the URL (access logs).  Listen on loopback and
put TLS in front (a reverse proxy) if the CRM is elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import re
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import structlog
from aiohttp import web

from consent_gate.admin.subject import SubjectNotFound, SubjectQuery, erase, export, training_dir
from consent_gate.config import Purpose, add_settings_arguments, settings_for_command
from consent_gate.core.events import utcnow

log = structlog.get_logger(__name__)

TOKEN_MIN_LENGTH = 24
MAX_BODY = 16 * 1024

_TOKEN = web.AppKey("token_digest", bytes)
_CONFIG = web.AppKey("config", dict)
_POOL = web.AppKey("pool", asyncpg.Pool)

_NO_STORE = {"Cache-Control": "no-store"}


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers={**_NO_STORE, **headers})


def _unauthorized() -> web.Response:
    return _error(401, "unauthorized", **{"WWW-Authenticate": 'Bearer realm="consent-gate"'})


def _not_found() -> web.Response:
    return _error(404, "no records for this person")


@web.middleware
async def _auth(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                ) -> web.StreamResponse:
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    # Digests of equal length: compare_digest leaks neither content nor the token's length.
    presented_digest = hashlib.sha256(presented.strip().encode("utf-8", "surrogateescape")).digest()
    good = hmac.compare_digest(presented_digest, request.app[_TOKEN])
    if scheme.lower() != "bearer" or not presented or not good:
        log.warning("api.unauthorized", peer=request.remote, path=request.path,
                    reason="missing" if not header else "wrong")
        return _unauthorized()
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status == 413:
            return _error(413, "request too large")
        if error.status in (404, 405):
            return _error(error.status, "not found" if error.status == 404 else "method not allowed")
        raise
    except Exception as error:  # noqa: BLE001  -- never a traceback (or a caller number) in a response
        log.error("api.internal_error", path=request.path, error=type(error).__name__)
        return _error(500, "internal error")


class _BadRequest(Exception):
    pass


# NUL cannot be stored in PostgreSQL text, and no field has a use for line breaks or escapes.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


async def _body(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise _BadRequest("send application/json")
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # deep nesting exhausts json's recursion: still just bad input
        raise _BadRequest("not valid JSON") from None
    if not isinstance(body, dict):
        raise _BadRequest("expected a JSON object")
    unknown = set(body) - allowed
    if unknown:
        raise _BadRequest(f"unknown field: {min(unknown)}")
    for key, value in body.items():
        if not isinstance(value, str):
            raise _BadRequest(f"{key}: expected a string")
        if key != "consent_id" and _CONTROL.search(value):  # a bad reference is a 404 (_query)
            raise _BadRequest(f"{key}: control characters are not allowed")
    return body


def _query(body: dict[str, Any]) -> SubjectQuery | None:
    """None: a reference that cannot exist (answered like an unknown one: 404)."""
    number, consent = body.get("caller_number"), body.get("consent_id")
    if (number is None) == (consent is None):
        raise _BadRequest("give caller_number or consent_id")
    try:
        return SubjectQuery(caller_number=number, consent_id=consent)
    except ValueError:
        if consent is not None:
            return None
        raise _BadRequest("caller_number: at most 64 characters") from None


def _actor(request: web.Request, body: Mapping[str, Any]) -> str:
    who = str(body.get("actor") or "")[:80]
    return f"api:{who}" if who else f"api@{request.remote or 'unknown'}"


async def _export(request: web.Request) -> web.StreamResponse:
    config = request.app[_CONFIG]
    try:
        body = await _body(request, {"caller_number", "consent_id", "actor"})
        query = _query(body)
    except _BadRequest as error:
        return _error(400, str(error))
    if query is None:
        return _not_found()
    with tempfile.TemporaryFile(prefix="consent-export-") as archive:  # 0600, unlinked at once
        try:
            async with request.app[_POOL].acquire() as connection:
                await export(connection, config["hmac_key"], config["recordings_dir"], config["purposes"],
                             query, archive, clock=config["clock"], actor=_actor(request, body),
                             copies_dir=config["copies_dir"])
        except SubjectNotFound:
            return _not_found()
        size = archive.tell()
        archive.seek(0)
        stamp = config["clock"]().strftime("%Y%m%dT%H%M%SZ")
        response = web.StreamResponse(status=200, headers={
            **_NO_STORE, "Content-Type": "application/zip",
            "Content-Disposition": f'attachment; filename="consent-export-{stamp}.zip"'})
        response.content_length = size
        await response.prepare(request)
        while chunk := await asyncio.to_thread(archive.read, 1 << 16):
            await response.write(chunk)
        await response.write_eof()
        return response


async def _erase(request: web.Request) -> web.Response:
    config = request.app[_CONFIG]
    try:
        body = await _body(request, {"caller_number", "consent_id", "reason", "request_ref", "actor"})
        query = _query(body)
        if len(body.get("reason", "")) > 500 or len(body.get("request_ref", "")) > 200:
            raise _BadRequest("reason: at most 500, request_ref: at most 200 characters")
    except _BadRequest as error:
        return _error(400, str(error))
    if query is None:
        return _not_found()
    try:
        async with request.app[_POOL].acquire() as connection:
            result = await erase(connection, config["hmac_key"], config["recordings_dir"], config["purposes"],
                                 query, reason=body.get("reason", ""), actor=_actor(request, body),
                                 request_ref=body.get("request_ref") or None, clock=config["clock"],
                                 copies_dir=config["copies_dir"])
    except SubjectNotFound:
        return _not_found()
    return web.json_response(result.to_json(), headers=_NO_STORE)


def create_app(
    *, dsn: str, hmac_key: bytes, recordings_dir: Path, purposes: Mapping[str, Purpose], token: str,
    clock: Callable[[], datetime] = utcnow, copies_dir: Path | None = None,
) -> web.Application:
    """``copies_dir``: the training copies directory, so exports include the copies and erasures
    delete them (``$CONSENT_GATE_TRAINING_DIR`` for ``consent-gate api serve``)."""
    if len(token) < TOKEN_MIN_LENGTH:
        raise ValueError(f"the API token needs at least {TOKEN_MIN_LENGTH} characters")
    app = web.Application(middlewares=[_auth], client_max_size=MAX_BODY)
    app[_TOKEN] = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
    app[_CONFIG] = {"hmac_key": hmac_key, "recordings_dir": Path(recordings_dir), "purposes": purposes,
                    "clock": clock, "copies_dir": Path(copies_dir) if copies_dir else None}

    async def database(app: web.Application) -> AsyncIterator[None]:
        app[_POOL] = await asyncpg.create_pool(dsn, min_size=1, max_size=4, timeout=10)
        yield
        await app[_POOL].close()

    app.cleanup_ctx.append(database)
    app.router.add_post("/v1/subject/export", _export)
    app.router.add_post("/v1/subject/erase", _erase)
    return app


def api_token(settings: Any, env: Mapping[str, str] | None = None) -> str:
    """$CONSENT_GATE_API_TOKEN, $CONSENT_GATE_API_TOKEN_FILE or api.token_file; no default."""
    import os

    from consent_gate.config import ConfigError, _secret

    token = _secret(os.environ if env is None else env, "CONSENT_GATE_API_TOKEN", settings.api_token_file,
                    "api.token")
    if len(token) < TOKEN_MIN_LENGTH:
        raise ConfigError(f"api.token: at least {TOKEN_MIN_LENGTH} characters (e.g. openssl rand -hex 32)")
    return token


async def serve(settings: Any, listen: str, token: str) -> None:
    host, _, port = listen.rpartition(":")
    app = create_app(dsn=settings.database_dsn, hmac_key=settings.hmac_key, recordings_dir=settings.recordings_dir,
                     purposes=settings.purposes, token=token, copies_dir=training_dir())
    runner = web.AppRunner(app, access_log=None)  # an access log would hold nothing useful but peers
    await runner.setup()
    site = web.TCPSite(runner, host.strip("[]"), int(port))
    await site.start()
    log.info("api.listening", listen=listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await runner.cleanup()


def _cmd_serve(args: argparse.Namespace) -> int:
    from consent_gate.config import ConfigError

    settings = settings_for_command(args)
    try:
        token = api_token(settings)
    except ConfigError as error:
        print(f"consent-gate: {error}", file=sys.stderr)
        return 1
    asyncio.run(serve(settings, args.listen or settings.api_listen, token))
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``api serve``; the command is ``args.func``."""

    api = subparsers.add_parser("api", help="HTTP API for data-subject requests (token auth)")
    sub = api.add_subparsers(dest="api_command", required=True)
    run = sub.add_parser("serve", help="serve POST /v1/subject/export and /v1/subject/erase")
    add_settings_arguments(run)
    run.add_argument("--listen", help="host:port (default api.listen, 127.0.0.1:8089)")
    run.set_defaults(func=_cmd_serve)

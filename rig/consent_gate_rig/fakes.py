"""Fakes of Asterisk's ARI (REST) and AMI for fast unit tests of one layer.

The real Asterisk is covered by the integration tests; these pin down what the service sends
and how it copes with answers, refusals and silence.  Both listen on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import socket
import socketserver
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from aiohttp import web

USER, PASSWORD = "consent", "s3cr3t-pw"


class FakeAri:
    """Minimal ARI look-alike: records REST calls, hands websocket connections to the test.

    The listening socket is bound at construction but only listens after start(), so a
    client pointed at it before start() gets "connection refused" (Asterisk down) without
    any race for the port.

    Besides fixed ``responses`` by (method, raw path), it keeps channel variables
    (``POST``/``GET /channels/{id}/variable``) and channel snapshots (``channels``) the way
    Asterisk answers them (404 for an unknown channel or an unset variable).
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.requests: list[dict[str, Any]] = []
        self.responses: dict[tuple[str, str], tuple[int, Any]] = {}
        self.channels: dict[str, dict[str, Any]] = {}
        self.variables: dict[tuple[str, str], str] = {}
        self.ws_queries: list[dict[str, str]] = []
        self.connections: asyncio.Queue[web.WebSocketResponse] = asyncio.Queue()
        self.runner: web.AppRunner | None = None
        self.autoping = True  # False: a peer that stopped answering pings
        self.entered = asyncio.Event()  # set when a REST request arrives
        self.gate: asyncio.Event | None = None  # if set, REST replies wait for it
        self.holds: dict[tuple[str, str], asyncio.Event] = {}  # (method, raw path): that reply waits
        self.on_request: Callable[[dict[str, Any]], None] | None = None
        self._expected_auth = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/ari/events", self._events)
        app.router.add_route("*", "/ari/{tail:.*}", self._rest)
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        await web.SockSite(self.runner, self.sock).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        self.sock.close()

    def calls(self, method: str | None = None, path_part: str = "") -> list[dict[str, Any]]:
        return [r for r in self.requests if (method is None or r["method"] == method) and path_part in r["raw_path"]]

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == self._expected_auth

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.Response(status=401, text="Authentication required")
        self.ws_queries.append(dict(request.query))
        ws = web.WebSocketResponse(autoping=self.autoping)
        await ws.prepare(request)
        await self.connections.put(ws)
        async for _ in ws:  # drain until either side closes
            pass
        return ws

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.json_response({"message": "Authentication required"}, status=401)
        path = request.rel_url.raw_path
        body = await request.text()
        record = {
            "method": request.method,
            "raw_path": path,
            "query": dict(request.query),
            "json": json.loads(body) if body else None,
        }
        self.requests.append(record)
        if self.on_request is not None:
            self.on_request(record)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if (request.method, path) in self.holds:
            await self.holds[(request.method, path)].wait()
        if (request.method, path) in self.responses:
            status, payload = self.responses[(request.method, path)]
        else:
            status, payload = self._stateful(request.method, path, record["query"])
        if payload is None:
            return web.Response(status=status)
        if isinstance(payload, str):
            return web.Response(status=status, text=payload)
        return web.json_response(payload, status=status)

    def _stateful(self, method: str, path: str, query: dict[str, str]) -> tuple[int, Any]:
        parts = [unquote(p) for p in path.split("/")]
        # /ari/channels/{id}[/variable], once a test has registered channels (else: 204 as before)
        if self.channels and len(parts) >= 4 and parts[2] == "channels":
            channel_id = parts[3]
            known = channel_id in self.channels
            if len(parts) == 4 and method == "GET":
                return (200, self.channels[channel_id]) if known else (404, {"message": "Channel not found"})
            if len(parts) == 5 and parts[4] == "variable":
                if not known:
                    return 404, {"message": "Channel not found"}
                name = query.get("variable", "")
                if method == "POST":
                    if (self.channels[channel_id].get("dialplan") or {}).get("app_name") != "Stasis":
                        # As Asterisk: ARI may set variables only on channels in Stasis.
                        return 409, {"message": "Channel not in Stasis application"}
                    self.variables[(channel_id, name)] = query.get("value", "")
                    return 204, None
                if (channel_id, name) in self.variables:
                    return 200, {"value": self.variables[(channel_id, name)]}
                return 404, {"message": "Provided variable was not found"}
        return 204, None


class FakeAmi:
    """An AMI look-alike: logs in anyone, records actions, answers each action as told
    (``replies``: action name -> "Success" or "Error"; Redirect's default is ``redirect_reply``)."""

    def __init__(self, redirect_reply: str = "Success", replies: dict[str, str] | None = None,
                 on_action: Callable[[dict[str, str]], None] | None = None) -> None:
        self.redirect_reply = redirect_reply
        self.replies = dict(replies or {})
        # Called for every action answered with Success (e.g. a Setvar the test applies).
        self.on_action = on_action
        self.actions: list[dict[str, str]] = []
        self.server: asyncio.Server | None = None
        self.port = 0
        self.action_seen = asyncio.Event()

    async def start(self, port: int = 0) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    def named(self, action: str) -> list[dict[str, str]]:
        return [a for a in self.actions if a.get("Action") == action]

    def _reply(self, action: str) -> str:
        if action == "Login":
            return "Success"
        if action in self.replies:
            return self.replies[action]
        return self.redirect_reply if action == "Redirect" else "Success"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"Asterisk Call Manager/9.0.0\r\n")
        message: dict[str, str] = {}
        while line := await reader.readline():
            text = line.decode().rstrip("\r\n")
            if text:
                key, _, value = text.partition(": ")
                message[key] = value
                continue
            self.actions.append(message)
            self.action_seen.set()
            reply = self._reply(message.get("Action", ""))
            if reply == "Success" and self.on_action is not None:
                self.on_action(message)
            writer.write(f"Response: {reply}\r\nActionID: {message.get('ActionID', '')}\r\n\r\n".encode())
            await writer.drain()
            message = {}
        writer.close()


class FlakyTcpProxy:
    """A TCP proxy on 127.0.0.1 that fails the way a sick dependency does: it refuses a share of
    new connections (closes them at once) and cuts a share of established ones when the client
    sends (mid-action).  Deterministic for a given ``rng``.  Used to inject AMI faults."""

    def __init__(self, target_port: int, rng: Any, *, refuse: float = 0.2, cut: float = 0.1) -> None:
        self.target_port = target_port
        self.rng = rng
        self.refuse = refuse
        self.cut = cut
        self.port = 0
        self.refused = 0
        self.cuts = 0
        self.forwarded = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.rng.random() < self.refuse:
            self.refused += 1
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.forwarded += 1

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, from_client: bool) -> None:
            try:
                while data := await source.read(65536):
                    if from_client and self.rng.random() < self.cut:
                        self.cuts += 1
                        break
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                sink.close()
                writer.close()
                up_writer.close()

        for task in (asyncio.create_task(pump(reader, up_writer, True)),
                     asyncio.create_task(pump(up_reader, writer, False))):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


class ScriptedAmi(socketserver.ThreadingTCPServer):
    """Asterisk's AMI login exchange in a thread (for a service checked as a subprocess):
    accepts ``secret``, refuses anything else, answers every other action with Success."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.logins: list[str] = []
        super().__init__(("127.0.0.1", 0), _AmiHandler)


class _AmiHandler(socketserver.StreamRequestHandler):
    server: ScriptedAmi

    def handle(self) -> None:
        self.wfile.write(b"Asterisk Call Manager/9.0.0\r\n")
        message: dict[str, str] = {}
        for raw in self.rfile:
            line = raw.decode().rstrip("\r\n")
            if line:
                key, _, value = line.partition(":")
                message[key.strip()] = value.strip()
            elif message:
                self._reply(message)
                message = {}

    def _reply(self, message: dict[str, str]) -> None:
        if message.get("Action") == "Login":
            self.server.logins.append(message.get("Username", ""))
            ok = message.get("Secret") == self.server.secret
            reply = "Success\r\nMessage: Authentication accepted" if ok else "Error\r\nMessage: Authentication failed"
        else:
            reply = "Success\r\nPing: Pong"
        self.wfile.write(f"Response: {reply}\r\nActionID: {message.get('ActionID', '')}\r\n\r\n".encode())


class ScriptedAriInfo(http.server.ThreadingHTTPServer):
    """ARI's ``GET /ari/asterisk/info`` in a thread: an Asterisk with ``system_name`` as its
    systemname and ``entity_id``, for ``username``/``password`` only (401 otherwise); 404 for
    any other path."""

    daemon_threads = True

    def __init__(self, username: str, password: str, system_name: str = "",
                 entity_id: str = "02:00:00:00:00:0a") -> None:
        self.token = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        self.system_name = system_name
        self.entity_id = entity_id
        self.requests: list[str] = []
        super().__init__(("127.0.0.1", 0), _AriInfoHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _AriInfoHandler(http.server.BaseHTTPRequestHandler):
    server: ScriptedAriInfo

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.requests.append(self.path)
        if self.headers.get("Authorization") != self.server.token:
            self._send(401, {"message": "Authentication required"})
        elif self.path.split("?")[0] == "/ari/asterisk/info":
            self._send(200, {"config": {"name": self.server.system_name, "default_language": "en"},
                             "system": {"entity_id": self.server.entity_id, "version": "22.10.1"}})
        else:
            self._send(404, {"message": "Resource not found"})

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
        pass  # the test reads ``requests``; stderr stays quiet


"""Randomised callers on the ARI-Local tier (Local channels originated through ARI, keys sent
by the ``cgcaller`` dialplan) and the invariant they must keep: a recording exists exactly when
a granted, not withdrawn decision exists.  Used by tests/integration/test_faults_load.py (100
calls in CI) and bench/load/random_callers.py (1,000 calls)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import re
import socket
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import asyncpg

from consent_gate_rig.calls import (
    wait_until,
)
from consent_gate_rig.fakes import FlakyTcpProxy
from consent_gate_rig.harness import AsteriskLog, GateService
from consent_gate_rig.sandbox import AsteriskSandbox

DECISIONS = {"granted", "declined", "no-input", "unavailable", "abandoned", "notified"}


PROMPT_RE = r"Playing '[^']*/question-training\."


@dataclass
class LocalCall:
    """One simulated caller: Local/500-TAG@from-callers, its ;1 half runs [from-callers] cgcaller."""

    tag: str
    delay: float = 1.0       # seconds after answer until CG_KEYS
    keys: str = ""
    delay2: float = 0.0      # then this long until CG_KEYS2
    keys2: str = ""
    hold: float = 1.0        # then this long until the caller hangs up
    gap_ms: int = 100        # between keys
    kind: str = ""
    # A SIP call (SipTier): the gate's channel is Asterisk's, learnt from its consent-call log
    # line after the call (resolve_sip_gate_channels); empty for a Local call.
    gate_id: str = ""
    gate_name: str = ""

    @property
    def caller_channel(self) -> str:
        return f"cgl-{self.tag}-1"

    @property
    def gate_channel(self) -> str:
        """The half in the gate: its id is the ledger's call_id."""
        return self.gate_id or f"cgl-{self.tag}-2"

    @property
    def channel_prefix(self) -> str:
        """How Asterisk's "Begin MixMonitor Recording NAME" line names the gate's channel."""
        return f"{self.gate_name}\n" if self.gate_name else f"Local/500-{self.tag}@from-callers-"

    def variables(self) -> dict[str, str]:
        return {"CG_DELAY": f"{self.delay:.2f}", "CG_KEYS": self.keys, "CG_DELAY2": f"{self.delay2:.2f}",
                "CG_KEYS2": self.keys2, "CG_HOLD": f"{self.hold:.2f}", "CG_GAP": str(self.gap_ms)}


class LocalTier:
    """ARI REST (the sandbox's ARI user) for originating and hanging up Local-tier calls."""

    def __init__(self, asterisk: AsteriskSandbox, timeout: float = 10.0) -> None:
        env = asterisk.env()
        self.timeout = timeout
        self.slowest_originate = 0.0
        self.base = env["CONSENT_GATE_ARI_URL"] + "/ari"
        self.app = env["CONSENT_GATE_ARI_APP"]
        token = base64.b64encode(f"{env['CONSENT_GATE_ARI_USER']}:{env['CONSENT_GATE_ARI_PASSWORD']}".encode())
        self.headers = {"Authorization": "Basic " + token.decode()}
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> LocalTier:
        self.session = aiohttp.ClientSession(headers=self.headers, timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.session is not None
        await self.session.close()

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        assert self.session is not None
        async with self.session.request(method, self.base + path, **kwargs) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text) if text else None
            except ValueError:
                return response.status, text

    async def originate(self, call: LocalCall, caller_id: str = '"Local Caller" <+4520000000>') -> None:
        params = {"endpoint": f"Local/500-{call.tag}@from-callers", "extension": "cgcaller",
                  "context": "from-callers", "priority": "1", "channelId": call.caller_channel,
                  "otherChannelId": call.gate_channel, "callerId": caller_id, "timeout": "30"}
        started = time.monotonic()
        status, body = await self.request("POST", "/channels", params=params, json={"variables": call.variables()})
        self.slowest_originate = max(self.slowest_originate, time.monotonic() - started)
        assert status == 200, f"originate {call.tag}: HTTP {status} {body}"

    async def channel_ids(self) -> set[str]:
        status, body = await self.request("GET", "/channels")
        assert status == 200, body
        return {c["id"] for c in body}

    async def hangup(self, channel_id: str) -> None:
        await self.request("DELETE", f"/channels/{channel_id}")

    async def wait_gone(self, ids: set[str], timeout: float) -> None:
        async def gone() -> bool:
            return not (await self.channel_ids()) & ids

        await wait_until(gone, timeout, f"channels {sorted(ids)} to end", interval=0.2)

    async def registered(self) -> bool:
        status, _ = await self.request("GET", f"/applications/{self.app}")
        return status == 200

    async def user_event(self, name: str, source: str | None, variables: dict[str, Any]) -> int:
        params = {"application": self.app}
        if source:
            params["source"] = source
        status, _ = await self.request("POST", f"/events/user/{name}", params=params, json={"variables": variables})
        return status


class SipTier(LocalTier):
    """Callers as real SIP calls: Asterisk dials itself through its ``loop`` endpoint (INVITE
    with digest auth as "caller", RTP, RFC 4733 keys), so the gate's half is a PJSIP channel
    like a phone's.  The ARI-originated caller half runs cgcaller as on the Local tier."""

    async def originate(self, call: LocalCall, caller_id: str = '"SIP Caller" <+4520000000>') -> None:
        params = {"endpoint": f"PJSIP/500-{call.tag}@loop", "extension": "cgcaller",
                  "context": "from-callers", "priority": "1", "channelId": call.caller_channel,
                  "callerId": caller_id, "timeout": "30"}
        started = time.monotonic()
        status, body = await self.request("POST", "/channels", params=params, json={"variables": call.variables()})
        self.slowest_originate = max(self.slowest_originate, time.monotonic() - started)
        assert status == 200, f"originate {call.tag}: HTTP {status} {body}"


# Logged by [from-callers] _500-. before the gate: which channel a tagged call got.
CONSENT_CALL_RE = re.compile(r"consent-call: test=(?P<tag>[A-Za-z0-9-]+) uniqueid=(?P<id>\S+) channel=(?P<name>\S+)")


def resolve_sip_gate_channels(calls: list[LocalCall], log_text: str) -> list[str]:
    """Give each SIP call its gate channel (id and name) from the node's log; the tags of calls
    that never reached the gate's dialplan."""
    seen = {m["tag"]: (m["id"], m["name"]) for m in CONSENT_CALL_RE.finditer(log_text)}
    missing = []
    for call in calls:
        if call.tag in seen:
            call.gate_id, call.gate_name = seen[call.tag]
        else:
            missing.append(call.tag)
    return missing


async def run_local_calls(tier: LocalTier, calls: list[LocalCall], concurrency: int, per_call_timeout: float) -> None:
    """Originate every call, at most ``concurrency`` at once; each ends by itself (bounded)."""
    slots = asyncio.Semaphore(concurrency)
    live: dict[str, int] = {}  # tag -> poll generation when it was originated
    done: dict[str, asyncio.Event] = {}
    generation = 0

    async def poll() -> None:
        # One GET /channels for all calls; a call is over when neither half is listed in a
        # listing that started after its originate returned.
        nonlocal generation
        while True:
            generation += 1
            started = generation
            try:
                up = await tier.channel_ids()
            except (TimeoutError, aiohttp.ClientError, AssertionError):
                await asyncio.sleep(0.25)
                continue
            for call in calls:
                added = live.get(call.tag)
                if added is not None and added < started and not ({call.caller_channel, call.gate_channel} & up):
                    del live[call.tag]
                    done[call.tag].set()
            await asyncio.sleep(0.25)

    async def one(call: LocalCall) -> None:
        async with slots:
            done[call.tag] = asyncio.Event()
            await tier.originate(call)
            live[call.tag] = generation
            try:
                await asyncio.wait_for(done[call.tag].wait(), per_call_timeout)
            except TimeoutError:
                await tier.hangup(call.caller_channel)
                raise TimeoutError(f"call {call.tag} ({call.kind}) did not end in {per_call_timeout:.0f} s") from None

    poller = asyncio.create_task(poll())
    try:
        await asyncio.gather(*(one(call) for call in calls))
    finally:
        poller.cancel()


def random_call(rng: random.Random, tag: str) -> LocalCall:
    """A caller who keys (or not) at a random moment and hangs up at a random moment."""
    kind = rng.choices(
        ["grant", "decline", "invalid-then-grant", "reciprocal-then-grant", "grant-then-withdraw",
         "hangup-in-prompt", "hangup-at-answer", "flood-no-consent", "grant-then-hangup-at-once",
         "grant-then-withdraw-at-once", "grant-then-codes"],
        weights=[20, 10, 6, 5, 12, 10, 5, 4, 10, 12, 6])[0]
    call = LocalCall(tag=tag, kind=kind, delay=round(rng.uniform(0.2, 3.0), 2), hold=round(rng.uniform(0.2, 5.0), 2))
    match kind:
        case "grant":
            call.keys = "1"
        case "decline":
            call.keys = "2"
        case "invalid-then-grant":
            call.keys = rng.choice(["71", "91", "#1", "01"])
        case "reciprocal-then-grant":
            call.keys, call.delay2, call.keys2 = "3", round(rng.uniform(0.5, 4.0), 2), "1"
        case "grant-then-withdraw":
            # *0 at a random moment after the grant: during the confirmation or after it.
            call.keys, call.delay2, call.keys2 = "1", round(rng.uniform(0.3, 9.0), 2), "*0"
            call.hold = round(rng.uniform(0.5, 3.0), 2)
        case "hangup-in-prompt":
            call.keys, call.hold = "", 0.0
        case "hangup-at-answer":
            call.delay, call.keys, call.hold = 0.0, "", 0.0
        case "flood-no-consent":
            call.keys = "".join(rng.choice("0234567890*#") for _ in range(rng.randint(10, 40)))
            call.gap_ms = 40
        case "grant-then-hangup-at-once":
            call.keys, call.hold = "1", round(rng.uniform(0.0, 0.3), 2)
        case "grant-then-withdraw-at-once":
            # *0 right after the consent key: while the grant is stored, or MixMonitor starts.
            call.keys, call.delay2, call.keys2 = "1", round(rng.uniform(0.0, 0.6), 2), "*0"
            call.hold = round(rng.uniform(0.5, 3.0), 2)
        case "grant-then-codes":
            # Other mid-call codes first ("I record too", a pause the caller may not make), then *0.
            call.keys, call.delay2 = "1", round(rng.uniform(0.0, 6.0), 2)
            call.keys2 = rng.choice(["*3*0", "*5*0", "*6*3*0"])
            call.hold = round(rng.uniform(0.5, 3.0), 2)
    return call


@dataclass
class InvariantReport:
    calls: int = 0
    outcomes: Counter = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    granted_hung_up_before_recording: int = 0
    # Callers who keyed the withdrawal code after a grant, yet the ledger has no withdrawal.
    withdrawal_ignored: list[str] = field(default_factory=list)
    orphan_files: list[str] = field(default_factory=list)


async def call_events(dsn: str, call_ids: list[str]) -> dict[str, list[dict]]:
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT call_id, event, recording_id, digit, consent_id::text AS consent_id, decided_at, prompt_started_at,"
            " occurred_at FROM consent_events WHERE call_id = ANY($1::text[]) ORDER BY occurred_at, seq", call_ids)
    finally:
        await connection.close()
    out: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        out[row["call_id"]].append(dict(row))
    return out


def check_invariant(calls: list[LocalCall], events: dict[str, list[dict]], new_files: set[str],
                    log_text: str) -> InvariantReport:
    """recording exists ⇔ a granted, not withdrawn decision exists — for every call, plus: one
    decision per call, no MixMonitor without a grant, no file that belongs to no call."""
    report = InvariantReport(calls=len(calls))
    claimed: set[str] = set()
    for call in calls:
        mine = events.get(call.gate_channel, [])
        decisions = [e for e in mine if e["event"] in DECISIONS]
        report.outcomes.update(e["event"] for e in decisions)
        if len(decisions) != 1:
            report.violations.append(f"{call.tag} ({call.kind}): {len(decisions)} decisions "
                                     f"{[e['event'] for e in mine]}")
            continue
        decision = decisions[0]
        withdrawn = any(e["event"] == "withdrawn" for e in mine)
        if withdrawn:
            report.outcomes["withdrawn"] += 1
        granted = decision["event"] == "granted"
        rid = decision["recording_id"] if granted else None
        names = {f"{rid}.wav", f"{rid}-caller.wav", f"{rid}-agent.wav"} if rid else set()
        claimed |= names
        has_file = bool(names & new_files)
        began = f"Begin MixMonitor Recording {call.channel_prefix}" in log_text
        if has_file and not (granted and not withdrawn):
            report.violations.append(f"{call.tag} ({call.kind}): a recording without a standing grant")
        if began and not granted:
            report.violations.append(f"{call.tag} ({call.kind}): MixMonitor began without a grant")
        if granted and not withdrawn and "*0" in call.keys2:
            # Withdrawal must be as easy as consent: a *0 keyed while the caller is still there counts.
            report.withdrawal_ignored.append(call.tag)
            report.violations.append(f"{call.tag} ({call.kind}): *0 after the grant, but no withdrawal")
        if granted and not withdrawn:
            if began and not has_file:
                report.violations.append(f"{call.tag} ({call.kind}): granted, MixMonitor began, no file")
            if not began:
                # The caller hung up between the stored grant and the dialplan's MixMonitor.
                report.granted_hung_up_before_recording += 1
    report.orphan_files = sorted(new_files - claimed)
    if report.orphan_files:
        report.violations.append(f"files that belong to no granted call: {report.orphan_files[:10]}")
    return report


async def settled_report(calls: list[LocalCall], dsn: str, recordings_dir: Path, before: set[str],
                         log: AsteriskLog, timeout: float = 30.0) -> InvariantReport:
    """Re-check until the ledger and the recordings settle (withdrawal deletes asynchronously);
    the last report, violations and all, once ``timeout`` has passed."""
    latest: list[InvariantReport] = []

    async def settled() -> bool:
        events = await call_events(dsn, [c.gate_channel for c in calls])
        new_files = {p.name for p in recordings_dir.iterdir()} - before
        latest[:] = [check_invariant(calls, events, new_files, log.text())]
        return not latest[0].violations

    with contextlib.suppress(TimeoutError):  # the caller asserts on the report's violations
        await wait_until(settled, timeout, "the invariant to hold", interval=0.5)
    return latest[0]


async def random_run(asterisk: AsteriskSandbox, dsn: str, log: AsteriskLog, *, calls: int, concurrency: int,
                     seed: int, tag_prefix: str) -> InvariantReport:
    rng = random.Random(seed)
    plan = [random_call(rng, f"{tag_prefix}{i:04d}") for i in range(calls)]
    before = {p.name for p in asterisk.recordings_dir.iterdir()}
    async with LocalTier(asterisk) as tier:
        await run_local_calls(tier, plan, concurrency, per_call_timeout=90)
    return await settled_report(plan, dsn, asterisk.recordings_dir, before, log)


async def one_local_call(tier: LocalTier, call: LocalCall, timeout: float = 90) -> None:
    await run_local_calls(tier, [call], 1, per_call_timeout=timeout)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def scrape(port: int) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            return await response.text()


async def with_metrics(gate: GateService) -> int:
    """Restart the service with its metrics endpoint on (stays on for the rest of the session)."""
    if "CONSENT_GATE_METRICS_PORT" not in gate.extra_env:
        gate.extra_env["CONSENT_GATE_METRICS_PORT"] = str(free_port())
        await gate.stop()
        await gate.start()
    return int(gate.extra_env["CONSENT_GATE_METRICS_PORT"])


async def ledger_healthy(gate: GateService, timeout: float = 30.0) -> None:
    """Until the service has proved the database is back (its ledger left degraded mode)."""
    port = await with_metrics(gate)

    async def healthy() -> bool:
        return bool(re.search(r"^consent_gate_ledger_degraded 0\.0$", await scrape(port), re.M))

    await wait_until(healthy, timeout, "the service's ledger to leave degraded mode", interval=0.25)


def assert_alive(gate: GateService) -> None:
    # Alive is the check: a crash ends the process.  (asyncpg logs tracebacks of its own while
    # the database is away; those are not ours.)
    assert gate.running, f"consent-gate-ari died:\n{gate.log_tail()}"


# A fake Asterisk for frames the real one would never send: the real service process must live.
# The StasisStart with non-object "channel"/"caller" and the frame nested 100,000 deep crashed
# the service when this test was written (fixed in consent_gate.ari since).
MALFORMED_FRAMES = [
    "not json at all", "", "[]", "null", "42", '"a string"', '{"no": "type"}', '{"type": 5}', '{"type": null}',
    '{"type": "StasisStart"}', '{"type": "StasisStart", "channel": "a string"}',
    '{"type": "StasisStart", "channel": {"id": "odd-0", "caller": "x"}, "args": ["training"]}',
    "[" * 100000, '{"a": ' * 50000 + "1" + "}" * 50000,
    '{"type": "StasisStart", "channel": {"id": null}}', '{"type": "StasisStart", "channel": {"id": ""}}',
    '{"type": "StasisStart", "channel": {"id": "odd-1", "language": 7}, "args": "training"}',
    '{"type": "StasisStart", "channel": {"id": "odd-2"}, "args": [null, {"a": 1}]}',
    '{"type": "StasisStart", "channel": {"id": "odd-3"}, "args": ["no-such-purpose"]}',
    '{"type": "ChannelDtmfReceived", "channel": {"id": "nobody"}, "digit": "1"}',
    '{"type": "ChannelDtmfReceived", "channel": [], "digit": {"x": 1}}',
    '{"type": "PlaybackFinished", "playback": []}', '{"type": "PlaybackFinished", "playback": {"target_uri": 5}}',
    '{"type": "StasisEnd", "channel": {"id": 12}}', '{"type": "ChannelDestroyed"}',
    '{"type": "TransportConnected"}', '{"type": "' + "X" * 10000 + '"}',
    '{"type": "ChannelUserevent", "userevent": {"a": "' + "\\u0000" * 100 + '"}}',
]


class FakeAsterisk:
    """Just enough ARI (REST + events websocket) to run one real dialog through the service."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict]] = []
        self.variables: dict[str, dict[str, str]] = defaultdict(dict)
        self.sockets: list[aiohttp.web.WebSocketResponse] = []
        self.connected = asyncio.Event()
        self.runner: aiohttp.web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/ari/events", self.events)
        app.router.add_route("*", "/ari/{tail:.*}", self.rest)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        for ws in self.sockets:
            await ws.close()
        if self.runner is not None:
            await self.runner.cleanup()

    async def events(self, request: aiohttp.web.Request) -> aiohttp.web.WebSocketResponse:
        ws = aiohttp.web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets.append(ws)
        self.connected.set()
        async for _ in ws:
            pass
        return ws

    async def rest(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        path = "/" + request.match_info["tail"]
        self.requests.append((request.method, path, dict(request.query)))
        if request.method == "POST" and path.endswith("/variable"):
            channel = path.split("/")[2]
            self.variables[channel][request.query.get("variable", "")] = request.query.get("value", "")
        if request.method == "GET" and path.startswith("/applications/"):
            return aiohttp.web.json_response({"name": "consent-gate", "channel_ids": []})
        if request.method == "POST" and "/play/" in path:
            return aiohttp.web.json_response({"id": path.rsplit("/", 1)[1], "state": "queued"}, status=201)
        return aiohttp.web.Response(status=204)

    async def send(self, frame: str | bytes) -> None:
        ws = self.sockets[-1]
        if isinstance(frame, bytes):
            await ws.send_bytes(frame)
        else:
            await ws.send_str(frame)

    def saw(self, method: str, fragment: str) -> bool:
        return any(m == method and fragment in path for m, path, _ in self.requests)


async def inserts_waiting(connection: asyncpg.Connection) -> bool:
    # Inside the lock's transaction the statistics views are a snapshot: refresh it each time.
    await connection.execute("SELECT pg_stat_clear_snapshot()")
    return bool(await connection.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%INSERT INTO consent_events%'"))


@contextlib.asynccontextmanager
async def flaky_ami(gate: GateService, asterisk: AsteriskSandbox, seed: int,
                    refuse: float = 0.3, cut: float = 0.3) -> AsyncIterator[FlakyTcpProxy]:
    """The service's AMI through a proxy that refuses and cuts connections at random (seeded)."""
    proxy = FlakyTcpProxy(int(asterisk.env()["CONSENT_GATE_AMI_PORT"]), random.Random(seed), refuse=refuse, cut=cut)
    await proxy.start()
    saved = dict(gate.extra_env)
    await gate.stop()
    gate.extra_env["CONSENT_GATE_AMI_PORT"] = str(proxy.port)
    try:
        await gate.start()
        yield proxy
    finally:
        await gate.stop()
        gate.extra_env.clear()
        gate.extra_env.update(saved)
        await proxy.stop()
        await gate.start()

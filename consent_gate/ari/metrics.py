"""Prometheus metrics of the ARI service (prometheus-client), served on 127.0.0.1 only.

    CONSENT_GATE_METRICS_PORT=9464 consent-gate-ari ...   ->   http://127.0.0.1:9464/metrics

Unset (or empty): no endpoint.  ``0`` picks a free port (tests).  A port that cannot be bound is
logged and the service runs on without metrics: recording consent never depends on them.

What is counted (docs/metrics.md has the Grafana panels):

* ``consent_gate_decisions_total{purpose,status}`` — every dialog's outcome;
* ``consent_gate_decision_storage_total{durability}`` — where the decision went (database,
  journal, lost);
* ``consent_gate_dialog_duration_seconds{status}`` — StasisStart → the channel is back in the
  dialplan;
* ``consent_gate_stasis_to_prompt_seconds`` — StasisStart → the question was requested;
* ``consent_gate_decision_to_release_seconds`` — keypress → the channel continues (ledger write,
  channel variables, continue): the service's share of keypress → MixMonitor;
* ``consent_gate_ari_reconnects_total``, ``consent_gate_ari_disconnects_total``,
  ``consent_gate_ari_connected``;
* ``consent_gate_active_dialogs``, ``consent_gate_active_watches``, ``consent_gate_asyncio_tasks``;
* ``consent_gate_journal_backlog_events``, ``consent_gate_ledger_degraded``;
* ``consent_gate_journal_quarantined_total{kind}``, ``consent_gate_journal_quarantine_lines``,
  ``consent_gate_journal_replay_failures_total`` — journal lines that can never be replayed
  (moved to the quarantine file for an admin) and replay rounds that failed for another reason
  than the database;
* the standard ``process_*`` metrics (RSS, open files, CPU) of this process.

Nothing here carries a caller's number or any other personal data: labels are purpose names and
statuses only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

if TYPE_CHECKING:
    from consent_gate.ari.app import ConsentGateApp
    from consent_gate.ari.call import Call
    from consent_gate.ledger.store import Ledger

log = structlog.get_logger(__name__)

PORT_ENV = "CONSENT_GATE_METRICS_PORT"
# Diagnostics for soaks only: CONSENT_GATE_TRACEMALLOC=1 adds /debug/memory (top allocation
# growth since start, by source line).  Costs CPU and memory; never set it in production.
TRACEMALLOC_ENV = "CONSENT_GATE_TRACEMALLOC"
LISTEN_HOST = "127.0.0.1"

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

DECISIONS = Counter(
    "consent_gate_decisions", "Consent dialogs by purpose and outcome.", ["purpose", "status"], registry=REGISTRY)
STORAGE = Counter(
    "consent_gate_decision_storage", "Where a decision was stored (database, journal, lost).", ["durability"],
    registry=REGISTRY)
DIALOG_SECONDS = Histogram(
    "consent_gate_dialog_duration_seconds", "StasisStart until the channel is back in the dialplan.", ["status"],
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180), registry=REGISTRY)
STASIS_TO_PROMPT = Histogram(
    "consent_gate_stasis_to_prompt_seconds", "StasisStart until the question prompt was requested from ARI.",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2), registry=REGISTRY)
DECISION_TO_RELEASE = Histogram(
    "consent_gate_decision_to_release_seconds",
    "Keypress until the channel continues in the dialplan (ledger write, variables, continue).",
    buckets=(0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1, 2, 5), registry=REGISTRY)
ARI_RECONNECTS = Counter(
    "consent_gate_ari_reconnects", "Events websocket connections after the first one.", registry=REGISTRY)
ARI_DISCONNECTS = Counter(
    "consent_gate_ari_disconnects", "Drops of an established events websocket.", registry=REGISTRY)
ARI_CONNECTED = Gauge("consent_gate_ari_connected", "1 while the events websocket is open.", registry=REGISTRY)
ACTIVE_DIALOGS = Gauge("consent_gate_active_dialogs", "Calls in the consent dialog now.", registry=REGISTRY)
ACTIVE_WATCHES = Gauge("consent_gate_active_watches", "Calls watched for mid-call codes now.", registry=REGISTRY)
ASYNCIO_TASKS = Gauge("consent_gate_asyncio_tasks", "asyncio tasks alive in the service.", registry=REGISTRY)
JOURNAL_BACKLOG = Gauge(
    "consent_gate_journal_backlog_events", "Decisions in the local journal, not yet in the database.",
    registry=REGISTRY)
CALL_TRANSITIONS = Counter(
    "consent_gate_call_transitions", "Per-call state changes (answering, asking, storing, ...).",
    ["from_state", "to_state"], registry=REGISTRY)
MIDCALL_ERRORS = Counter(
    "consent_gate_midcall_errors", "Unexpected errors while handling a mid-call event (the watch goes on).",
    registry=REGISTRY)
LEDGER_DEGRADED = Gauge(
    "consent_gate_ledger_degraded", "1 while the ledger writes to the journal (database unreachable).",
    registry=REGISTRY)
JOURNAL_QUARANTINED = Counter(
    "consent_gate_journal_quarantined", "Journal lines this service moved to the quarantine, by kind.", ["kind"],
    registry=REGISTRY)
JOURNAL_QUARANTINE_LINES = Gauge(
    "consent_gate_journal_quarantine_lines",
    "Lines in the journal's quarantine file (from any process), waiting for an admin.", registry=REGISTRY)
JOURNAL_REPLAY_FAILURES = Counter(
    "consent_gate_journal_replay_failures",
    "Journal replay rounds that failed for a reason other than the database (journal I/O, a bug).",
    registry=REGISTRY)

_connections = 0


# -- hooks ---------------------------------------------------------------------------------------

def ari_connected() -> None:
    """app.py, on TransportConnected."""
    global _connections
    if _connections:
        ARI_RECONNECTS.inc()
    _connections += 1
    ARI_CONNECTED.set(1)


def ari_disconnected() -> None:
    """app.py, on TransportDisconnected."""
    ARI_DISCONNECTS.inc()
    ARI_CONNECTED.set(0)


def call_transition(from_state: str, to_state: str) -> None:
    """call.py, on every state change of a call."""
    CALL_TRANSITIONS.labels(from_state=from_state, to_state=to_state).inc()


def midcall_error() -> None:
    MIDCALL_ERRORS.inc()


def observe_call(session: Call) -> None:
    """call.py, once a call's dialog has ended (whatever the way): outcome and latencies."""
    with contextlib.suppress(Exception):  # metrics never break a call
        _observe_call(session)


def _observe_call(session: Call) -> None:
    now_mono, now_wall = time.monotonic(), time.time()
    started_wall = now_wall - (now_mono - session.started_monotonic)
    result = session.result
    if result is not None:
        status = str(result.status)
    else:
        status = "abandoned" if session.caller_gone else "unavailable"
    # The purpose(s) the dialplan asked for ("documentation+training" for a granular gate).
    asked = getattr(session, "purposes", None) or []
    purpose = "+".join(p.name for p in asked) or (getattr(result, "purpose", "") if result else "") or "unknown"
    DECISIONS.labels(purpose=purpose, status=status).inc()
    state = session.dialog
    if state.durability is not None:
        STORAGE.labels(durability=str(state.durability)).inc()
    DIALOG_SECONDS.labels(status=status).observe(now_mono - session.started_monotonic)
    if state.prompt_started_at is not None:
        STASIS_TO_PROMPT.observe(max(0.0, state.prompt_started_at.timestamp() - started_wall))
    if state.decided_at is not None and state.digit is not None and status != "abandoned":
        DECISION_TO_RELEASE.observe(max(0.0, now_wall - state.decided_at.timestamp()))


# -- the endpoint --------------------------------------------------------------------------------

def configured_port(env: dict[str, str] | None = None) -> int | None:
    raw = (env if env is not None else os.environ).get(PORT_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) > 65535:
        raise ValueError(f"{PORT_ENV}={raw!r} is not a port number")
    return int(raw)


class Exporter:
    """The /metrics endpoint on 127.0.0.1 (aiohttp, in the service's own event loop)."""

    def __init__(self, app: ConsentGateApp | None, ledger: Ledger | None) -> None:
        self.app = app
        self.ledger = ledger
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._baseline: Any = None
        # The ledger counts in plain integers (it is shared with the AGI script, which exports
        # nothing); what of them this exporter has already added to its counters.
        self._quarantined_seen: collections.Counter[str] = collections.Counter()
        self._replay_failures_seen = 0

    def refresh(self) -> None:
        """Gauges that are read, not counted: sampled at scrape time."""
        if self.app is not None:
            ACTIVE_DIALOGS.set(self.app.count_dialogs())
            ACTIVE_WATCHES.set(self.app.count_watches())
        with contextlib.suppress(RuntimeError):
            ASYNCIO_TASKS.set(len(asyncio.all_tasks()))
        if self.ledger is not None:
            LEDGER_DEGRADED.set(1 if self.ledger.degraded else 0)
            for kind, total in self.ledger.journal.quarantined_by_kind.items():
                if total > self._quarantined_seen[kind]:
                    JOURNAL_QUARANTINED.labels(kind=kind).inc(total - self._quarantined_seen[kind])
                    self._quarantined_seen[kind] = total
            if self.ledger.replay_failures > self._replay_failures_seen:
                JOURNAL_REPLAY_FAILURES.inc(self.ledger.replay_failures - self._replay_failures_seen)
                self._replay_failures_seen = self.ledger.replay_failures

    async def _metrics(self, _request: web.Request) -> web.Response:
        self.refresh()
        if self.ledger is not None:
            with contextlib.suppress(OSError):
                JOURNAL_BACKLOG.set(await asyncio.to_thread(self.ledger.journal.backlog))
            with contextlib.suppress(OSError):
                JOURNAL_QUARANTINE_LINES.set(await asyncio.to_thread(self.ledger.journal.quarantined_lines))
        body = await asyncio.to_thread(generate_latest, REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _memory(self, _request: web.Request) -> web.Response:
        import tracemalloc

        def report() -> str:
            now = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
            stats = now.compare_to(self._baseline, "lineno") if self._baseline is not None else now.statistics("lineno")
            current, peak = tracemalloc.get_traced_memory()
            lines = [f"traced {current / 1024:.0f} KiB (peak {peak / 1024:.0f} KiB); growth since start, top 25:"]
            lines += [str(stat) for stat in stats[:25]]
            return "\n".join(lines) + "\n"

        return web.Response(text=await asyncio.to_thread(report))

    async def start(self, port: int) -> None:
        server = web.Application()
        server.router.add_get("/metrics", self._metrics)
        if os.environ.get(TRACEMALLOC_ENV) == "1":
            import tracemalloc

            tracemalloc.start(1)
            self._baseline = tracemalloc.take_snapshot()
            server.router.add_get("/debug/memory", self._memory)
        runner = web.AppRunner(server, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, LISTEN_HOST, port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        addresses = runner.addresses
        self.port = int(addresses[0][1]) if addresses else port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def start_exporter(app: ConsentGateApp | None, ledger: Ledger | None,
                         env: dict[str, str] | None = None) -> Exporter:
    """main.py: serve /metrics if CONSENT_GATE_METRICS_PORT is set; never raises."""
    exporter = Exporter(app, ledger)
    try:
        port = configured_port(env)
        if port is None:
            return exporter
        await exporter.start(port)
        log.info("metrics.listening", url=f"http://{LISTEN_HOST}:{exporter.port}/metrics")
    except (OSError, ValueError) as error:
        log.warning("metrics.disabled", error=str(error))
    return exporter


def sample(name: str, labels: dict[str, str] | None = None, text: str | None = None) -> Any:
    """The value of one sample in the current exposition (for tests and the soak script)."""
    from prometheus_client.parser import text_string_to_metric_families

    exposition = text if text is not None else generate_latest(REGISTRY).decode()
    for family in text_string_to_metric_families(exposition):
        for item in family.samples:
            if item.name == name and (labels is None or all(item.labels.get(k) == v for k, v in labels.items())):
                return item.value
    return None

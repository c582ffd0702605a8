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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

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
    from consent_gate.ledger.store import Ledger

log = structlog.get_logger(__name__)

PORT_ENV = "CONSENT_GATE_METRICS_PORT"
# Diagnostics for soaks only: CONSENT_GATE_TRACEMALLOC=1 adds /debug/memory (top allocation
# growth since start, by source line).  Costs CPU and memory; never set it in production.
TRACEMALLOC_ENV = "CONSENT_GATE_TRACEMALLOC"
LISTEN_HOST = "127.0.0.1"

@dataclass(frozen=True)
class CallOutcome:
    """What one finished consent dialog reports (ari.call.Call.outcome builds it); no personal data."""

    purpose: str  # the purpose(s) the dialplan asked for, "documentation+training" for a granular gate
    status: str
    durability: str | None  # database, journal, lost; None when nothing was stored
    dialog_seconds: float
    stasis_to_prompt: float | None = None
    decision_to_release: float | None = None


class CallObserver(Protocol):
    """What a call reports while it runs (ServiceMetrics is the one the service uses)."""

    def call_transition(self, from_state: str, to_state: str) -> None: ...

    def midcall_error(self) -> None: ...

    def call_finished(self, outcome: CallOutcome) -> None: ...


class ServiceMetrics:
    """The service's instruments in a registry of their own: one object, made by main() and handed
    to the app, its calls and the exporter (a test makes its own and reads it back)."""

    def __init__(self) -> None:
        registry = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        self.decisions = Counter(
            "consent_gate_decisions", "Consent dialogs by purpose and outcome.", ["purpose", "status"],
            registry=registry)
        self.storage = Counter(
            "consent_gate_decision_storage", "Where a decision was stored (database, journal, lost).",
            ["durability"], registry=registry)
        self.dialog_seconds = Histogram(
            "consent_gate_dialog_duration_seconds", "StasisStart until the channel is back in the dialplan.",
            ["status"], buckets=(0.5, 1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180), registry=registry)
        self.stasis_to_prompt = Histogram(
            "consent_gate_stasis_to_prompt_seconds", "StasisStart until the question prompt was requested from ARI.",
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2), registry=registry)
        self.decision_to_release = Histogram(
            "consent_gate_decision_to_release_seconds",
            "Keypress until the channel continues in the dialplan (ledger write, variables, continue).",
            buckets=(0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1, 2, 5), registry=registry)
        self.ari_reconnects = Counter(
            "consent_gate_ari_reconnects", "Events websocket connections after the first one.", registry=registry)
        self.ari_disconnects = Counter(
            "consent_gate_ari_disconnects", "Drops of an established events websocket.", registry=registry)
        self.ari_connected_gauge = Gauge(
            "consent_gate_ari_connected", "1 while the events websocket is open.", registry=registry)
        self.active_dialogs = Gauge("consent_gate_active_dialogs", "Calls in the consent dialog now.",
                                    registry=registry)
        self.active_watches = Gauge("consent_gate_active_watches", "Calls watched for mid-call codes now.",
                                    registry=registry)
        self.asyncio_tasks = Gauge("consent_gate_asyncio_tasks", "asyncio tasks alive in the service.",
                                   registry=registry)
        self.journal_backlog = Gauge(
            "consent_gate_journal_backlog_events", "Decisions in the local journal, not yet in the database.",
            registry=registry)
        self.call_transitions = Counter(
            "consent_gate_call_transitions", "Per-call state changes (answering, asking, storing, ...).",
            ["from_state", "to_state"], registry=registry)
        self.midcall_errors = Counter(
            "consent_gate_midcall_errors", "Unexpected errors while handling a mid-call event (the watch goes on).",
            registry=registry)
        self.ledger_degraded = Gauge(
            "consent_gate_ledger_degraded", "1 while the ledger writes to the journal (database unreachable).",
            registry=registry)
        self.journal_quarantined = Counter(
            "consent_gate_journal_quarantined", "Journal lines this service moved to the quarantine, by kind.",
            ["kind"], registry=registry)
        self.journal_quarantine_lines = Gauge(
            "consent_gate_journal_quarantine_lines",
            "Lines in the journal's quarantine file (from any process), waiting for an admin.", registry=registry)
        self.journal_replay_failures = Counter(
            "consent_gate_journal_replay_failures",
            "Journal replay rounds that failed for a reason other than the database (journal I/O, a bug).",
            registry=registry)
        self._connections = 0

    # -- what the app and its calls report ---------------------------------------------------

    def ari_connected(self) -> None:
        """app.py, on TransportConnected."""
        if self._connections:
            self.ari_reconnects.inc()
        self._connections += 1
        self.ari_connected_gauge.set(1)

    def ari_disconnected(self) -> None:
        """app.py, on TransportDisconnected."""
        self.ari_disconnects.inc()
        self.ari_connected_gauge.set(0)

    def call_transition(self, from_state: str, to_state: str) -> None:
        self.call_transitions.labels(from_state=from_state, to_state=to_state).inc()

    def midcall_error(self) -> None:
        self.midcall_errors.inc()

    def call_finished(self, outcome: CallOutcome) -> None:
        """Once a call's dialog has ended (whatever the way): outcome and latencies."""
        with contextlib.suppress(Exception):  # metrics never break a call
            self.decisions.labels(purpose=outcome.purpose, status=outcome.status).inc()
            if outcome.durability is not None:
                self.storage.labels(durability=outcome.durability).inc()
            self.dialog_seconds.labels(status=outcome.status).observe(outcome.dialog_seconds)
            if outcome.stasis_to_prompt is not None:
                self.stasis_to_prompt.observe(outcome.stasis_to_prompt)
            if outcome.decision_to_release is not None:
                self.decision_to_release.observe(outcome.decision_to_release)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def sample(self, name: str, labels: dict[str, str] | None = None, text: str | None = None) -> Any:
        """The value of one sample now (or in ``text``, a scraped exposition)."""
        return sample(name, labels, text if text is not None else self.exposition().decode())


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

    def __init__(self, metrics: ServiceMetrics, app: ConsentGateApp | None, ledger: Ledger | None) -> None:
        self.metrics = metrics
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
        m = self.metrics
        if self.app is not None:
            m.active_dialogs.set(self.app.count_dialogs())
            m.active_watches.set(self.app.count_watches())
        with contextlib.suppress(RuntimeError):
            m.asyncio_tasks.set(len(asyncio.all_tasks()))
        if self.ledger is not None:
            m.ledger_degraded.set(1 if self.ledger.degraded else 0)
            for kind, total in self.ledger.journal.quarantined_by_kind.items():
                if total > self._quarantined_seen[kind]:
                    m.journal_quarantined.labels(kind=kind).inc(total - self._quarantined_seen[kind])
                    self._quarantined_seen[kind] = total
            if self.ledger.replay_failures > self._replay_failures_seen:
                m.journal_replay_failures.inc(self.ledger.replay_failures - self._replay_failures_seen)
                self._replay_failures_seen = self.ledger.replay_failures

    async def _metrics(self, _request: web.Request) -> web.Response:
        self.refresh()
        if self.ledger is not None:
            with contextlib.suppress(OSError):
                self.metrics.journal_backlog.set(await asyncio.to_thread(self.ledger.journal.backlog))
            with contextlib.suppress(OSError):
                self.metrics.journal_quarantine_lines.set(
                    await asyncio.to_thread(self.ledger.journal.quarantined_lines))
        body = await asyncio.to_thread(self.metrics.exposition)
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


async def start_exporter(metrics: ServiceMetrics, app: ConsentGateApp | None, ledger: Ledger | None,
                         env: dict[str, str] | None = None) -> Exporter:
    """main.py: serve /metrics if CONSENT_GATE_METRICS_PORT is set; never raises."""
    exporter = Exporter(metrics, app, ledger)
    try:
        port = configured_port(env)
        if port is None:
            return exporter
        await exporter.start(port)
        log.info("metrics.listening", url=f"http://{LISTEN_HOST}:{exporter.port}/metrics")
    except (OSError, ValueError) as error:
        log.warning("metrics.disabled", error=str(error))
    return exporter


def sample(name: str, labels: dict[str, str] | None, text: str) -> Any:
    """The value of one sample in a scraped exposition (for tests and the soak script)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for item in family.samples:
            if item.name == name and (labels is None or all(item.labels.get(k) == v for k, v in labels.items())):
                return item.value
    return None

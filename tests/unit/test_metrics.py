"""consent_gate.ari.metrics: what a finished call counts, the reconnect counter, the 127.0.0.1 endpoint."""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import aiohttp
import pytest

from consent_gate.ari import metrics
from consent_gate.core.dialog import DialogState
from consent_gate.core.events import Decision
from consent_gate.ledger.store import Durability


@dataclass
class FakeSession:
    """The attributes of a Call that observe_call reads."""

    purposes: list = field(default_factory=lambda: [SimpleNamespace(name="training")])
    result: object | None = None
    caller_gone: bool = False
    dialog: DialogState = field(default_factory=DialogState)
    started_monotonic: float = field(default_factory=time.monotonic)


def value(name: str, **labels: str) -> float:
    return metrics.sample(name, labels or None) or 0.0


def finished(status: Decision, *, digit: str | None = "1", decided_ago: float = 0.004,
             started_ago: float = 3.0, prompt_after: float = 0.010) -> FakeSession:
    now = datetime.now(UTC)
    session = FakeSession(result=SimpleNamespace(status=status, purpose="training"))
    session.started_monotonic = time.monotonic() - started_ago
    session.dialog.prompt_started_at = now - timedelta(seconds=started_ago - prompt_after)
    session.dialog.decided_at = now - timedelta(seconds=decided_ago)
    session.dialog.digit = digit
    session.dialog.durability = Durability.DATABASE
    return session


def test_a_granted_call_counts_its_outcome_storage_and_latencies() -> None:
    granted = value("consent_gate_decisions_total", purpose="training", status="granted")
    stored = value("consent_gate_decision_storage_total", durability="database")
    release_count = value("consent_gate_decision_to_release_seconds_count")
    fast_release = value("consent_gate_decision_to_release_seconds_bucket", le="0.02")
    prompt_count = value("consent_gate_stasis_to_prompt_seconds_count")
    prompt_fast = value("consent_gate_stasis_to_prompt_seconds_bucket", le="0.02")

    metrics.observe_call(finished(Decision.GRANTED))

    assert value("consent_gate_decisions_total", purpose="training", status="granted") == granted + 1
    assert value("consent_gate_decision_storage_total", durability="database") == stored + 1
    assert value("consent_gate_decision_to_release_seconds_count") == release_count + 1
    assert value("consent_gate_decision_to_release_seconds_bucket", le="0.02") == fast_release + 1
    assert value("consent_gate_stasis_to_prompt_seconds_count") == prompt_count + 1
    assert value("consent_gate_stasis_to_prompt_seconds_bucket", le="0.02") == prompt_fast + 1
    assert value("consent_gate_dialog_duration_seconds_count", status="granted") >= 1


def test_no_input_has_no_keypress_latency_and_a_crash_counts_as_unavailable() -> None:
    release_count = value("consent_gate_decision_to_release_seconds_count")
    no_input = value("consent_gate_decisions_total", purpose="training", status="no-input")
    metrics.observe_call(finished(Decision.NO_INPUT, digit=None))
    assert value("consent_gate_decisions_total", purpose="training", status="no-input") == no_input + 1
    assert value("consent_gate_decision_to_release_seconds_count") == release_count

    unavailable = value("consent_gate_decisions_total", purpose="training", status="unavailable")
    metrics.observe_call(FakeSession())  # the dialog raised: no result
    assert value("consent_gate_decisions_total", purpose="training", status="unavailable") == unavailable + 1

    abandoned = value("consent_gate_decisions_total", purpose="unknown", status="abandoned")
    metrics.observe_call(FakeSession(purposes=[], caller_gone=True))
    assert value("consent_gate_decisions_total", purpose="unknown", status="abandoned") == abandoned + 1


def test_granular_purposes_are_one_label_and_a_broken_session_never_raises() -> None:
    session = finished(Decision.GRANTED)
    session.purposes = [SimpleNamespace(name="documentation"), SimpleNamespace(name="training")]
    before = value("consent_gate_decisions_total", purpose="documentation+training", status="granted")
    metrics.observe_call(session)
    assert value("consent_gate_decisions_total", purpose="documentation+training", status="granted") == before + 1
    metrics.observe_call(object())  # type: ignore[arg-type]  # metrics never break a call


def test_reconnects_count_every_connection_after_the_first() -> None:
    reconnects = value("consent_gate_ari_reconnects_total")
    disconnects = value("consent_gate_ari_disconnects_total")
    metrics._connections = 0
    metrics.ari_connected()
    assert value("consent_gate_ari_connected") == 1
    assert value("consent_gate_ari_reconnects_total") == reconnects
    metrics.ari_disconnected()
    assert value("consent_gate_ari_connected") == 0
    metrics.ari_connected()
    assert value("consent_gate_ari_reconnects_total") == reconnects + 1
    assert value("consent_gate_ari_disconnects_total") == disconnects + 1


def test_port_setting() -> None:
    assert metrics.configured_port({}) is None
    assert metrics.configured_port({metrics.PORT_ENV: ""}) is None
    assert metrics.configured_port({metrics.PORT_ENV: "9464"}) == 9464
    with pytest.raises(ValueError):
        metrics.configured_port({metrics.PORT_ENV: "nine"})
    with pytest.raises(ValueError):
        metrics.configured_port({metrics.PORT_ENV: "70000"})


class FakeJournal:
    def __init__(self) -> None:
        self.quarantined_by_kind = {"invalid-json": 2}

    def backlog(self) -> int:
        return 3

    def quarantined_lines(self) -> int:
        return 2


async def test_endpoint_serves_on_loopback_with_live_gauges() -> None:
    app = SimpleNamespace(count_dialogs=lambda: 2, count_watches=lambda: 1)
    ledger = SimpleNamespace(degraded=True, journal=FakeJournal(), replay_failures=0)
    exporter = await metrics.start_exporter(app, ledger, env={metrics.PORT_ENV: "0"})  # type: ignore[arg-type]
    try:
        assert exporter.port
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{exporter.port}/metrics") as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/plain")
                text = await response.text()
        assert metrics.sample("consent_gate_active_dialogs", text=text) == 2
        assert metrics.sample("consent_gate_active_watches", text=text) == 1
        assert metrics.sample("consent_gate_journal_backlog_events", text=text) == 3
        assert metrics.sample("consent_gate_ledger_degraded", text=text) == 1
        assert metrics.sample("consent_gate_journal_quarantine_lines", text=text) == 2
        assert metrics.sample("consent_gate_asyncio_tasks", text=text) >= 1
        assert metrics.sample("process_resident_memory_bytes", text=text) > 0
        assert metrics.sample("process_open_fds", text=text) > 0
        # Loopback only: the port is not open on another local address.
        with socket.socket() as probe:
            probe.settimeout(1)
            assert probe.connect_ex(("127.0.0.2", exporter.port)) != 0
    finally:
        await exporter.close()


async def test_unset_port_means_no_endpoint_and_a_busy_port_does_not_stop_the_service() -> None:
    exporter = await metrics.start_exporter(None, None, env={})
    assert exporter.port is None
    await exporter.close()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        exporter = await metrics.start_exporter(None, None, env={metrics.PORT_ENV: str(port)})
        assert exporter.port is None
        await exporter.close()
    await asyncio.sleep(0)


async def test_tracemalloc_diagnostics_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    import tracemalloc

    exporter = await metrics.start_exporter(None, None, env={metrics.PORT_ENV: "0"})
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{exporter.port}/debug/memory") as response:
                assert response.status == 404
    finally:
        await exporter.close()
    monkeypatch.setenv(metrics.TRACEMALLOC_ENV, "1")
    exporter = await metrics.start_exporter(None, None, env={metrics.PORT_ENV: "0"})
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{exporter.port}/debug/memory") as response:
                assert response.status == 200
                assert (await response.text()).startswith("traced ")
    finally:
        await exporter.close()
        tracemalloc.stop()

"""consent_gate.ari.metrics (an injected ServiceMetrics) and Call.outcome: what a finished call counts, the reconnect counter, the 127.0.0.1 endpoint."""

from __future__ import annotations

import asyncio
import socket
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import aiohttp
import pytest

from consent_gate.ari import metrics
from consent_gate.ari.call import Call
from consent_gate.ari.metrics import ServiceMetrics
from consent_gate.ari.router import Router
from consent_gate.config import Purpose
from consent_gate.core.dialog import CallInfo, DialogResult, DialogState
from consent_gate.core.events import Decision
from consent_gate.ledger.store import Durability


def call_with(status: Decision | None, *, purposes: list[str] = ["training"], digit: str | None = "1",  # noqa: B006
              decided_ago: float = 0.004, started_ago: float = 3.0, prompt_after: float = 0.010,
              caller_gone: bool = False) -> Call:
    """A Call whose dialog is over (only what Call.outcome reads is filled in)."""
    now = datetime.now(UTC)
    call = Call(client=None, gate=None, router=Router(), channel_id="c1",  # type: ignore[arg-type]
                info=CallInfo(call_id="c1", caller_number="", language="en"),
                purposes=[Purpose(name, "consent", "question-training", 30) for name in purposes])
    if status is not None:
        call.result = DialogResult(status=status, consent_id="00000000-0000-4000-8000-000000000000",
                                   recording_id=None, confirmation=None, purpose=purposes[0] if purposes else "")
    call.caller_gone = caller_gone
    call.started_monotonic = time.monotonic() - started_ago
    call.dialog = DialogState()
    call.dialog.prompt_started_at = now - timedelta(seconds=started_ago - prompt_after)
    call.dialog.decided_at = now - timedelta(seconds=decided_ago)
    call.dialog.digit = digit
    call.dialog.durability = Durability.DATABASE if status is not None else None
    return call


def test_a_granted_call_counts_its_outcome_storage_and_latencies() -> None:
    m = ServiceMetrics()
    m.call_finished(call_with(Decision.GRANTED).outcome())
    assert m.sample("consent_gate_decisions_total", {"purpose": "training", "status": "granted"}) == 1
    assert m.sample("consent_gate_decision_storage_total", {"durability": "database"}) == 1
    assert m.sample("consent_gate_decision_to_release_seconds_count") == 1
    assert m.sample("consent_gate_decision_to_release_seconds_bucket", {"le": "0.02"}) == 1
    assert m.sample("consent_gate_stasis_to_prompt_seconds_count") == 1
    assert m.sample("consent_gate_stasis_to_prompt_seconds_bucket", {"le": "0.02"}) == 1
    assert m.sample("consent_gate_dialog_duration_seconds_count", {"status": "granted"}) == 1


def test_no_input_has_no_keypress_latency_and_a_crash_counts_as_unavailable() -> None:
    m = ServiceMetrics()
    m.call_finished(call_with(Decision.NO_INPUT, digit=None).outcome())
    assert m.sample("consent_gate_decisions_total", {"purpose": "training", "status": "no-input"}) == 1
    assert m.sample("consent_gate_decision_to_release_seconds_count") == 0
    m.call_finished(call_with(None).outcome())  # the dialog raised: no result
    assert m.sample("consent_gate_decisions_total", {"purpose": "training", "status": "unavailable"}) == 1
    m.call_finished(call_with(None, purposes=[], caller_gone=True).outcome())
    assert m.sample("consent_gate_decisions_total", {"purpose": "unknown", "status": "abandoned"}) == 1


def test_granular_purposes_are_one_label_and_a_broken_outcome_never_raises() -> None:
    m = ServiceMetrics()
    m.call_finished(call_with(Decision.GRANTED, purposes=["documentation", "training"]).outcome())
    assert m.sample("consent_gate_decisions_total", {"purpose": "documentation+training", "status": "granted"}) == 1
    m.call_finished(object())  # type: ignore[arg-type]  # metrics never break a call


def test_two_services_in_one_process_count_apart() -> None:
    """No module-global counters: each ServiceMetrics has its own registry."""
    first, second = ServiceMetrics(), ServiceMetrics()
    first.call_finished(call_with(Decision.DECLINED).outcome())
    assert first.sample("consent_gate_decisions_total", {"purpose": "training", "status": "declined"}) == 1
    assert second.sample("consent_gate_decisions_total", {"purpose": "training", "status": "declined"}) is None


def test_reconnects_count_every_connection_after_the_first() -> None:
    m = ServiceMetrics()
    m.ari_connected()
    assert m.sample("consent_gate_ari_connected") == 1
    assert m.sample("consent_gate_ari_reconnects_total") == 0
    m.ari_disconnected()
    assert m.sample("consent_gate_ari_connected") == 0
    m.ari_connected()
    assert m.sample("consent_gate_ari_reconnects_total") == 1
    assert m.sample("consent_gate_ari_disconnects_total") == 1


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
    exporter = await metrics.start_exporter(ServiceMetrics(), app, ledger, env={metrics.PORT_ENV: "0"})  # type: ignore[arg-type]
    try:
        assert exporter.port
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{exporter.port}/metrics") as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/plain")
                text = await response.text()
        assert metrics.sample("consent_gate_active_dialogs", None, text) == 2
        assert metrics.sample("consent_gate_active_watches", None, text) == 1
        assert metrics.sample("consent_gate_journal_backlog_events", None, text) == 3
        assert metrics.sample("consent_gate_ledger_degraded", None, text) == 1
        assert metrics.sample("consent_gate_journal_quarantine_lines", None, text) == 2
        assert metrics.sample("consent_gate_asyncio_tasks", None, text) >= 1
        assert metrics.sample("process_resident_memory_bytes", None, text) > 0
        assert metrics.sample("process_open_fds", None, text) > 0
        # Loopback only: the port is not open on another local address.
        with socket.socket() as probe:
            probe.settimeout(1)
            assert probe.connect_ex(("127.0.0.2", exporter.port)) != 0
    finally:
        await exporter.close()


async def test_unset_port_means_no_endpoint_and_a_busy_port_does_not_stop_the_service() -> None:
    exporter = await metrics.start_exporter(ServiceMetrics(), None, None, env={})
    assert exporter.port is None
    await exporter.close()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        exporter = await metrics.start_exporter(ServiceMetrics(), None, None, env={metrics.PORT_ENV: str(port)})
        assert exporter.port is None
        await exporter.close()
    await asyncio.sleep(0)


async def test_tracemalloc_diagnostics_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    import tracemalloc

    exporter = await metrics.start_exporter(ServiceMetrics(), None, None, env={metrics.PORT_ENV: "0"})
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{exporter.port}/debug/memory") as response:
                assert response.status == 404
    finally:
        await exporter.close()
    monkeypatch.setenv(metrics.TRACEMALLOC_ENV, "1")
    exporter = await metrics.start_exporter(ServiceMetrics(), None, None, env={metrics.PORT_ENV: "0"})
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{exporter.port}/debug/memory") as response:
                assert response.status == 200
                assert (await response.text()).startswith("traced ")
    finally:
        await exporter.close()
        tracemalloc.stop()

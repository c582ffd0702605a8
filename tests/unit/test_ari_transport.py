"""Unit tests for consent_gate.ari.transport against a fake ARI server (aiohttp.web on 127.0.0.1).

The real Asterisk is covered by the integration tests; here we pin down the transport
contract: REST error mapping, auth, quoting, and the self-healing events websocket.
Every wait is bounded; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import pytest
import structlog

from consent_gate.ari.ami import AmiClient, AmiConfig
from consent_gate.ari.transport import AriClient, AriConfig, AriError, ChannelGone, backoff_delay
from consent_gate_rig.fakes import PASSWORD, USER, FakeAmi, FakeAri

T = 3.0  # upper bound for any single wait; generous for slow CI, never actually slept


def make_config(port: int, **overrides: Any) -> AriConfig:
    values: dict[str, Any] = dict(
        base_url=f"http://127.0.0.1:{port}",
        username=USER,
        password=PASSWORD,
        app="consent-gate",
        request_timeout=2.0,
        reconnect_initial=0.01,
        reconnect_max=0.05,
    )
    values.update(overrides)
    return AriConfig(**values)


@pytest.fixture
async def fake() -> AsyncIterator[FakeAri]:
    server = FakeAri()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def client(fake: FakeAri) -> AsyncIterator[AriClient]:
    async with AriClient(make_config(fake.port)) as c:
        yield c


async def next_event(it: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    return await asyncio.wait_for(anext(it), T)


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll a condition, bounded by T (a condition wait, not a fixed sleep)."""

    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), T)


async def cancel_and_check(task: asyncio.Future[Any]) -> None:
    """Cancel and require the CancelledError to come out (not swallowed, not stalled)."""
    task.cancel()
    # asyncio.wait, not wait_for: on failure we want a quick assert, not a re-cancel hang.
    await asyncio.wait({task}, timeout=T)
    assert task.done(), "cancellation stalled"
    assert task.cancelled(), f"cancellation swallowed: {task!r}"


def logged(logs: Sequence[Mapping[str, Any]], event: str) -> int:
    return sum(1 for entry in logs if entry["event"] == event)


# ---------------------------------------------------------------------------- REST


async def test_request_decodes_json_and_encodes_params(fake: FakeAri, client: AriClient) -> None:
    fake.responses[("GET", "/ari/channels/c1")] = (200, {"id": "c1", "state": "Up"})
    result = await client.request("GET", "/channels/c1", params={"a": 1, "b": True, "c": None})
    assert result == {"id": "c1", "state": "Up"}
    assert fake.requests[-1]["query"] == {"a": "1", "b": "true"}


async def test_request_sends_json_body_and_empty_response_is_none(
    fake: FakeAri, client: AriClient
) -> None:
    result = await client.request("post", "/channels/c1/variable", json={"x": [1, 2]})
    assert result is None
    assert fake.requests[-1]["method"] == "POST"
    assert fake.requests[-1]["json"] == {"x": [1, 2]}


async def test_error_names_method_path_and_status(fake: FakeAri, client: AriClient) -> None:
    fake.responses[("POST", "/ari/channels/c1/answer")] = (500, {"message": "boom"})
    with pytest.raises(AriError) as info:
        await client.answer("c1")
    err = info.value
    assert not isinstance(err, ChannelGone)
    assert (err.status, err.method, err.path) == (500, "POST", "/channels/c1/answer")
    assert err.body == {"message": "boom"}
    for part in ("POST", "/channels/c1/answer", "500", "boom"):
        assert part in str(err)


async def test_404_on_channel_raises_channel_gone(fake: FakeAri, client: AriClient) -> None:
    fake.responses[("POST", "/ari/channels/c1/answer")] = (404, {"message": "Channel not found"})
    fake.responses[("POST", "/ari/channels/c1/play/pb1")] = (404, {"message": "Channel not found"})
    with pytest.raises(ChannelGone) as info:
        await client.answer("c1")
    assert info.value.status == 404
    with pytest.raises(ChannelGone):
        await client.play("c1", "sound:hello", playback_id="pb1")


async def test_404_elsewhere_is_plain_ari_error(fake: FakeAri, client: AriClient) -> None:
    fake.responses[("GET", "/ari/bridges/b1")] = (404, {"message": "Bridge not found"})
    with pytest.raises(AriError) as info:
        await client.request("GET", "/bridges/b1", gone_ok=True)
    assert not isinstance(info.value, ChannelGone)
    assert info.value.status == 404


async def test_gone_ok_treats_404_as_success(fake: FakeAri, client: AriClient) -> None:
    gone = (404, {"message": "Channel not found"})
    fake.responses[("DELETE", "/ari/channels/c1")] = gone
    fake.responses[("DELETE", "/ari/playbacks/pb1")] = (404, {"message": "Playback not found"})
    fake.responses[("POST", "/ari/channels/c1/continue")] = gone
    fake.responses[("POST", "/ari/channels/c1/answer")] = gone
    await client.hangup("c1")  # no exception: 404 on hangup counts as done
    await client.stop_playback("pb1")
    await client.continue_in_dialplan("c1", context="ctx", priority=2)
    assert await client.request("POST", "/channels/c1/answer", gone_ok=True) is None
    assert fake.requests[0]["query"] == {"reason": "normal"}
    assert fake.requests[2]["query"] == {"context": "ctx", "priority": "2"}


async def test_gone_ok_does_not_hide_other_errors(fake: FakeAri, client: AriClient) -> None:
    fake.responses[("DELETE", "/ari/channels/c1")] = (500, {"message": "boom"})
    with pytest.raises(AriError) as info:
        await client.hangup("c1")
    assert info.value.status == 500


async def test_basic_auth_is_sent_and_checked(fake: FakeAri, client: AriClient) -> None:
    fake.responses[("GET", "/ari/asterisk/info")] = (200, {"system": {}})
    assert await client.request("GET", "/asterisk/info") == {"system": {}}
    async with AriClient(make_config(fake.port, password="wrong")) as bad:
        with pytest.raises(AriError) as info:
            await bad.request("GET", "/asterisk/info")
    assert info.value.status == 401


async def test_ids_are_url_quoted(fake: FakeAri, client: AriClient) -> None:
    nasty = "a/b c?#%"
    quoted = "a%2Fb%20c%3F%23%25"
    fake.responses[("POST", f"/ari/channels/{quoted}/play/{quoted}")] = (201, {"id": nasty})
    fake.responses[("GET", f"/ari/channels/{quoted}/variable")] = (200, {"value": "yes"})
    await client.answer(nasty)
    assert await client.play(nasty, ["sound:a", "sound:b"], playback_id=nasty, lang="da") == {
        "id": nasty
    }
    await client.set_var(nasty, "CONSENT", "1")
    assert await client.get_var(nasty, "CONSENT") == "yes"
    await client.hangup(nasty, reason="busy")
    await client.stop_playback(nasty)
    paths = [(r["method"], r["raw_path"], r["query"]) for r in fake.requests]
    assert paths == [
        ("POST", f"/ari/channels/{quoted}/answer", {}),
        (
            "POST",
            f"/ari/channels/{quoted}/play/{quoted}",
            {"media": "sound:a,sound:b", "lang": "da"},
        ),
        ("POST", f"/ari/channels/{quoted}/variable", {"variable": "CONSENT", "value": "1"}),
        ("GET", f"/ari/channels/{quoted}/variable", {"variable": "CONSENT"}),
        ("DELETE", f"/ari/channels/{quoted}", {"reason": "busy"}),
        ("DELETE", f"/ari/playbacks/{quoted}", {}),
    ]


async def test_get_var_returns_none_on_404(fake: FakeAri, client: AriClient) -> None:
    fake.responses[("GET", "/ari/channels/c1/variable")] = (404, {"message": "not found"})
    assert await client.get_var("c1", "UNSET") is None


async def test_no_response_is_ari_error_status_0() -> None:
    with socket.socket() as unused:  # bound but not listening: connection refused
        unused.bind(("127.0.0.1", 0))
        async with AriClient(make_config(unused.getsockname()[1])) as c:
            with pytest.raises(AriError) as info:
                await c.answer("c1")
    assert info.value.status == 0
    assert "POST /channels/c1/answer" in str(info.value)


async def test_use_outside_context_manager_is_an_error() -> None:
    c = AriClient(make_config(1))
    with pytest.raises(RuntimeError):
        await c.answer("c1")


def test_password_not_in_config_repr() -> None:
    assert PASSWORD not in repr(make_config(1))


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    for attempt in range(40):
        delay = backoff_delay(attempt, 0.2, 5.0)
        expected = min(5.0, 0.2 * 2**attempt)
        assert expected / 2 <= delay <= expected
    assert backoff_delay(100, 0.2, 5.0) <= 5.0


# -------------------------------------------------------------------------- events


async def test_events_delivered_in_order(fake: FakeAri, client: AriClient) -> None:
    async with contextlib.aclosing(client.events()) as it:
        assert await next_event(it) == {"type": "TransportConnected"}
        assert client.connected
        assert fake.ws_queries == [{"app": "consent-gate", "subscribeAll": "false"}]
        ws = await asyncio.wait_for(fake.connections.get(), T)
        sent = [
            {"type": "StasisStart", "application": "consent-gate", "channel": {"id": f"c{i}"}}
            for i in range(20)
        ]
        for event in sent:
            await ws.send_str(json.dumps(event))
        assert [await next_event(it) for _ in sent] == sent


async def test_malformed_frames_are_logged_and_skipped(fake: FakeAri, client: AriClient) -> None:
    with structlog.testing.capture_logs() as logs:
        async with contextlib.aclosing(client.events()) as it:
            assert (await next_event(it))["type"] == "TransportConnected"
            ws = await asyncio.wait_for(fake.connections.get(), T)
            await ws.send_str("this is not json")
            await ws.send_str("[1, 2, 3]")
            await ws.send_str('{"no": "type"}')
            await ws.send_str('{"type": 7}')
            await ws.send_bytes(b"\x00\x01binary")
            await ws.send_str('{"type": "ChannelDtmfReceived", "digit": "1"}')
            assert await next_event(it) == {"type": "ChannelDtmfReceived", "digit": "1"}
            assert client.connected
    assert logged(logs, "ari.ws.bad_frame") == 5


async def test_server_close_yields_disconnect_then_reconnects(
    fake: FakeAri, client: AriClient
) -> None:
    async with contextlib.aclosing(client.events()) as it:
        assert (await next_event(it))["type"] == "TransportConnected"
        ws = await asyncio.wait_for(fake.connections.get(), T)
        await ws.send_str('{"type": "StasisStart"}')
        await ws.close()
        assert (await next_event(it))["type"] == "StasisStart"
        gone = await next_event(it)
        assert gone["type"] == "TransportDisconnected"
        assert gone["reason"]
        assert not client.connected
        assert (await next_event(it))["type"] == "TransportConnected"
        assert client.connected
        ws2 = await asyncio.wait_for(fake.connections.get(), T)
        await ws2.send_str('{"type": "StasisEnd"}')
        assert (await next_event(it))["type"] == "StasisEnd"
    assert len(fake.ws_queries) == 2


async def test_silent_peer_is_detected_by_heartbeat(fake: FakeAri) -> None:
    fake.autoping = False  # TCP stays up but nobody answers: only pings can notice
    async with AriClient(make_config(fake.port, heartbeat=0.05)) as c:
        async with contextlib.aclosing(c.events()) as it:
            assert (await next_event(it))["type"] == "TransportConnected"
            gone = await next_event(it)
            assert gone["type"] == "TransportDisconnected"
            assert "PONG" in gone["reason"]


async def test_server_down_at_first_retries_until_up() -> None:
    server = FakeAri()  # bound, not yet listening
    try:
        with structlog.testing.capture_logs() as logs:
            async with AriClient(make_config(server.port)) as c:
                async with contextlib.aclosing(c.events()) as it:
                    first = asyncio.ensure_future(anext(it))
                    await wait_until(lambda: logged(logs, "ari.ws.connect_failed") >= 3)
                    assert not first.done() and not c.connected
                    await server.start()
                    assert await asyncio.wait_for(first, T) == {"type": "TransportConnected"}
                    ws = await asyncio.wait_for(server.connections.get(), T)
                    await ws.send_str('{"type": "StasisStart"}')
                    assert (await next_event(it))["type"] == "StasisStart"
        # failed connects are not drops: no TransportDisconnected was produced
        assert logged(logs, "ari.ws.disconnected") == 0
    finally:
        await server.stop()


async def test_bad_credentials_retry_and_never_log_password(fake: FakeAri) -> None:
    token = base64.b64encode(f"{USER}:wrong-pw".encode()).decode()
    with structlog.testing.capture_logs() as logs:
        async with AriClient(make_config(fake.port, password="wrong-pw")) as c:
            async with contextlib.aclosing(c.events()) as it:
                pending = asyncio.ensure_future(anext(it))
                await wait_until(lambda: logged(logs, "ari.ws.connect_failed") >= 2)
                await c.close()
                with pytest.raises(StopAsyncIteration):
                    await asyncio.wait_for(pending, T)
    text = repr(logs)
    assert "401" in text
    assert "wrong-pw" not in text and token not in text


async def test_close_during_reconnect_wait_ends_iteration_promptly(fake: FakeAri) -> None:
    # A long backoff: only close() can end the wait within the bound T.
    config = make_config(fake.port, reconnect_initial=30.0, reconnect_max=60.0)
    with structlog.testing.capture_logs() as logs:
        async with AriClient(config) as c:
            it = c.events()
            assert (await next_event(it))["type"] == "TransportConnected"
            ws = await asyncio.wait_for(fake.connections.get(), T)
            await ws.close()
            assert (await next_event(it))["type"] == "TransportDisconnected"
            pending = asyncio.ensure_future(anext(it))
            await wait_until(lambda: logged(logs, "ari.ws.reconnect_wait") >= 1)
            await c.close()
            with pytest.raises(StopAsyncIteration):
                await asyncio.wait_for(pending, T)


async def test_close_while_connected_ends_iteration(fake: FakeAri, client: AriClient) -> None:
    received: list[dict[str, Any]] = []

    async def consume() -> None:
        async for event in client.events():
            received.append(event)

    task = asyncio.ensure_future(consume())
    ws = await asyncio.wait_for(fake.connections.get(), T)
    await wait_until(lambda: client.connected)
    await client.close()
    await asyncio.wait_for(task, T)  # ends normally, no exception
    assert [e["type"] for e in received] == ["TransportConnected"]  # no synthetic drop on close
    await wait_until(lambda: ws.closed)


@pytest.mark.parametrize("server_up", [True, False], ids=["connected", "backoff"])
async def test_cancellation_propagates(server_up: bool) -> None:
    server = FakeAri()
    if server_up:
        await server.start()
    try:
        with structlog.testing.capture_logs() as logs:
            async with AriClient(make_config(server.port, reconnect_initial=30.0)) as c:
                received: list[dict[str, Any]] = []

                async def consume() -> None:
                    async for event in c.events():
                        received.append(event)

                task = asyncio.ensure_future(consume())
                if server_up:
                    ws = await asyncio.wait_for(server.connections.get(), T)
                    await wait_until(lambda: bool(received))
                else:
                    await wait_until(lambda: logged(logs, "ari.ws.reconnect_wait") >= 1)
                await cancel_and_check(task)
                assert not c.connected
                if server_up:
                    await wait_until(lambda: ws.closed)
                # the client is still usable: a fresh iteration may start
                if server_up:
                    async with contextlib.aclosing(c.events()) as it:
                        assert (await next_event(it))["type"] == "TransportConnected"
    finally:
        await server.stop()


async def test_backoff_resets_after_successful_connect() -> None:
    server = FakeAri()
    config = make_config(server.port, reconnect_initial=0.01, reconnect_max=10.0)
    try:
        with structlog.testing.capture_logs() as logs:
            async with AriClient(config) as c:
                async with contextlib.aclosing(c.events()) as it:
                    first = asyncio.ensure_future(anext(it))
                    await wait_until(lambda: logged(logs, "ari.ws.reconnect_wait") >= 5)
                    waits = [e["delay"] for e in logs if e["event"] == "ari.ws.reconnect_wait"]
                    assert waits[4] >= 0.08  # 0.01 * 2**4, jittered to >= half
                    await server.start()
                    assert (await asyncio.wait_for(first, T))["type"] == "TransportConnected"
                    before = logged(logs, "ari.ws.reconnect_wait")
                    ws = await asyncio.wait_for(server.connections.get(), T)
                    await ws.close()
                    assert (await next_event(it))["type"] == "TransportDisconnected"
                    assert (await next_event(it))["type"] == "TransportConnected"
                    waits = [e["delay"] for e in logs if e["event"] == "ari.ws.reconnect_wait"]
                    assert waits[before] <= 0.01  # back to reconnect_initial
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def hung_server() -> AsyncIterator[tuple[int, asyncio.Event]]:
    """Accepts TCP but never answers the websocket handshake (a wedged Asterisk)."""
    accepted = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await reader.read()  # until the client gives up
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], accepted
    finally:
        server.close()
        await server.wait_closed()


async def test_handshake_timeout_is_retried() -> None:
    async with hung_server() as (port, _):
        with structlog.testing.capture_logs() as logs:
            async with AriClient(make_config(port, request_timeout=0.05)) as c:
                async with contextlib.aclosing(c.events()) as it:
                    pending = asyncio.ensure_future(anext(it))
                    await wait_until(lambda: logged(logs, "ari.ws.connect_failed") >= 2)
                    await c.close()
                    with pytest.raises(StopAsyncIteration):
                        await asyncio.wait_for(pending, T)
    failures = [e for e in logs if e["event"] == "ari.ws.connect_failed"]
    assert all("TimeoutError" in e["error"] for e in failures)


async def test_cancellation_during_handshake_propagates() -> None:
    async with hung_server() as (port, accepted):
        async with AriClient(make_config(port, request_timeout=30.0)) as c:
            task = asyncio.ensure_future(anext(c.events()))
            await asyncio.wait_for(accepted.wait(), T)
            await cancel_and_check(task)


async def test_request_cancellation_propagates(fake: FakeAri, client: AriClient) -> None:
    fake.gate = asyncio.Event()  # the fake holds the request open until released
    try:
        task = asyncio.ensure_future(client.answer("c1"))
        await asyncio.wait_for(fake.entered.wait(), T)
        await cancel_and_check(task)
    finally:
        fake.gate.set()


async def test_only_one_events_iteration_at_a_time(fake: FakeAri, client: AriClient) -> None:
    async with contextlib.aclosing(client.events()) as it:
        assert (await next_event(it))["type"] == "TransportConnected"
        with pytest.raises(RuntimeError):
            await anext(client.events())


# -- releasing a call unrecorded (consent_gate.ari.call.release_unrecorded) ---------------------------

IN_STASIS = (200, {"id": "c1", "dialplan": {"app_name": "Stasis"}})
LABEL = {"context": "consent-gate-released", "extension": "s", "label": "release"}


async def test_release_continues_at_the_label_that_clears_the_result(fake: FakeAri, client: AriClient) -> None:
    from consent_gate.ari.call import release_unrecorded

    fake.responses[("GET", "/ari/channels/c1")] = IN_STASIS
    await release_unrecorded(client, "c1", fallback_timeout=1)
    assert [(r["method"], r["raw_path"], r["query"]) for r in fake.requests] == [
        ("GET", "/ari/channels/c1", {}),
        ("POST", "/ari/channels/c1/continue", LABEL),
    ]


async def test_release_without_the_label_clears_the_result_then_continues(fake: FakeAri, client: AriClient) -> None:
    """An older include has no "release" label (ARI: 404 while the channel exists)."""
    from consent_gate.ari.call import release_unrecorded

    fake.responses[("POST", "/ari/channels/c1/continue")] = (404, {"message": "Requested label: release can not be found"})
    fake.responses[("GET", "/ari/channels/c1")] = IN_STASIS
    await release_unrecorded(client, "c1", fallback_timeout=1)
    assert [(r["method"], r["raw_path"], r["query"]) for r in fake.requests] == [
        ("GET", "/ari/channels/c1", {}),
        ("POST", "/ari/channels/c1/continue", LABEL),
        ("GET", "/ari/channels/c1", {}),
        ("POST", "/ari/channels/c1/variable", {"variable": "CONSENT_RESULT", "value": ""}),
        ("POST", "/ari/channels/c1/continue", {}),  # back to the Stasis() call, result cleared
    ]


@pytest.mark.parametrize("channel", [(404, {"message": "Channel not found"}),
                                     (200, {"id": "c1", "dialplan": {"app_name": "Dial"}})],
                         ids=["hung-up", "back-in-the-dialplan"])
async def test_release_leaves_a_channel_that_is_not_in_stasis_alone(
    fake: FakeAri, client: AriClient, channel: tuple[int, dict]
) -> None:
    """Nothing to release -- and pulling a caller out of the admin's Dial() would end the call."""
    fake.responses[("GET", "/ari/channels/c1")] = channel
    ami_server = await release_with_ami(client, "Success")
    assert [r["raw_path"] for r in fake.requests] == ["/ari/channels/c1"]
    assert ami_server.actions == []


async def test_release_that_cannot_clear_the_result_never_continues(fake: FakeAri, client: AriClient) -> None:
    from consent_gate.ari.call import release_unrecorded

    fake.responses[("POST", "/ari/channels/c1/continue")] = (404, {"message": "label not found"})
    fake.responses[("GET", "/ari/channels/c1")] = IN_STASIS
    fake.responses[("POST", "/ari/channels/c1/variable")] = (500, {"message": "boom"})
    with pytest.raises(AriError):
        await release_unrecorded(client, "c1", fallback_timeout=1)
    assert [r["raw_path"] for r in fake.requests].count("/ari/channels/c1/continue") == 1


@pytest.mark.parametrize("reply", ["Success", "Error"])
async def test_release_redirects_over_ami_first_and_falls_back_to_ari(
    fake: FakeAri, client: AriClient, reply: str
) -> None:
    """AMI Redirect cuts a playing prompt short (ARI would wait for it); if AMI refuses, ARI's
    continue to the label does the release."""
    fake.responses[("GET", "/ari/channels/c1")] = IN_STASIS
    ami_server = await release_with_ami(client, reply)
    [redirect] = [a for a in ami_server.actions if a["Action"] == "Redirect"]
    assert {k: redirect[k] for k in ("Channel", "Context", "Exten", "Priority")} == {
        "Channel": "PJSIP/caller-0001", "Context": "consent-gate-released", "Exten": "s", "Priority": "release"}
    ari_calls = [(r["method"], r["raw_path"]) for r in fake.requests]
    assert ari_calls == [("GET", "/ari/channels/c1")] + ([] if reply == "Success" else [("POST", "/ari/channels/c1/continue")])


async def release_with_ami(client: AriClient, redirect_reply: str) -> FakeAmi:
    """Run release_unrecorded("c1") with an AMI that answers Redirect with ``redirect_reply``."""
    from consent_gate.ari.call import release_unrecorded

    ami_server = FakeAmi(redirect_reply)
    await ami_server.start()
    ami = AmiClient(AmiConfig("127.0.0.1", ami_server.port, "cg", "secret", timeout=2))
    try:
        await release_unrecorded(client, "c1", fallback_timeout=1, ami=ami, channel_name="PJSIP/caller-0001")
    finally:
        await ami.close()
        await ami_server.stop()
    return ami_server

"""The data-subject HTTP API (aiohttp, real server on 127.0.0.1, real PostgreSQL, real files)."""

from __future__ import annotations

import io
import json
import uuid
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from consent_gate.admin import api
from consent_gate.config import ConfigError
from consent_gate.core.events import EventKind
from consent_gate_rig.ledgerdata import DAY, HMAC_KEY, PURPOSES, T0, Clock, add_decision, rows, write_recording

TOKEN = "t0ken-" + "x" * 40
NUMBER = "+45 33 44 55 66"
OTHER = "+45 99 88 77 66"


@pytest_asyncio.fixture
async def client(db: str, recdir: Path) -> AsyncIterator[TestClient]:
    app = api.create_app(dsn=db, hmac_key=HMAC_KEY, recordings_dir=recdir, purposes=PURPOSES, token=TOKEN,
                         clock=Clock(T0 + DAY))
    async with TestClient(TestServer(app, host="127.0.0.1")) as test_client:
        yield test_client


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def post(client: TestClient, path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
    return await client.post(path, json=body, headers=auth() if headers is None else headers)


# -- authentication ------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": ""},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": "Bearer wrong-token-wrong-token-wrong"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Bearer {TOKEN[:-1]}"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": f"bearer{TOKEN}"},
    {"X-Api-Token": TOKEN},
])
@pytest.mark.parametrize("path", ["/v1/subject/export", "/v1/subject/erase", "/v1/nothing-here"])
async def test_missing_or_wrong_token_is_401_before_anything_else(
    client: TestClient, conn: asyncpg.Connection, recdir: Path, headers: dict[str, str], path: str,
) -> None:
    d = await add_decision(conn, at=T0, number=NUMBER)
    [file] = write_recording(recdir, d.recording_id)
    response = await post(client, path, {"consent_id": str(d.consent_id)}, headers=headers)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert await response.json() == {"error": "unauthorized"}
    assert file.exists() and (await rows(conn, d.consent_id))[0]["caller_ref"] == d.caller_ref


async def test_token_is_compared_in_constant_time(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = api.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(api.hmac, "compare_digest", spy)
    await post(client, "/v1/subject/export", {"consent_id": str(uuid.uuid4())}, headers=auth("short"))
    assert len(calls) == 1 and len(calls[0][0]) == len(calls[0][1]) == 32, "digests: no length leak"


def test_a_short_token_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        api.create_app(dsn="postgresql://x", hmac_key=HMAC_KEY, recordings_dir=tmp_path, purposes=PURPOSES,
                       token="short")


def test_token_comes_from_env_or_file_never_a_default(tmp_path: Path) -> None:
    from consent_gate.config import load_settings

    settings = load_settings(None, env={"CONSENT_GATE_HMAC_KEY": "k" * 32}, require_ari=False)
    with pytest.raises(ConfigError, match="CONSENT_GATE_API_TOKEN"):
        api.api_token(settings, env={})
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert api.api_token(settings, env={"CONSENT_GATE_API_TOKEN_FILE": str(token_file)}) == TOKEN
    with pytest.raises(ConfigError, match="at least"):
        api.api_token(settings, env={"CONSENT_GATE_API_TOKEN": "short"})


def test_api_listen_setting_is_validated(tmp_path: Path) -> None:
    from consent_gate.config import load_settings

    config = tmp_path / "c.toml"
    config.write_text('[api]\nlisten = "127.0.0.1"\n')
    with pytest.raises(ConfigError, match="api.listen"):
        load_settings(config, env={"CONSENT_GATE_HMAC_KEY": "k" * 32}, require_ari=False)
    config.write_text('[api]\ntoken_fiel = "/x"\n')
    with pytest.raises(ConfigError, match="api.token_fiel: unknown key"):
        load_settings(config, env={"CONSENT_GATE_HMAC_KEY": "k" * 32}, require_ari=False)


# -- not found: the same answer, nothing leaked ----------------------------------------------------

@pytest.mark.parametrize("body", [
    {"consent_id": str(uuid.UUID(int=42))},
    {"consent_id": "not-a-uuid"},
    {"consent_id": "../../etc/passwd"},
    {"caller_number": "+45 00 00 00 01"},
    {"caller_number": "anonymous"},
])
@pytest.mark.parametrize("path", ["/v1/subject/export", "/v1/subject/erase"])
async def test_unknown_reference_is_404_with_one_body(
    client: TestClient, conn: asyncpg.Connection, recdir: Path, body: dict[str, str], path: str,
) -> None:
    other = await add_decision(conn, at=T0, number=OTHER)
    [file] = write_recording(recdir, other.recording_id)
    response = await post(client, path, body)
    assert response.status == 404
    assert await response.json() == {"error": "no records for this person"}
    assert response.headers["Cache-Control"] == "no-store"
    assert file.exists()
    assert await conn.fetchval("SELECT count(*) FROM data_erasures") == 0


@pytest.mark.parametrize("body, status", [
    ({}, 400),
    ({"caller_number": NUMBER, "consent_id": str(uuid.uuid4())}, 400),
    ({"consent_id": 12}, 400),
    ({"consent_id": str(uuid.uuid4()), "callerid": "x"}, 400),
    (["consent_id"], 400),
    ({"caller_number": "1" * 65}, 400),
])
async def test_malformed_requests_are_400(client: TestClient, body: Any, status: int) -> None:
    response = await post(client, "/v1/subject/export", body)
    assert response.status == status
    assert "error" in await response.json()


async def test_not_json_and_too_large_bodies(client: TestClient) -> None:
    response = await client.post("/v1/subject/export", data="consent_id=1", headers=auth())
    assert response.status == 400
    response = await client.post("/v1/subject/export", data=b"{" + b" " * (64 * 1024) + b"}",
                                 headers={**auth(), "Content-Type": "application/json"})
    assert response.status == 413
    response = await client.get("/v1/subject/export", headers=auth())
    assert response.status == 405


@pytest.mark.parametrize("path", ["/v1/subject/export", "/v1/subject/erase"])
async def test_deeply_nested_json_is_400_not_500(client: TestClient, path: str) -> None:
    """8,000 nested arrays make json.loads raise RecursionError (not a ValueError)."""
    deep = "[" * 8000 + "]" * 8000
    for body in (deep, '{"consent_id": ' + deep + "}"):
        response = await client.post(path, data=body, headers={**auth(), "Content-Type": "application/json"})
        assert response.status == 400, await response.text()
        assert await response.json() == {"error": "not valid JSON"}


@pytest.mark.parametrize("reference", [
    "{%s}",          # Python's uuid.UUID takes braces ...
    "urn:uuid:%s",   # ... and the URN form, which PostgreSQL refuses
    "{%s",
    " %s ",
    "%s\\u0000",
])
@pytest.mark.parametrize("path", ["/v1/subject/export", "/v1/subject/erase"])
async def test_uuid_lookalike_references_are_404_not_500(
    client: TestClient, conn: asyncpg.Connection, recdir: Path, reference: str, path: str,
) -> None:
    d = await add_decision(conn, at=T0, number=NUMBER)
    [file] = write_recording(recdir, d.recording_id)
    response = await client.post(path, data=('{"consent_id": "' + reference % d.consent_id + '"}').encode(),
                                 headers={**auth(), "Content-Type": "application/json"})
    assert response.status == 404, await response.text()
    assert await response.json() == {"error": "no records for this person"}
    assert file.exists() and await conn.fetchval("SELECT count(*) FROM data_erasures") == 0


@pytest.mark.parametrize("field", ["reason", "request_ref", "actor"])
async def test_control_characters_in_a_field_are_400(
    client: TestClient, conn: asyncpg.Connection, recdir: Path, field: str,
) -> None:
    """PostgreSQL text cannot hold NUL (a 500 before); nothing with control characters is stored."""
    d = await add_decision(conn, at=T0, number=NUMBER)
    [file] = write_recording(recdir, d.recording_id)
    for bad in ("a\\u0000b", "line\\nbreak"):
        response = await client.post(
            "/v1/subject/erase", data=('{"consent_id": "%s", "%s": "%s"}' % (d.consent_id, field, bad)).encode(),
            headers={**auth(), "Content-Type": "application/json"})
        assert response.status == 400, await response.text()
        assert field in (await response.json())["error"]
    assert file.exists() and await conn.fetchval("SELECT count(*) FROM data_erasures") == 0


@pytest.mark.parametrize("path", [
    "/v1/subject/{uuid}", "/v1/subject/%7B" + "0" * 8 + "-0000-0000-0000-" + "0" * 12 + "%7D",
    "/v1/subject/export/extra", "/v1/subject/%00", "/v1/subject/%ff%fe", "/v1/" + "a" * 4000,
])
async def test_unknown_or_malformed_paths_are_404(client: TestClient, path: str) -> None:
    response = await client.post(path, json={"consent_id": str(uuid.uuid4())}, headers=auth())
    assert response.status == 404, await response.text()
    assert await response.json() == {"error": "not found"}


# -- export and erase ----------------------------------------------------------------------------

async def test_export_by_number_returns_the_archive(client: TestClient, conn: asyncpg.Connection,
                                                    recdir: Path) -> None:
    d = await add_decision(conn, at=T0, number=NUMBER)
    other = await add_decision(conn, at=T0, number=OTHER)
    files = write_recording(recdir, d.recording_id, legs=True)
    write_recording(recdir, other.recording_id)
    response = await post(client, "/v1/subject/export", {"caller_number": "+4533445566", "actor": "crm:jens"})
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/zip"
    assert response.headers["Cache-Control"] == "no-store"
    assert "4533445566" not in response.headers["Content-Disposition"]
    archive = zipfile.ZipFile(io.BytesIO(await response.read()))
    for path in files:
        assert archive.read(f"recordings/{path.name}") == path.read_bytes()
    records = json.loads(archive.read("consent-records.json"))
    assert [x["consent_id"] for x in records["decisions"]] == [str(d.consent_id)]
    assert other.recording_id not in archive.namelist().__str__() and other.caller_ref not in json.dumps(records)


async def test_erase_by_reference_and_legal_obligation_refusal(
    client: TestClient, conn: asyncpg.Connection, recdir: Path,
) -> None:
    d = await add_decision(conn, at=T0, number=NUMBER)
    broker = await add_decision(conn, at=T0, number=OTHER, purpose="mifid", event=EventKind.NOTIFIED)
    files = write_recording(recdir, d.recording_id, legs=True)
    [broker_file] = write_recording(recdir, broker.recording_id)

    response = await post(client, "/v1/subject/erase",
                          {"consent_id": str(d.consent_id), "reason": "email 2031-03-02", "request_ref": "CRM-77"})
    assert response.status == 200
    result = await response.json()
    assert result["status"] == "erased" and result["refused"] == []
    assert not any(p.exists() for p in files)
    assert (await rows(conn, d.consent_id))[0]["caller_ref"] is None

    response = await post(client, "/v1/subject/erase", {"caller_number": OTHER})
    result = await response.json()
    assert response.status == 200 and result["status"] == "refused"
    assert "Art. 17(3)(b)" in result["refused"][0]["reason"]
    assert broker_file.exists()
    [refusal] = await conn.fetch("SELECT kind, actor FROM data_erasures WHERE consent_id = $1", broker.consent_id)
    assert refusal["kind"] == "refusal" and refusal["actor"].startswith("api@127.0.0.1")
    # The response names the decisions of this person only.
    assert str(d.consent_id) not in json.dumps(result)


async def test_serve_listens_where_configured_and_stops_cleanly(db: str, recdir: Path) -> None:
    import asyncio
    import socket
    from dataclasses import replace

    import aiohttp

    from consent_gate.config import load_settings

    with socket.socket() as probe:  # a free loopback port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = replace(load_settings(None, env={"CONSENT_GATE_HMAC_KEY": HMAC_KEY.decode()}, require_ari=False),
                       database_dsn=db, recordings_dir=recdir)
    server = asyncio.create_task(api.serve(settings, f"127.0.0.1:{port}", TOKEN))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    try:
        async with aiohttp.ClientSession() as session:
            while True:
                assert not server.done(), server.exception() if server.done() else None
                try:
                    async with session.post(f"http://127.0.0.1:{port}/v1/subject/export", json={}) as response:
                        assert response.status == 401
                        break
                except aiohttp.ClientConnectorError:
                    assert loop.time() < deadline, "the API did not start listening"
                    await asyncio.sleep(0.02)
            async with session.post(f"http://127.0.0.1:{port}/v1/subject/export", headers=auth(),
                                    json={"consent_id": str(uuid.uuid4())}) as response:
                assert response.status == 404
    finally:
        server.cancel()
        with pytest.raises(asyncio.CancelledError):
            await server


async def test_api_exports_and_erases_the_training_copy(db: str, conn: asyncpg.Connection, recdir: Path,
                                                         tmp_path: Path) -> None:
    """The CRM path covers training copies too (they are still personal data while linked)."""
    from consent_gate_rig.ledgerdata import add_training_copy

    d = await add_decision(conn, at=T0, number=NUMBER)
    copies = tmp_path / "copies"
    copy_id = await add_training_copy(conn, d.recording_id, copies)
    app = api.create_app(dsn=db, hmac_key=HMAC_KEY, recordings_dir=recdir, purposes=PURPOSES, token=TOKEN,
                         clock=Clock(T0 + DAY), copies_dir=copies)
    async with TestClient(TestServer(app, host="127.0.0.1")) as copies_client:
        response = await post(copies_client, "/v1/subject/export", {"consent_id": str(d.consent_id)})
        archive = zipfile.ZipFile(io.BytesIO(await response.read()))
        assert f"training-copies/{copy_id}.wav" in archive.namelist()
        response = await post(copies_client, "/v1/subject/erase", {"consent_id": str(d.consent_id)})
        result = await response.json()
    assert (result["status"], result["training_copies_erased"]) == ("erased", 1)
    assert not (copies / f"{copy_id}.wav").exists()

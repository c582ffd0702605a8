"""Several nodes, one ledger (issue 15): a node's HMAC key and prompt set must match those the
ledger already knows, and its Asterisk's systemname must be its own (call ids are channel
uniqueids).  Against the real test PostgreSQL (a migrated database per test) and, for
--check-config, the real service process (tests/unit/conftest.py's service fixtures)."""

from __future__ import annotations

import threading

import asyncpg
import pytest

from consent_gate.ledger.cluster import ClusterMismatch, check_node, key_fingerprint
from consent_gate.prompts.catalog import PromptCatalog, packaged_sounds_dir
from consent_gate_rig.fakes import ScriptedAmi, ScriptedAriInfo
from consent_gate_rig.harness import run_ari_command

KEY = b"cluster-check-key-0123456789abcdef"
PROMPTS = [("da", "question-training", "a" * 64), ("en", "question-training", "b" * 64)]


async def test_the_first_node_records_and_a_matching_node_passes(db: str) -> None:
    first = await check_node(db, hmac_key=KEY, prompts=PROMPTS, node="pbx-a")
    assert set(first.recorded) == {"hmac-key", "prompt-set"}
    again = await check_node(db, hmac_key=KEY, prompts=list(reversed(PROMPTS)), node="pbx-b")
    assert again.recorded == ()
    connection = await asyncpg.connect(db)
    try:
        rows = {r["name"]: dict(r) for r in await connection.fetch("SELECT * FROM cluster_identity")}
    finally:
        await connection.close()
    assert rows["hmac-key"]["fingerprint"] == key_fingerprint(KEY)
    assert KEY.decode() not in str(rows), "only a fingerprint, never the key"
    assert {r["first_node"] for r in rows.values()} == {"pbx-a"}


async def test_another_key_or_another_prompt_set_is_refused(db: str) -> None:
    await check_node(db, hmac_key=KEY, prompts=PROMPTS, node="pbx-a")
    with pytest.raises(ClusterMismatch, match="HMAC key differs from the one node 'pbx-a'"):
        await check_node(db, hmac_key=KEY + b"x", prompts=PROMPTS, node="pbx-b")
    changed = [*PROMPTS[:1], ("en", "question-training", "c" * 64)]
    with pytest.raises(ClusterMismatch, match="prompt set differs"):
        await check_node(db, hmac_key=KEY, prompts=changed, node="pbx-b")
    with pytest.raises(ClusterMismatch, match="prompt set differs"):  # a prompt more is a change too
        await check_node(db, hmac_key=KEY, prompts=[*PROMPTS, ("en", "granted", "d" * 64)], node="pbx-b")


async def test_two_nodes_may_not_share_an_asterisk_systemname(db: str) -> None:
    await check_node(db, hmac_key=KEY, prompts=PROMPTS, system_name="pbx-a", node="host-a")
    await check_node(db, hmac_key=KEY, prompts=PROMPTS, system_name="pbx-a", node="host-a")  # again: fine
    await check_node(db, hmac_key=KEY, prompts=PROMPTS, system_name="pbx-b", node="host-b")
    with pytest.raises(ClusterMismatch, match="systemname 'pbx-a' is already used by node 'host-a'"):
        await check_node(db, hmac_key=KEY, prompts=PROMPTS, system_name="pbx-a", node="host-c")
    # No systemname is a systemname too: the second node without one would repeat the first's ids.
    await check_node(db, hmac_key=KEY, prompts=PROMPTS, system_name="", node="host-d")
    with pytest.raises(ClusterMismatch, match=r"systemname \(none set\) is already used by node 'host-d'"):
        await check_node(db, hmac_key=KEY, prompts=PROMPTS, system_name="", node="host-e")


def test_check_config_refuses_a_second_node_with_the_same_systemname(
    service_env: dict[str, str], ami: ScriptedAmi, ari_info: ScriptedAriInfo,
) -> None:
    code, output = run_ari_command(service_env, "--check-config")
    assert (code, output.strip()) == (0, "configuration ok")
    assert [path.split("?")[0] for path in ari_info.requests] == ["/ari/asterisk/info"]
    password = service_env["CONSENT_GATE_ARI_PASSWORD"]
    # Another Asterisk (entity id) with the same systemname; another with its own; the same
    # Asterisk reached through another URL is still the same node.
    twin = ScriptedAriInfo("consent-gate", password, ari_info.system_name, entity_id="02:00:00:00:00:0b")
    other = ScriptedAriInfo("consent-gate", password, "pbx-b", entity_id="02:00:00:00:00:0c")
    same = ScriptedAriInfo("consent-gate", password, ari_info.system_name, entity_id=ari_info.entity_id)
    for server in (twin, other, same):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code, output = run_ari_command(service_env, "--check-config", CONSENT_GATE_ARI_URL=twin.url)
        assert code == 2 and "cluster: Asterisk systemname 'pbx-a' is already used by node 'Asterisk 02:00:00:00:00:0a" in output, output
        code, output = run_ari_command(service_env, "--check-config", CONSENT_GATE_ARI_URL=same.url)
        assert (code, output.strip()) == (0, "configuration ok")
        code, output = run_ari_command(service_env, "--check-config", CONSENT_GATE_ARI_URL=other.url)
        assert (code, output.strip()) == (0, "configuration ok")
        code, output = run_ari_command(service_env, "--check-config", CONSENT_GATE_ARI_URL=other.url,
                                       CONSENT_GATE_ARI_PASSWORD="wrong-ari-password")
        assert code == 2 and f"ari: cannot read Asterisk's settings at {other.url} as 'consent-gate'" in output
        assert "wrong-ari-password" not in output
    finally:
        for server in (twin, other, same):
            server.shutdown()
            server.server_close()


def test_check_config_compares_the_node_with_the_ledger(service_env: dict[str, str], ami: ScriptedAmi) -> None:
    code, output = run_ari_command(service_env, "--check-config")
    assert (code, output.strip()) == (0, "configuration ok")
    # A second node with another key: refused, and the message shows no key.
    other = "another-nodes-hmac-key-987654321"
    code, output = run_ari_command(service_env, "--check-config", CONSENT_GATE_HMAC_KEY=other)
    assert code == 2 and "cluster: the HMAC key differs" in output, output
    assert other not in output and service_env["CONSENT_GATE_HMAC_KEY"] not in output


def test_check_config_fails_when_it_cannot_reach_the_ledger(service_env: dict[str, str], ami: ScriptedAmi) -> None:
    code, output = run_ari_command(service_env, "--check-config",
                            CONSENT_GATE_DSN="postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")
    assert code == 2 and "ledger: cannot compare this node with the ledger" in output, output


def test_the_packaged_prompt_inventory_covers_every_sound() -> None:
    catalog = PromptCatalog.load(packaged_sounds_dir())
    inventory = catalog.inventory()
    assert len(inventory) == len({(lang, name) for lang, name, _ in inventory}) >= 2
    assert all(len(version) == 64 for _, _, version in inventory)
    assert {lang for lang, _, _ in inventory} == set(catalog.languages)

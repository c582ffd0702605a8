"""Several nodes, one ledger (issue 15): a node's HMAC key and prompt set must match those the
ledger already knows.  Against the real test PostgreSQL (a migrated database per test) and, for
--check-config, the real service process (tests/unit/test_recordings_private.py's fixtures)."""

from __future__ import annotations

import asyncpg
import pytest

from consent_gate.ledger.cluster import ClusterMismatch, check_node, key_fingerprint
from consent_gate.prompts.catalog import PromptCatalog, packaged_sounds_dir
from tests.unit.test_recordings_private import (  # noqa: F401  (fixtures)
    ScriptedAmi,
    _service,
    ami,
    private,
    service_env,
)

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


def test_check_config_compares_the_node_with_the_ledger(service_env: dict[str, str], ami: ScriptedAmi) -> None:  # noqa: F811
    code, output = _service(service_env, "--check-config")
    assert (code, output.strip()) == (0, "configuration ok")
    # A second node with another key: refused, and the message shows no key.
    other = "another-nodes-hmac-key-987654321"
    code, output = _service(service_env, "--check-config", CONSENT_GATE_HMAC_KEY=other)
    assert code == 2 and "cluster: the HMAC key differs" in output, output
    assert other not in output and service_env["CONSENT_GATE_HMAC_KEY"] not in output


def test_check_config_fails_when_it_cannot_reach_the_ledger(service_env: dict[str, str], ami: ScriptedAmi) -> None:  # noqa: F811
    code, output = _service(service_env, "--check-config",
                            CONSENT_GATE_DSN="postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")
    assert code == 2 and "ledger: cannot compare this node with the ledger" in output, output


def test_the_packaged_prompt_inventory_covers_every_sound() -> None:
    catalog = PromptCatalog.load(packaged_sounds_dir())
    inventory = catalog.inventory()
    assert len(inventory) == len({(lang, name) for lang, name, _ in inventory}) >= 2
    assert all(len(version) == 64 for _, _, version in inventory)
    assert {lang for lang, _, _ in inventory} == set(catalog.languages)

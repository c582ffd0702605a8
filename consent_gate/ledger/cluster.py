"""Several nodes, one ledger: every node must pseudonymise with the same key and play the same
prompts, or their decisions stop being comparable (the same caller under two pseudonyms, a
prompt hash that no other node ever played).

``check_node`` compares this node's fingerprints with those in ``cluster_identity`` (migration
006); the first node to check records its own.  Only fingerprints are stored: the key's is an
HMAC of a fixed label under the key, from which the key cannot be recovered.

It also keeps call ids apart: the ledger's call_id is Asterisk's channel uniqueid,
"<systemname>-<epoch>.<sequence>", and two Asterisks with the same systemname (or none) hand out
the same ids.  ``cluster_nodes`` holds which node uses which systemname; a second node with one
already taken (the empty one included) is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg

KEY_LABEL = b"consent-gate cluster key fingerprint v1"


class ClusterMismatch(RuntimeError):
    """This node's key or prompt set differs from the one already in the ledger."""


def key_fingerprint(hmac_key: bytes) -> str:
    return hmac.new(hmac_key, KEY_LABEL, hashlib.sha256).hexdigest()


def prompt_set_fingerprint(prompts: Iterable[tuple[str, str, str]]) -> str:
    """sha256 over sorted (language, name, audio sha256) triples."""
    digest = hashlib.sha256()
    for lang, name, version in sorted(prompts):
        digest.update(f"{lang}\t{name}\t{version}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class NodeCheck:
    """What the check found: which fingerprints this node recorded first (empty: all matched)."""

    recorded: tuple[str, ...]


async def check_node(dsn: str, *, hmac_key: bytes, prompts: Iterable[tuple[str, str, str]],
                     system_name: str | None = None, node: str | None = None,
                     timeout: float = 10.0) -> NodeCheck:
    """Raise ClusterMismatch if the ledger knows other fingerprints, or (``system_name`` given)
    another node with this Asterisk systemname; record them if it knows none."""
    mine = {"hmac-key": key_fingerprint(hmac_key), "prompt-set": prompt_set_fingerprint(prompts)}
    node = (node or socket.gethostname())[:255] or "unknown"
    connection = await asyncpg.connect(dsn, timeout=timeout)
    try:
        recorded = []
        for name, fingerprint in mine.items():
            inserted = await connection.fetchval(
                "INSERT INTO cluster_identity (name, fingerprint, first_node) VALUES ($1, $2, $3)"
                " ON CONFLICT (name) DO NOTHING RETURNING name", name, fingerprint, node, timeout=timeout)
            if inserted:
                recorded.append(name)
        rows = await connection.fetch("SELECT name, fingerprint, first_node FROM cluster_identity", timeout=timeout)
        others: list[str] = []
        if system_name is not None:
            # Only the claim is inserted (no UPDATE for the gate's role); the primary key keeps
            # one node per systemname even when two nodes check at once.
            await connection.execute(
                "INSERT INTO cluster_nodes (system_name, node) VALUES ($1, $2) ON CONFLICT (system_name) DO NOTHING",
                system_name, node, timeout=timeout)
            others = [row["node"] for row in await connection.fetch(
                "SELECT node FROM cluster_nodes WHERE system_name = $1 AND node <> $2", system_name, node,
                timeout=timeout)]
    finally:
        await connection.close()
    known = {row["name"]: row for row in rows}
    problems = []
    if others:
        shown = repr(system_name) if system_name else "(none set)"
        problems.append(f"Asterisk systemname {shown} is already used by node {others[0]!r}: both would give "
                        "calls the same ids (channel uniqueids); set a systemname of its own on each node "
                        "(asterisk.conf [options] systemname)")
    if known["hmac-key"]["fingerprint"] != mine["hmac-key"]:
        problems.append(f"the HMAC key differs from the one node {known['hmac-key']['first_node']!r} "
                        "recorded (callers would get other pseudonyms on this node)")
    if known["prompt-set"]["fingerprint"] != mine["prompt-set"]:
        problems.append(f"the prompt set differs from the one node {known['prompt-set']['first_node']!r} "
                        "recorded (every node must play the same audio)")
    if problems:
        raise ClusterMismatch("; ".join(problems))
    return NodeCheck(tuple(recorded))

"""Several Asterisk nodes, one highly available ledger (issue 15): the nodes, the PostgreSQL
primary + synchronous standby, and a failover under load with what it must keep.

Ports derive from the session sandbox's (the CONSENT_GATE_SANDBOX_* variables) and from
CONSENT_GATE_TEST_PG_PORT, so CI's defaults and a developer's private ports both work:

* node ``i`` (0, 1, ...): SIP/HTTP/AMI = the session's + 4 + 2*i (the session's + 2 belongs to
  tests/integration/test_recordings_private.py), RTP the 200 ports from the session's end + 201
  + 200*i (a SIP-tier call holds two RTP sessions on its node: the caller's and the gate's);
* the PostgreSQL primary on CONSENT_GATE_TEST_PG_PORT + 1, the standby on + 2.

Used by tests/integration/test_scale_out.py and bench/load/failover.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from consent_gate_rig.calls import journal_entries, sandbox_settings_for_tests, wait_until
from consent_gate_rig.harness import AsteriskLog, GateService
from consent_gate_rig.pgsandbox import PatroniCluster, PgCluster
from consent_gate_rig.random_callers import (
    DECISIONS,
    InvariantReport,
    LocalCall,
    LocalTier,
    SipTier,
    random_call,
    resolve_sip_gate_channels,
    run_local_calls,
    settled_report,
)
from consent_gate_rig.sandbox import AsteriskSandbox, SandboxSettings


def node_settings(index: int, base: SandboxSettings | None = None) -> SandboxSettings:
    base = base or sandbox_settings_for_tests()
    step = 4 + 2 * index
    rtp = base.rtp_end + 201 + 200 * index
    return dataclasses.replace(base, name=f"{base.name}-node{index}", sip_port=base.sip_port + step,
                               http_port=base.http_port + step, ami_port=base.ami_port + step,
                               rtp_start=rtp, rtp_end=rtp + 199, system_name=f"{base.name}-node{index}",
                               entity_id=f"02:00:00:00:00:{index:02x}")


def cluster_ports() -> tuple[int, int]:
    base = int(os.environ.get("CONSENT_GATE_TEST_PG_PORT", "25532"))
    return base + 1, base + 2


@dataclass
class Node:
    """One Asterisk with its own consent-gate service (own journal), sharing the ledger."""

    sandbox: AsteriskSandbox
    service: GateService
    log: AsteriskLog | None = None
    calls: list[LocalCall] = field(default_factory=list)
    sip: bool = True
    recordings_before: set[str] = field(default_factory=set)

    def begin(self, calls: list[LocalCall]) -> None:
        self.calls = calls
        self.log = AsteriskLog(self.sandbox.full_log)
        self.recordings_before = {p.name for p in self.sandbox.recordings_dir.iterdir()}


@dataclass
class FailoverReport:
    calls: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    decided_before_loss: int = 0
    journaled_during_gap: int = 0
    # A grant the standby had flushed when the primary died, but whose acknowledgement never
    # reached the service: the ledger keeps the grant, the call went on unrecorded.  Counted,
    # see docs/deployment.md.
    unacknowledged_grants: list[str] = field(default_factory=list)
    gap_seconds: float = 0.0              # primary killed -> standby promoted
    loss_to_first_new_grant: float | None = None  # primary killed -> first grant stored in the new primary
    post_failover_grants: int = 0
    node_reports: list[InvariantReport] = field(default_factory=list)
    slowest_originate: float = 0.0


def short_random_calls(seed: int, count: int, tag: str) -> list[LocalCall]:
    """The randomised callers of test_faults_load, with their pauses capped (a bounded run)."""
    rng = random.Random(seed)
    calls = [random_call(rng, f"{tag}{i:03d}") for i in range(count)]
    for call in calls:
        call.delay, call.hold, call.delay2 = min(call.delay, 2.0), min(call.hold, 2.0), min(call.delay2, 2.0)
    return calls


async def decisions_stored(dsn: str, call_ids: Sequence[str]) -> list[dict]:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await connection.fetch(
            "SELECT call_id, event, event_id, consent_id, via_journal, stored_at, detail::text AS detail"
            " FROM consent_events WHERE call_id = ANY($1::text[]) AND event = ANY($2::text[])",
            list(call_ids), sorted(DECISIONS))
    finally:
        await connection.close()
    return [dict(row) for row in rows]


def journaled(nodes: Sequence[Node], call_ids: set[str]) -> list[dict]:
    return [e for node in nodes for e in journal_entries(node.service.journal_dir) if e["call_id"] in call_ids]


def gate_ids(nodes: Sequence[Node]) -> set[str]:
    """The ledger call_ids of every node's calls so far: a SIP call's is known once its node has
    logged it (a call not yet there keeps a placeholder that matches nothing)."""
    for node in nodes:
        if node.sip:
            assert node.log is not None
            resolve_sip_gate_channels(node.calls, node.log.text())
    return {c.gate_channel for node in nodes for c in node.calls}


async def failover_under_load(cluster: PgCluster | PatroniCluster, nodes: Sequence[Node], *, calls_per_node: int,
                              concurrency_per_node: int, seed: int, tag: str,
                              kill_after_decisions: int = 6, wave_after: int = 3,
                              sip: bool = True) -> FailoverReport:
    """Calls on every node (SIP calls, or ARI-Local ones with ``sip=False``); once
    ``kill_after_decisions`` decisions are stored the primary is killed, and once a node has
    journaled a decision the standby is promoted.  Then, when the journals have replayed,
    ``wave_after`` consenting calls per node must be granted and recorded again.  Returns what
    the ledger and the recordings show, violations and all."""
    report = FailoverReport()
    plans = [short_random_calls(seed + i, calls_per_node, f"{tag}n{i}") for i in range(len(nodes))]
    for node, plan in zip(nodes, plans, strict=True):
        node.sip = sip
        node.begin(plan)
    tier_type = SipTier if sip else LocalTier
    # 30 s, not 10: on the shared 2-core machine an originate once took longer than 10 s during
    # a Patroni failover (the slowest is reported).
    async with tier_type(nodes[0].sandbox, 30) as tier0, tier_type(nodes[1].sandbox, 30) as tier1:
        tiers = [tier0, tier1]
        load = [asyncio.create_task(run_local_calls(tier, node.calls, concurrency_per_node, per_call_timeout=90))
                for tier, node in zip(tiers, nodes, strict=True)]
        try:
            async def enough_decided() -> bool:
                return len(await decisions_stored(cluster.dsn, sorted(gate_ids(nodes)))) >= kill_after_decisions

            await wait_until(enough_decided, 60, f"{kill_after_decisions} decisions stored before the loss",
                             interval=0.2)
            report.decided_before_loss = len(await decisions_stored(cluster.dsn, sorted(gate_ids(nodes))))
            cluster.kill_primary()
            # From here on nothing can commit on the old primary: a grant stored later is a grant
            # in the new one (stored_at is the transaction's start, on the same clock).
            lost_at = time.time()
            await wait_until(lambda: any(e["event"] in DECISIONS for e in journaled(nodes, gate_ids(nodes))), 60,
                             "a decision journaled while no primary is reachable", interval=0.1)
            report.journaled_during_gap = sum(e["event"] in DECISIONS for e in journaled(nodes, gate_ids(nodes)))
            cluster.promote()
            report.gap_seconds = time.time() - lost_at
            await asyncio.gather(*load)
        finally:
            for task in load:
                task.cancel()
        await wait_until(lambda: not journaled(nodes, gate_ids(nodes)), 60,
                         "every journal to replay into the new primary", interval=0.25)
        # After the failover: consenting callers are asked and recorded again, on every node.
        waves = [[LocalCall(tag=f"{tag}w{i}{j}", kind="grant", keys="1", delay=0.5, hold=1.5)
                  for j in range(wave_after)] for i in range(len(nodes))]
        for node, wave in zip(nodes, waves, strict=True):
            node.calls = node.calls + wave
        # A fresh node's ledger leaves degraded mode at its next replay round: until then it
        # answers "unavailable" (fail closed), so the wave waits for a grant on every node.
        await asyncio.gather(*(run_local_calls(tier, wave, wave_after, per_call_timeout=90)
                               for tier, wave in zip(tiers, waves, strict=True)))
        report.slowest_originate = max(tier.slowest_originate for tier in tiers)
    all_ids = gate_ids(nodes)
    report.calls = len(all_ids)
    for node in nodes:
        if node.sip:
            assert node.log is not None
            unseen = resolve_sip_gate_channels(node.calls, node.log.text())
            report.violations += [f"{node.sandbox.settings.name}: SIP call {t} never reached the gate" for t in unseen]
    for node in nodes:
        assert node.log is not None
        node_report = await settled_report(node.calls, cluster.dsn, node.sandbox.recordings_dir,
                                           node.recordings_before, node.log)
        report.node_reports.append(node_report)
        report.outcomes.update(node_report.outcomes)
        for violation in node_report.violations:
            report.violations.append(f"{node.sandbox.settings.name}: {violation}")
    decisions = await decisions_stored(cluster.dsn, sorted(all_ids))
    # A grant stored although the service saw its write fail: the call went on "unavailable",
    # not recorded, and the ledger keeps the grant as the call's one decision (the fallback
    # shares its event_id).  Counted for the report; check_invariant already saw one decision.
    granted_ids = {d["call_id"] for d in decisions if d["event"] == "granted"}
    for node in nodes:
        assert node.log is not None
        said = dict(re.findall(r"consent-result: test=([A-Za-z0-9-]+) status=(\S+)", node.log.text()))
        report.unacknowledged_grants += [c.gate_channel for c in node.calls
                                         if c.gate_channel in granted_ids and said.get(c.tag) == "unavailable"]
    fresh = [d for d in decisions if d["event"] == "granted" and not d["via_journal"]
             and d["stored_at"].timestamp() > lost_at]
    if fresh:
        report.loss_to_first_new_grant = min(d["stored_at"].timestamp() for d in fresh) - lost_at
    wave_ids = {c.gate_channel for wave in waves for c in wave}
    report.post_failover_grants = sum(d["event"] == "granted" and d["call_id"] in wave_ids for d in decisions)
    return report

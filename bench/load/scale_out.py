#!/usr/bin/env python3
"""Scale-out benchmark (issue 15, not a test): calls/s and CPU per call on two nodes vs one, and
the time from losing the PostgreSQL primary to the first new grant stored in the promoted standby.

    python3 bench/load/scale_out.py [--calls-per-node 40] [--concurrency-per-node 12] [--failovers 3] \
        [--promote pg_ctl|patroni] [--tier sip|local] --out bench/load/scale-out.json

(``--calls-per-node 0``: the failovers only.)

Real parts: two sandbox Asterisk 22 nodes (ports: consent_gate_rig.scaleout, derived from the
CONSENT_GATE_SANDBOX_* variables), one consent-gate ARI service per node, a PostgreSQL primary
with a synchronous streaming standby (CONSENT_GATE_TEST_PG_PORT + 1 and + 2).

* Throughput: ``--calls-per-node`` consenting calls per node (key 1 after 0.5 s, hang up 1 s
  after the confirmation; SIP calls that each node's Asterisk places to itself, or ARI-Local
  calls with ``--tier local``), ``--concurrency-per-node`` at once on each node, first on node 0
  alone, then on both nodes at once.  CPU = user + system time (``/proc/PID/stat``) of the
  services, the Asterisk processes and every PostgreSQL process (primary and standby), between
  the first originate and the last hang-up.
* Failover: ``--failovers`` times, on a fresh primary + standby, tests/integration/test_scale_out's
  run (random callers on both nodes, SIGKILL the primary after 6 stored decisions, ``pg_ctl
  promote`` once a decision was journaled): the gap (kill -> promoted) and the time from the kill
  to the first grant stored, not journaled, in the new primary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from consent_gate.ledger.store import migrate
from consent_gate_rig.harness import SANDBOX_PURPOSES, AsteriskLog, GateService
from consent_gate_rig.pgsandbox import PatroniCluster, PgCluster, child_pids
from consent_gate_rig.random_callers import LocalCall, LocalTier, SipTier, resolve_sip_gate_channels, run_local_calls
from consent_gate_rig.sandbox import AsteriskSandbox
from consent_gate_rig.scaleout import Node, cluster_ports, decisions_stored, failover_under_load, node_settings

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def processes(cluster: PgCluster | PatroniCluster, nodes: list[Node]) -> list[int]:
    pids = []
    for node in nodes:
        if node.service.process is not None:
            pids.append(node.service.process.pid)
        if node.sandbox.state.pid is not None:
            pids.append(node.sandbox.state.pid)
    for pg in (cluster.primary, cluster.standby):
        if (pid := pg.postmaster_pid()) is not None:
            pids += [pid, *child_pids(pid)]
    return pids


async def throughput(cluster: PgCluster | PatroniCluster, nodes: list[Node], active: int, calls: int, concurrency: int,
                     sip: bool) -> dict:
    tag = f"tp{uuid.uuid4().hex[:6]}"
    plans = [[LocalCall(tag=f"{tag}n{i}c{j:03d}", kind="grant", keys="1", delay=0.5, hold=1.0)
              for j in range(calls)] for i in range(active)]
    pids = processes(cluster, nodes)
    cpu_before = {pid: cpu_seconds(pid) for pid in pids}
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    logs = [AsteriskLog(node.sandbox.full_log) for node in nodes[:active]]
    tiers = [(SipTier if sip else LocalTier)(node.sandbox) for node in nodes[:active]]
    for tier in tiers:
        await tier.__aenter__()
    try:
        await asyncio.gather(*(run_local_calls(tier, plan, concurrency, per_call_timeout=120)
                               for tier, plan in zip(tiers, plans, strict=True)))
    finally:
        for tier in tiers:
            await tier.__aexit__(None, None, None)
    elapsed = time.monotonic() - started
    if sip:
        for log, plan in zip(logs, plans, strict=True):
            resolve_sip_gate_channels(plan, log.text())
    # Processes started meanwhile (new backends) count from zero.
    cpu = sum(cpu_seconds(pid) - cpu_before.get(pid, 0.0) for pid in set(pids) | set(processes(cluster, nodes)))
    ids = [c.gate_channel for plan in plans for c in plan]
    decisions = await decisions_stored(cluster.dsn, ids)
    granted = sum(d["event"] == "granted" for d in decisions)
    return {"nodes": active, "tier": "sip" if sip else "local", "calls": len(ids), "concurrency_per_node": concurrency,
            "elapsed_s": round(elapsed, 2), "calls_per_s": round(len(ids) / elapsed, 2),
            "cpu_s": round(cpu, 2), "cpu_ms_per_call": round(1000 * cpu / len(ids), 1),
            "granted": granted, "decisions": len(decisions), "loadavg_1min_before": round(load_before, 2)}


async def fresh_cluster(base: Path, promote: str) -> PgCluster | PatroniCluster:
    primary, standby = cluster_ports()
    cluster = (PatroniCluster if promote == "patroni" else PgCluster)(base, primary, standby)
    cluster.start()
    await migrate(cluster.dsn)
    return cluster


async def main_async(args: argparse.Namespace) -> int:
    base = Path(tempfile.mkdtemp(prefix="consent-gate-bench-ha-"))
    base.chmod(0o711)  # the PostgreSQL servers run as 'postgres' below it
    cluster = await fresh_cluster(base / "pg0", args.promote)
    nodes: list[Node] = []
    result: dict = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "cpus": os.cpu_count()}
    try:
        for index in range(2):
            sandbox = AsteriskSandbox(node_settings(index))
            sandbox.up()
            work = base / f"node{index}"
            work.mkdir()
            config = work / "consent-gate.toml"
            config.write_text(SANDBOX_PURPOSES)
            nodes.append(Node(sandbox, GateService(sandbox, cluster.dsn, work, config_path=config)))
            await nodes[-1].service.start()
        result["promote"] = args.promote
        result["tier"] = args.tier
        if args.calls_per_node:
            result["throughput"] = [
                await throughput(cluster, nodes, active, args.calls_per_node, args.concurrency_per_node,
                                 sip=args.tier == "sip")
                for active in (1, 2)
            ]
        failovers = []
        for run in range(args.failovers):
            if run:  # the promoted standby has no standby of its own: a fresh pair
                cluster.destroy()
                cluster = await fresh_cluster(base / f"pg{run}", args.promote)
                for node in nodes:
                    await node.service.stop()
                    node.service.dsn = cluster.dsn
                    await node.service.start()
            report = await failover_under_load(cluster, nodes, calls_per_node=20, concurrency_per_node=12,
                                               seed=args.seed + run, tag=f"bf{uuid.uuid4().hex[:6]}",
                                               sip=args.tier == "sip")
            failovers.append({
                "calls": report.calls, "outcomes": dict(report.outcomes),
                "decided_before_loss": report.decided_before_loss, "journaled_in_gap": report.journaled_during_gap,
                "gap_kill_to_promoted_s": round(report.gap_seconds, 2),
                "kill_to_first_new_grant_s": (None if report.loss_to_first_new_grant is None
                                              else round(report.loss_to_first_new_grant, 2)),
                "unacknowledged_grants": len(report.unacknowledged_grants), "violations": report.violations,
                "slowest_originate_s": round(report.slowest_originate, 2),
            })
        result["failovers"] = failovers
        print(json.dumps(result, indent=2))
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        return 0 if not any(f["violations"] for f in failovers) else 1
    finally:
        for node in reversed(nodes):
            await node.service.stop()
            node.sandbox.down()
        cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--calls-per-node", type=int, default=40)
    parser.add_argument("--concurrency-per-node", type=int, default=12)
    parser.add_argument("--failovers", type=int, default=3)
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--promote", choices=("pg_ctl", "patroni"), default="pg_ctl",
                        help="who promotes the standby: the rig (pg_ctl promote) or Patroni")
    parser.add_argument("--tier", choices=("sip", "local"), default="sip",
                        help="the callers: SIP calls each node places to itself, or ARI-Local channels")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "scale-out.json")
    args = parser.parse_args()
    if args.calls_per_node > 500 or args.concurrency_per_node > 30 or args.failovers > 10:
        parser.error("bounded by design: at most 500 calls and 30 at once per node, 10 failovers")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())

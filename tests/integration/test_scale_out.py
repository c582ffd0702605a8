"""Scale-out (issue 15): two Asterisk nodes, each with its own consent-gate service and journal,
share one ledger on a PostgreSQL primary with a synchronous streaming standby.  Under load the
primary is killed (SIGKILL, every backend) and the standby promoted (``pg_ctl promote``): every
decision made before, during and after is in the new primary exactly once, nobody is recorded
without a grant there, the calls deciding during the gap fail closed, and afterwards consenting
callers are recorded again on both nodes.

Real parts: two sandbox Asterisk 22 instances, two service processes, two PostgreSQL 15 servers.
The calls are SIP calls spread over both nodes: each node's Asterisk places them to itself over
loopback (consent_gate_rig.random_callers.SipTier: INVITE with digest auth, RTP, RFC 4733 keys
sent by the cgcaller dialplan), so the gate runs on a PJSIP channel as for a phone.
Ports: consent_gate_rig.scaleout (derived from the session's, so CI's defaults work as well).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from consent_gate.ledger.store import migrate
from consent_gate_rig.harness import SANDBOX_PURPOSES, GateService
from consent_gate_rig.pgsandbox import PatroniCluster, PgCluster
from consent_gate_rig.random_callers import DECISIONS, assert_alive
from consent_gate_rig.sandbox import AsteriskSandbox
from consent_gate_rig.scaleout import Node, cluster_ports, failover_under_load, node_settings

pytestmark = pytest.mark.integration


def check_config(service: GateService, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "consent_gate.ari.main", "--config", str(config), "--check-config"],
                          env=service.env(), check=False, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module", params=["pg_ctl", "patroni"])
def cluster(request: pytest.FixtureRequest) -> Iterator[PgCluster | PatroniCluster]:
    """The primary + synchronous standby, promoted by hand (pg_ctl promote) or by Patroni."""
    base = Path(tempfile.mkdtemp(prefix="consent-gate-pgha-"))
    base.chmod(0o711)  # the servers run as 'postgres' below it
    primary, standby = cluster_ports()
    pg: PgCluster | PatroniCluster
    if request.param == "patroni":
        # No skip: scripts/setup installs patroni and etcd-server.
        assert PatroniCluster.available(), "patroni and etcd are needed (apt-get install patroni etcd-server)"
        pg = PatroniCluster(base, primary, standby)
    else:
        pg = PgCluster(base, primary, standby)
    try:
        pg.start()
        yield pg
    finally:
        pg.destroy()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
async def nodes(asterisk: AsteriskSandbox, cluster: PgCluster | PatroniCluster,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[list[Node]]:
    # Depends on the session sandbox: it mounts /proc and /dev in the shared root.
    await migrate(cluster.dsn)
    started: list[Node] = []
    try:
        for index in range(2):
            sandbox = AsteriskSandbox(node_settings(index))
            sandbox.up()
            work = tmp_path_factory.mktemp(f"node{index}")
            config = work / "consent-gate.toml"
            config.write_text(SANDBOX_PURPOSES)
            service = GateService(sandbox, cluster.dsn, work, config_path=config)
            started.append(Node(sandbox, service))
            # The deployment step of docs/deployment.md: the node's key and prompts match the ledger's.
            checked = check_config(service, config)
            assert (checked.returncode, checked.stdout.strip()) == (0, "configuration ok"), checked.stderr
            await service.start()
        yield started
    finally:
        for node in started:
            await node.service.stop()
            node.sandbox.down()


async def test_primary_lost_under_load_loses_no_decision_and_records_no_one_without_consent(
    cluster: PgCluster | PatroniCluster, nodes: list[Node],
) -> None:
    seed = int(os.environ.get("CONSENT_GATE_RANDOM_SEED", str(random.SystemRandom().randrange(1 << 30))))
    print(f"\nfailover: seed {seed} (CONSENT_GATE_RANDOM_SEED={seed} repeats the callers)")
    assert cluster.sync_state() == "sync", "commits wait for the standby"
    report = await failover_under_load(cluster, nodes, calls_per_node=20, concurrency_per_node=12, seed=seed,
                                       tag=f"ha{uuid.uuid4().hex[:6]}")
    print(f"outcomes {dict(report.outcomes)}; decided before the loss {report.decided_before_loss}, "
          f"journaled in the gap {report.journaled_during_gap}, gap {report.gap_seconds:.2f} s, "
          f"loss -> first new grant {report.loss_to_first_new_grant} s, "
          f"unacknowledged grants {report.unacknowledged_grants}, slowest originate {report.slowest_originate:.2f} s")
    assert not report.violations, f"seed {seed}: " + "\n".join(report.violations[:20])
    gate_channels = {call.gate_name.split("-")[0] for node in nodes for call in node.calls}
    assert gate_channels == {"PJSIP/caller"}, f"every gate channel is a SIP call's: {gate_channels}"
    # Every call of both nodes has its decision in the new primary (check_invariant: exactly one).
    assert sum(report.outcomes[k] for k in DECISIONS) == report.calls == 2 * (20 + 3)
    assert report.decided_before_loss > 0 and report.journaled_during_gap > 0
    assert report.outcomes["unavailable"] > 0, "the calls deciding in the gap failed closed"
    assert report.post_failover_grants == 6, "after the failover consenting callers are recorded on both nodes"
    assert not cluster.is_in_recovery(cluster.standby), "the standby is the primary now"
    for node in nodes:
        assert_alive(node.service)

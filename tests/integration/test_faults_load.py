"""Fault injection against the real processes: the ARI service, Asterisk 22, PostgreSQL.

* SIGKILL of the ARI service mid-dialog: the call goes on to the agent unrecorded, the restarted
  service reconnects by itself and serves the next call.
* ``core restart now`` of Asterisk while the service runs: it reconnects with no operator action.
* Unexpected ARI events (user events with hostile payloads, events for unknown channels) and a
  DTMF flood during a dialog: no crash, no recording without consent.
* A hangup in every dialog state: exactly one decision in the ledger, no recording, no orphan.
* Randomised callers on the **ARI-Local tier** (Local channels originated through ARI, keys sent
  with ``SendDTMF`` by the ``cgcaller`` dialplan, random timings, hangups and withdrawals): for
  every call, recording exists ⇔ a granted, not withdrawn decision exists.  ``bench/load/
  random_callers.py`` runs the same check with 1,000 calls; here it is 100.

Tests wait on conditions with bounds; the only timed parts are the callers' own behaviour
(when they key, how long they stay), which the ledger and the log then prove.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import asyncpg
import pytest

from consent_gate.core.dialog import RESULT_SEPARATOR, RESULT_VARIABLE
from consent_gate.prompts.catalog import packaged_sounds_dir
from consent_gate_rig.calls import (
    Phones,
    drain_incoming,
    finish,
    journal_entries,
    ledger_events,
    recording_files,
    run_gate_call,
    wait_until,
)
from consent_gate_rig.harness import AsteriskLog, GateService
from consent_gate_rig.random_callers import (
    DECISIONS,
    MALFORMED_FRAMES,
    PROMPT_RE,
    FakeAsterisk,
    LocalCall,
    LocalTier,
    assert_alive,
    call_events,
    flaky_ami,
    free_port,
    inserts_waiting,
    ledger_healthy,
    one_local_call,
    random_call,
    random_run,
    run_local_calls,
    scrape,
    settled_report,
    with_metrics,
)
from consent_gate_rig.sandbox import AsteriskSandbox

pytestmark = pytest.mark.integration



# -- the ARI-Local tier ------------------------------------------------------------------------



















# -- helpers -----------------------------------------------------------------------------------













# -- process faults ----------------------------------------------------------------------------

async def test_sigkill_mid_dialog_goes_on_unrecorded_and_the_restarted_app_serves_the_next_call(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, pg_dsn: str,
    test_tag: str, recordings_before: set[str],
) -> None:
    """SIGKILL after the caller pressed 1, while the grant is being written (the INSERT waits on
    a table lock): the grant never becomes durable, so the call must go on unrecorded."""
    await drain_incoming(phones.agent)
    connection = await asyncpg.connect(pg_dsn)
    try:  # grants other tests stored just before this one are not this call's
        test_started = await connection.fetchval("SELECT now()")
    finally:
        await connection.close()
    caller = await phones.caller.call(phones.uri("200"), headers={"X-Test-Call": test_tag})
    await caller.wait_answered(10)
    await asterisk_log.wait_for(PROMPT_RE, 10)
    lock = await asyncpg.connect(pg_dsn)
    try:
        await lock.execute("BEGIN")
        await lock.execute("LOCK TABLE consent_events IN EXCLUSIVE MODE")
        await caller.send_dtmf("1")
        await wait_until(lambda: inserts_waiting(lock), 20, "the grant's INSERT to wait on the lock")
        old_pid = gate.process.pid if gate.process else None
        await gate.stop(kill=True)  # SIGKILL: no cleanup, no goodbye to Asterisk or PostgreSQL
    finally:
        await lock.execute("ROLLBACK")
        await lock.close()
    await gate.start()  # what systemd's Restart= does; the new process releases the orphan itself
    assert gate.process is not None and gate.process.pid != old_pid
    result = await asterisk_log.gate_result(test_tag, 20)
    assert result.status == "unavailable" and result.recording_id == ""
    agent = await phones.agent.wait_incoming(20)
    await agent.answer()
    await caller.send_dtmf("1")  # too late: changes nothing
    await caller.play_silence(1.0)
    await caller.hangup()
    await agent.wait_hangup(10)
    assert recording_files(asterisk) == recordings_before
    assert "Begin MixMonitor" not in asterisk_log.text()
    assert "ari.orphan_released" in gate.log_text()
    # The killed process's uncommitted grant did not reach the ledger either.
    connection = await asyncpg.connect(pg_dsn)
    try:
        stray = await connection.fetchval(
            "SELECT count(*) FROM consent_events WHERE event = 'granted' AND stored_at > $1"
            " AND recording_id IS NOT NULL AND call_id NOT LIKE 'cgl-%'", test_started)
    finally:
        await connection.close()
    assert stray == 0

    # The next caller is served normally by the new process.
    next_tag = uuid.uuid4().hex[:12]
    call = await run_gate_call(phones, asterisk_log, next_tag, key="1")
    assert call.result.status == "granted"
    await call.caller.play_silence(0.5)
    await finish(call)
    await wait_until(lambda: f"{call.result.recording_id}.wav" in recording_files(asterisk), 10, "the recording")
    [event] = await ledger_events(pg_dsn, call.result.consent_id)
    assert event["event"] == "granted"
    assert_alive(gate)


async def test_sigkill_during_the_question_releases_the_caller_unrecorded(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, test_tag: str,
    recordings_before: set[str],
) -> None:
    """SIGKILL while the question plays: the restarted process continues the caller at the
    include's "released" label, which takes effect at once (a variable set would wait for the
    dead process's 24.8 s question to end), so the caller goes on unrecorded well before it."""
    await drain_incoming(phones.agent)
    caller = await phones.caller.call(phones.uri("200"), headers={"X-Test-Call": test_tag})
    await caller.wait_answered(10)
    await asterisk_log.wait_for(PROMPT_RE, 10)
    await gate.stop(kill=True)
    await gate.start()
    restarted = time.monotonic()
    # Bound well below the ~23 s left of the question: the release must not wait for it.
    result = await asterisk_log.gate_result(test_tag, 12)
    print(f"\nSIGKILL mid-question: caller back in the dialplan {time.monotonic() - restarted:.1f} s after the restart")
    assert result.status == "unavailable" and result.recording_id == ""
    agent = await phones.agent.wait_incoming(20)
    await agent.answer()
    await caller.play_silence(0.5)
    await caller.hangup()
    await agent.wait_hangup(10)
    assert recording_files(asterisk) == recordings_before
    assert "Begin MixMonitor" not in asterisk_log.text()
    assert_alive(gate)


async def test_asterisk_restart_the_app_reconnects_without_operator_action(
    asterisk: AsteriskSandbox, gate: GateService, pg_dsn: str,
) -> None:
    port = await with_metrics(gate)
    pid = gate.process.pid if gate.process else None
    before = await scrape(port)
    reconnects = float(re.search(r"^consent_gate_ari_reconnects_total (\S+)$", before, re.M).group(1))
    files_before = recording_files(asterisk)
    restarted_at = time.time()
    # Same pid (Asterisk re-executes itself), so the sandbox still owns it.
    try:
        asterisk.cli("core restart now", timeout=10)
    except Exception:  # the CLI connection may drop with the restart
        pass
    await asyncio.to_thread(asterisk.wait_booted, 90)
    log = AsteriskLog(asterisk.full_log)
    log.offset = 0  # the log may have been reopened; read it whole, filtered by tag below
    await gate.wait_registered(30)  # the *same* process reconnected by itself
    assert gate.process is not None and gate.process.pid == pid
    text = await scrape(port)
    assert float(re.search(r"^consent_gate_ari_reconnects_total (\S+)$", text, re.M).group(1)) >= reconnects + 1
    assert re.search(r"^consent_gate_ari_connected 1\.0$", text, re.M)
    assert gate.log_text().count("ari.ws.connected") >= 2
    # ...and serves calls again.
    tag = f"rs{uuid.uuid4().hex[:8]}"
    async with LocalTier(asterisk) as tier:
        call = LocalCall(tag=tag, delay=1.0, keys="1", hold=2.0, kind="grant")
        await one_local_call(tier, call)
    report = await settled_report([call], pg_dsn, asterisk.recordings_dir, files_before, log)
    assert report.outcomes["granted"] == 1, report
    assert not report.violations, report.violations
    assert time.time() - restarted_at < 120
    assert_alive(gate)


# -- unexpected input --------------------------------------------------------------------------

HOSTILE_VARIABLES = {
    "digit": "1", "type": "ChannelDtmfReceived", "channel": {"id": "../../etc"}, "playback": [1, 2],
    "x": "A" * 4000, "sql": "'); DROP TABLE consent_events;--", "control": "\u202e\u0007\u001b[2J", "nested": {"a": {"b": [None]}},
}


async def test_unexpected_ari_events_and_a_dtmf_flood_do_not_crash_or_record(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, gate: GateService, pg_dsn: str,
) -> None:
    tag = f"fl{uuid.uuid4().hex[:8]}"
    before = {p.name for p in asterisk.recordings_dir.iterdir()}
    flood = "".join(random.Random(8).choice("0234567890*#") for _ in range(120))
    call = LocalCall(tag=tag, delay=0.5, keys=flood, gap_ms=30, hold=1.0, kind="flood")
    async with LocalTier(asterisk) as tier:
        runner = asyncio.create_task(one_local_call(tier, call))
        await asterisk_log.wait_for(rf"{re.escape(call.channel_prefix)}\S*;2> {PROMPT_RE}", 15)
        # Unexpected events on the dialog's own channel, on unknown channels, and app-wide.
        statuses = []
        for index in range(30):
            statuses.append(await tier.user_event(f"cg-hostile-{index}", f"channel:{call.gate_channel}",
                                                  HOSTILE_VARIABLES))
            statuses.append(await tier.user_event("StasisStart", None, {"args": ["training"], "channel": None}))
            statuses.append(await tier.user_event("ChannelDtmfReceived", None, {"digit": "1"}))
        assert all(status in (200, 204) for status in statuses), Counter(statuses)
        await runner
    report = await settled_report([call], pg_dsn, asterisk.recordings_dir, before, asterisk_log)
    assert not report.violations, report.violations
    assert report.outcomes["granted"] == 0 and sum(report.outcomes.values()) == 1, report.outcomes
    assert_alive(gate)
    # Still serving: a consenting caller right after.
    ok = LocalCall(tag=f"ok{uuid.uuid4().hex[:8]}", delay=0.5, keys="1", hold=1.0, kind="grant")
    async with LocalTier(asterisk) as tier:
        await one_local_call(tier, ok)
    report = await settled_report([ok], pg_dsn, asterisk.recordings_dir, before, asterisk_log)
    assert report.outcomes["granted"] == 1 and not report.violations, report






async def test_malformed_ari_frames_do_not_crash_the_real_service(pg_dsn: str, tmp_path: Path) -> None:
    fake = FakeAsterisk()
    await fake.start()
    project = Path(__file__).resolve().parents[2]
    env = dict(os.environ, CONSENT_GATE_ARI_URL=f"http://127.0.0.1:{fake.port}", CONSENT_GATE_ARI_USER="u",
               CONSENT_GATE_ARI_PASSWORD="p", CONSENT_GATE_ARI_APP="consent-gate", CONSENT_GATE_DSN=pg_dsn,
               CONSENT_GATE_HMAC_KEY="k" * 32, CONSENT_GATE_JOURNAL_DIR=str(tmp_path / "journal"),
               CONSENT_GATE_PROMPTS_DIR=str(packaged_sounds_dir()),
               CONSENT_GATE_RECORDINGS_DIR=str(tmp_path / "recordings"),
               CONSENT_GATE_RECORDINGS_OWNER=str(os.geteuid()), CONSENT_GATE_AMI_HOST="127.0.0.1",
               CONSENT_GATE_AMI_PORT=str(free_port()), CONSENT_GATE_AMI_SECRET="s")
    env.pop("CONSENT_GATE_METRICS_PORT", None)
    (tmp_path / "recordings").mkdir(mode=0o700)  # the service refuses a directory that is not private
    log_path = tmp_path / "service.log"
    with open(log_path, "wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "consent_gate.ari.main", env=env, cwd=project, stdout=log_file, stderr=log_file,
            stdin=asyncio.subprocess.DEVNULL)
    channel = f"good-{uuid.uuid4().hex[:8]}"
    try:
        await asyncio.wait_for(fake.connected.wait(), 20)
        for frame in MALFORMED_FRAMES:
            await fake.send(frame)
        await fake.send(b"\x00\xff binary")
        # A real dialog in between more garbage: StasisStart, the key, garbage, the hang-up.
        await fake.send(json.dumps({"type": "StasisStart", "args": ["training"],
                                    "channel": {"id": channel, "name": "PJSIP/x", "caller": {"number": "+451"},
                                                "language": "en"}}))
        await wait_until(lambda: fake.saw("POST", f"/channels/{channel}/play/"), 10, "the question")
        for frame in MALFORMED_FRAMES:
            await fake.send(frame)
        # An event for this channel with no digit, then the consent key.
        await fake.send(json.dumps({"type": "ChannelDtmfReceived", "channel": {"id": channel}, "digit": "1"}))
        await wait_until(lambda: fake.saw("POST", f"/channels/{channel}/continue"), 10, "the hand-back")
        assert _handed_back_status(fake.variables[channel]) == "granted"
        [event] = [e for e in (await call_events(pg_dsn, [channel]))[channel]]
        assert event["event"] == "granted"
        await fake.send(json.dumps({"type": "StasisEnd", "channel": {"id": channel}}))
        for frame in MALFORMED_FRAMES:
            await fake.send(frame)
        # Still alive, still answering: one more StasisStart is served.
        second = f"good-{uuid.uuid4().hex[:8]}"
        await fake.send(json.dumps({"type": "StasisStart", "args": ["training"], "channel": {"id": second}}))
        await wait_until(lambda: fake.saw("POST", f"/channels/{second}/answer"), 10, "the next call's answer")
        assert process.returncode is None, log_path.read_text()[-3000:]
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()
        await fake.stop()
    text = log_path.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert process.returncode == 0, text[-3000:]
    # The odd StasisStarts were failed closed, never answered with a grant.
    for odd in ("odd-0", "odd-1", "odd-2", "odd-3"):
        assert _handed_back_status(fake.variables.get(odd, {})) in (None, "unavailable")


def _handed_back_status(variables: dict[str, str]) -> str | None:
    """CONSENT_STATUS as the dialplan unpacks it from what the service set (None: no result)."""
    packed = variables.get(RESULT_VARIABLE)
    return packed.split(RESULT_SEPARATOR)[-1] if packed else None


# -- the database and the journal ------------------------------------------------------------

async def test_database_down_under_load_loses_no_decision_and_records_nothing(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, gate: GateService, pg_sandbox, pg_dsn: str,
) -> None:
    """20 callers while PostgreSQL is stopped: every decision is in the fsync'd journal, none is
    recorded; when the database returns all 20 are replayed — counted, not sampled."""
    rng = random.Random(20)
    calls = [random_call(rng, f"db{uuid.uuid4().hex[:6]}{i:02d}") for i in range(20)]
    for call in calls:  # short calls: the gate answers at once while the ledger is degraded
        call.delay, call.hold = min(call.delay, 1.5), min(call.hold, 1.5)
        call.delay2 = min(call.delay2, 1.5)
    before = recording_files(asterisk)
    ids = {c.gate_channel for c in calls}
    pg_sandbox.stop()
    try:
        async with LocalTier(asterisk) as tier:
            await run_local_calls(tier, calls, 10, per_call_timeout=60)
        pending = [e for e in journal_entries(gate.journal_dir) if e["call_id"] in ids]
        decisions = Counter(e["call_id"] for e in pending if e["event"] in DECISIONS)
        assert set(decisions) == ids and set(decisions.values()) == {1}, decisions
        assert not any(e["event"] == "granted" for e in pending), "no grant while the ledger is down"
        assert recording_files(asterisk) == before, "nothing recorded while the ledger is down"
        assert "Begin MixMonitor Recording Local/500-db" not in asterisk_log.text()
    finally:
        pg_sandbox.start()

    async def all_replayed() -> bool:
        events = await call_events(pg_dsn, sorted(ids))
        return all(sum(e["event"] in DECISIONS for e in events.get(i, [])) == 1 for i in ids)

    await wait_until(all_replayed, 30, "all 20 decisions replayed into PostgreSQL")
    await wait_until(lambda: not any(e["call_id"] in ids for e in journal_entries(gate.journal_dir)), 15,
                     "the journal to let go of the replayed decisions")
    assert_alive(gate)
    await ledger_healthy(gate)


async def test_journal_unwritable_and_database_down_records_nothing(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, gate: GateService, pg_sandbox, pg_dsn: str,
) -> None:
    journal = gate.journal_dir
    await wait_until(lambda: not journal_entries(journal), 30, "an empty journal before the test")
    aside = journal.with_name("journal.aside")
    before = recording_files(asterisk)
    calls = [LocalCall(tag=f"jn{uuid.uuid4().hex[:8]}", delay=0.5, keys="1", hold=8.0, kind="grant")
             for _ in range(5)]
    pg_sandbox.stop()
    if journal.exists():
        journal.rename(aside)
    journal.write_text("not a directory: every journal write fails\n")
    try:
        async with LocalTier(asterisk) as tier:
            await run_local_calls(tier, calls, 5, per_call_timeout=60)
        for call in calls:
            match = re.search(rf"consent-result: test={call.tag} status=(\S+)", asterisk_log.text())
            assert match and match.group(1) == "unavailable", call.tag
        assert recording_files(asterisk) == before
        assert "ledger.journal_write_failed" in gate.log_text()
        assert_alive(gate)
    finally:
        journal.unlink()
        if aside.exists():
            aside.rename(journal)
        pg_sandbox.start()
    await ledger_healthy(gate)


# -- the events websocket closed mid-dialog ------------------------------------------------------

def kill_ari_connections(asterisk: AsteriskSandbox) -> None:
    """Abort every TCP connection to this sandbox's ARI port from this machine (ss -K)."""
    port = asterisk.settings.http_port
    done = subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", f":{port}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


async def test_websocket_closed_mid_dialog_fails_closed_and_reconnects(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, gate: GateService, pg_dsn: str,
) -> None:
    """The caller pressed 1 and the grant's INSERT is in flight when every ARI connection is cut:
    events may be lost, so the dialog fails closed; the service reconnects by itself."""
    tag = f"ws{uuid.uuid4().hex[:8]}"
    before = recording_files(asterisk)
    call = LocalCall(tag=tag, delay=0.5, keys="1", hold=60, kind="grant")
    lock = await asyncpg.connect(pg_dsn)
    await lock.execute("BEGIN")
    await lock.execute("LOCK TABLE consent_events IN EXCLUSIVE MODE")
    try:
        tier = LocalTier(asterisk)
        async with tier:
            await tier.originate(call)
        await wait_until(lambda: inserts_waiting(lock), 20, "the grant's INSERT to wait on the lock")
        kill_ari_connections(asterisk)
    finally:
        await lock.execute("ROLLBACK")
        await lock.close()
    match = await asterisk_log.wait_for(rf"consent-result: test={tag} status=(\S+) ", 30)
    await gate.wait_registered(30)
    async with LocalTier(asterisk) as tier:
        await tier.hangup(call.caller_channel)
        await tier.wait_gone({call.caller_channel, call.gate_channel}, 15)
    # Stored before the cut, the grant may stand; what must not happen is a recording the
    # service did not hand back.  One decision either way, and the recording only with a grant.
    report = await settled_report([call], pg_dsn, asterisk.recordings_dir, before, asterisk_log)
    assert not report.violations, report.violations
    assert match.group(1) in ("granted", "unavailable")
    if match.group(1) == "unavailable":
        assert recording_files(asterisk) == before
    assert "ari.ws.disconnected" in gate.log_text()
    assert_alive(gate)
    ok = LocalCall(tag=f"wk{uuid.uuid4().hex[:8]}", delay=0.5, keys="1", hold=1.0, kind="grant")
    before = recording_files(asterisk)
    async with LocalTier(asterisk) as tier:
        await one_local_call(tier, ok)
    report = await settled_report([ok], pg_dsn, asterisk.recordings_dir, before, asterisk_log)
    assert report.outcomes["granted"] == 1 and not report.violations, report


# -- hangups in every dialog state ---------------------------------------------------------------

HANGUP_STATES = ["starting", "asking", "invalid-prompt", "reciprocal-ack", "waiting", "storing", "confirmation",
                 "after-gate"]


@pytest.mark.parametrize("state", HANGUP_STATES)
async def test_hangup_in_every_dialog_state(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, gate: GateService, pg_dsn: str, state: str,
) -> None:
    tag = f"hs{state[:4]}{uuid.uuid4().hex[:6]}"
    before = {p.name for p in asterisk.recordings_dir.iterdir()}
    call = LocalCall(tag=tag, delay=0.5, hold=60, kind=state)
    prompt_line = rf"\[(\S+ \S+)\] \S+ \S+ <{re.escape(call.channel_prefix)}\S*;2> "
    expected = {"abandoned"}
    lock: asyncpg.Connection | None = None
    hang_up_ourselves = True
    match state:
        case "starting":
            # The caller hangs up the moment the gate answers, before or as the question starts.
            call.delay, call.hold, hang_up_ourselves = 0.0, 0.0, False
        case "asking":
            call.delay = 60
        case "invalid-prompt":
            call.keys = "7"
        case "reciprocal-ack":
            call.keys = "3"
        case "waiting":
            # The caller listens to the whole question (24.8 s) and hangs up while asked to key;
            # the ledger's timestamps prove it below.
            call.delay, call.hold, hang_up_ourselves = 27.0, 0.0, False
        case "storing":
            # The grant's INSERT waits on a table lock while the caller hangs up.
            call.keys, call.delay, expected = "1", 1.0, {"granted", "unavailable"}
            lock = await asyncpg.connect(pg_dsn)
            await lock.execute("BEGIN")
            await lock.execute("LOCK TABLE consent_events IN EXCLUSIVE MODE")
        case "confirmation" | "after-gate":
            call.keys, expected = "1", {"granted"}
    async with LocalTier(asterisk) as tier:
        runner = asyncio.create_task(one_local_call(tier, call, timeout=120))
        try:
            match state:
                case "asking":
                    await asterisk_log.wait_for(prompt_line + PROMPT_RE, 15)
                case "invalid-prompt":
                    await asterisk_log.wait_for(prompt_line + r"Playing '[^']*/invalid\.", 15)
                case "reciprocal-ack":
                    await asterisk_log.wait_for(prompt_line + r"Playing '[^']*/caller-records-ack\.", 15)
                case "storing":
                    assert lock is not None
                    await wait_until(lambda: inserts_waiting(lock), 20, "the grant's INSERT to wait on the lock")
                case "confirmation":
                    await asterisk_log.wait_for(prompt_line + r"Playing '[^']*/granted\.", 20)
                case "after-gate":
                    await asterisk_log.wait_for(rf"consent-result: test={tag} status=granted", 30)
            if hang_up_ourselves:
                await tier.hangup(call.caller_channel)
                await tier.wait_gone({call.caller_channel, call.gate_channel}, 15)
        finally:
            if lock is not None:
                await lock.execute("ROLLBACK")
                await lock.close()
        await runner
    report = await settled_report([call], pg_dsn, asterisk.recordings_dir, before, asterisk_log)
    assert not report.violations, report.violations
    [outcome] = [k for k in report.outcomes if k in DECISIONS]
    assert outcome in expected, report.outcomes
    events = (await call_events(pg_dsn, [call.gate_channel]))[call.gate_channel]
    decision = next(e for e in events if e["event"] in DECISIONS)
    if state == "waiting":
        # Proof that the hangup came after the whole question: the caller was in WAITING.
        assert (decision["decided_at"] - decision["prompt_started_at"]).total_seconds() > 24.5
    if state == "starting":
        assert decision["digit"] is None
    new_files = {p.name for p in asterisk.recordings_dir.iterdir()} - before
    if state in ("confirmation", "after-gate"):
        assert new_files, "a granted call that reached MixMonitor has its recording"
    else:
        assert not new_files, new_files
    assert_alive(gate)




# -- randomised callers ------------------------------------------------------------------------



async def test_randomised_callers_recording_exists_iff_granted_and_not_withdrawn(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, gate: GateService, pg_dsn: str,
) -> None:
    seed = int(os.environ.get("CONSENT_GATE_RANDOM_SEED", str(random.SystemRandom().randrange(1 << 30))))
    print(f"\nrandomised callers: seed {seed} (CONSENT_GATE_RANDOM_SEED={seed} repeats this run)")
    async with flaky_ami(gate, asterisk, seed) as proxy:
        report = await random_run(asterisk, pg_dsn, asterisk_log, calls=100, concurrency=15, seed=seed,
                                  tag_prefix=f"rnd{uuid.uuid4().hex[:6]}")
        assert_alive(gate)
    print(f"outcomes {dict(report.outcomes)}; granted but hung up before MixMonitor: "
          f"{report.granted_hung_up_before_recording}; *0 keyed but not withdrawn: {report.withdrawal_ignored}; "
          f"AMI faults: {proxy.refused} refused, {proxy.cuts} cut, {proxy.forwarded} forwarded")
    assert proxy.refused + proxy.cuts > 0, "the run injected no AMI fault"
    assert not report.violations, f"seed {seed}: " + "\n".join(report.violations[:20])
    assert sum(report.outcomes[k] for k in DECISIONS) == 100
    assert report.outcomes["granted"] > 0 and report.outcomes["abandoned"] > 0
    assert_alive(gate)
    assert await asyncio.to_thread(lambda: "TRAP" not in asterisk_log.text())

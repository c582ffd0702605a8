"""Faults and hostile input through the real Asterisk, on both gate paths.

* The database stops: the caller still reaches the agent, nothing is recorded even after
  pressing 1, and the decision is journaled and replayed once PostgreSQL is back.
* Caller IDs full of shell, path and SQL metacharacters, very long and non-ASCII: nothing
  breaks and none of it reaches a file name.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import asyncpg
import pytest

from consent_gate.core.events import caller_reference
from consent_gate_rig.calls import (
    Phones,
    finish,
    journal_entries,
    ledger_events,
    recording_files,
    recording_set,
    run_gate_call,
    wait_until,
)
from consent_gate_rig.harness import AsteriskLog, FastAgiService, GateService
from consent_gate_rig.pgsandbox import PgSandbox
from consent_gate_rig.sandbox import AsteriskSandbox

pytestmark = pytest.mark.integration


def journal_dir(gate_path: str, gate: GateService, fastagi: FastAgiService, asterisk: AsteriskSandbox) -> Path:
    """Where each path journals: each service's own dir, or the AGI script's inside the root."""
    return {"ari": gate.journal_dir, "fastagi": fastagi.journal_dir}.get(gate_path, asterisk.host_dir / "journal")


async def test_database_down_records_nothing_and_loses_no_decision(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService,
    fastagi: FastAgiService, pg_sandbox: PgSandbox, pg_dsn: str, test_tag: str, recordings_before: set[str],
    exten: str, gate_path: str,
) -> None:
    journal = journal_dir(gate_path, gate, fastagi, asterisk)
    pg_sandbox.stop()
    try:
        call = await run_gate_call(phones, asterisk_log, test_tag, exten=exten, key="1", result_timeout=30)
        assert call.result.status == "unavailable", "a grant the ledger cannot store must not record"
        assert call.result.recording_id == ""
        await call.caller.play_silence(1.0)
        await finish(call)
        assert recording_files(asterisk) == recordings_before
        pending = [e for e in journal_entries(journal) if e["consent_id"] == call.result.consent_id]
        assert [e["event"] for e in pending] == ["unavailable"]
        assert pending[0]["digit"] == "1" and pending[0]["detail"]["reason"] == "ledger-unavailable"
    finally:
        pg_sandbox.start()

    if gate_path == "agi":
        # AGI scripts replay at their next start; an admin (or a timer) can replay at once.
        # (The ARI service and the FastAGI server replay by themselves.)
        subprocess.run([sys.executable, "-m", "consent_gate.cli", "journal", "replay", "--dir", str(journal),
                        "--dsn", pg_dsn], check=True, capture_output=True)
    events: list[dict] = []

    async def replayed() -> bool:
        events[:] = await ledger_events(pg_dsn, call.result.consent_id)
        return bool(events)

    await wait_until(replayed, 20, "the journaled decision to reach the database", interval=0.2)
    [event] = events
    assert event["event"] == "unavailable" and event["via_journal"] and event["digit"] == "1"
    assert event["recording_id"] is None
    await wait_until(lambda: not any(e["consent_id"] == call.result.consent_id for e in journal_entries(journal)),
                     10, "the journal to be emptied after replay")



HOSTILE_NUMBER = "+4512345678'$(touch /tmp/cg-pwned)`id`../../etc/passwd;DROP TABLE consent_events;--"
HOSTILE_NAMES = [
    "../../../../etc/passwd; rm -rf / $(touch /tmp/cg-pwned)",
    "Søren Ærø-Ølgaard 你好 мир " + "Å" * 200,
    "Robert'); DROP TABLE consent_events;-- \\\" %s %n",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=["path-shell", "long-unicode", "sql-format"])
async def test_hostile_caller_ids_reach_no_file_name(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, pg_dsn: str,
    test_tag: str, recordings_before: set[str], exten: str, name: str,
) -> None:
    pai = f'"{name[:60]}" <sip:{quote(HOSTILE_NUMBER, safe="")}@127.0.0.1>'
    call = await run_gate_call(phones, asterisk_log, test_tag, exten=exten, key="1", caller_name=name,
                               headers={"P-Asserted-Identity": pai})
    assert call.result.status == "granted"
    await call.caller.play_silence(1.0)
    await finish(call)
    expected = f"{call.result.recording_id}.wav"
    await wait_until(lambda: expected in recording_files(asterisk), 10, "the recording")
    await wait_until(lambda: recording_files(asterisk) - recordings_before == recording_set(call.result.recording_id),
                     10, "the mix and the two legs")
    new_files = recording_files(asterisk) - recordings_before
    assert all(re.fullmatch(r"[0-9a-f]{32}(-caller|-agent)?\.wav", f) for f in new_files)
    # Nothing ran the caller's "$(touch ...)": not on the host, not inside the root.
    assert not os.path.exists("/tmp/cg-pwned")
    assert not (asterisk.host_dir.parents[2] / "tmp" / "cg-pwned").exists()
    [event] = await ledger_events(pg_dsn, call.result.consent_id)
    # The pseudonym is the keyed hash of the digits alone; the raw number is not stored.
    assert event["caller_ref"] == caller_reference(gate.hmac_key.encode(), "+4512345678")
    assert event["caller_number"] is None
    connection = await asyncpg.connect(pg_dsn)
    try:
        assert await connection.fetchval("SELECT count(*) FROM consent_events") > 0, "the table survived"
    finally:
        await connection.close()

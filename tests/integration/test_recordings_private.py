"""Recordings are never readable by others (issue 16, case 7), through the real Asterisk and SIP phones.

* With the shipped drop-in (deploy/asterisk.service.d/consent-gate.conf, UMask=0077) Asterisk
  runs with umask 0077 and a consented recording is 0600 in a 0700 directory.
* On a default host (Asterisk with umask 0022: a second sandbox started so) whose recordings
  directory is, or becomes, 0755 or someone else's: a consenting caller is not recorded, in ARI
  and in AGI mode (status "unavailable", no file, the ledger says why), ``--check-config`` fails
  naming the directory, and the service refuses to start.

The second sandbox takes the session sandbox's ports + 2 and the upper part of its RTP range
(CONSENT_GATE_SANDBOX_RTP_END is the session's end; the second one uses the 200 ports after it).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from consent_gate_rig.calls import Phones, recording_files, recording_set, sandbox_settings_for_tests, wait_until
from consent_gate_rig.harness import (
    SANDBOX_PURPOSES,
    AsteriskLog,
    GateResult,
    GateService,
)
from consent_gate_rig.sandbox import AsteriskSandbox, drop_in_umask
from consent_gate_rig.softphone import Line, NoIncomingCall

pytestmark = pytest.mark.integration


def process_umask(pid: int | None) -> int:
    """The umask the running Asterisk really has (from the kernel, not from our settings)."""
    assert pid is not None
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"(?m)^Umask:\s+([0-7]+)$", status)
    assert match, status
    return int(match[1], 8)


async def consenting_call(caller: Line, agent: Line, domain: str, log: AsteriskLog, tag: str, exten: str) -> GateResult:
    """Dial the gate, press 1 when the question plays (if the gate asks at all), answer as the
    agent, talk 1 s, hang up."""
    while True:  # a call left ringing by an earlier failed test is not this one
        try:
            await (await agent.wait_incoming(0.05)).hangup()
        except NoIncomingCall:
            break
    call = await caller.call(f"sip:{exten}@{domain}", headers={"X-Test-Call": tag})
    asked_or_done = re.compile(rf"Playing '[^']*/question-training\.|consent-result: test={re.escape(tag)} ")
    if (await log.wait_for(asked_or_done, 20))[0].startswith("Playing"):
        await call.wait_answered(10)
        await call.send_dtmf("1")
    result = await log.gate_result(tag, 30)
    agent_call = await agent.wait_incoming(20)
    await agent_call.answer()
    await call.wait_answered(10)
    await call.play_silence(1.0)
    await call.hangup()
    await agent_call.wait_hangup(10)
    return result


async def ledger_event(dsn: str, consent_id: str) -> dict:
    connection = await asyncpg.connect(dsn)
    try:
        [row] = await connection.fetch("SELECT * FROM consent_events WHERE consent_id = $1::uuid", consent_id)
    finally:
        await connection.close()
    return dict(row)


# -- with the drop-in ------------------------------------------------------------------------

@pytest.mark.parametrize("exten", ["200", "300", "350"], ids=["ari", "agi", "fastagi"])
async def test_with_the_drop_in_umask_recordings_are_0600(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, gate: GateService, test_tag: str,
    recordings_before: set[str], exten: str,
) -> None:
    assert drop_in_umask() == 0o077
    assert process_umask(asterisk.state.pid) == 0o077, "the sandbox's Asterisk runs with the drop-in's UMask"
    result = await consenting_call(phones.caller, phones.agent, phones.domain, asterisk_log, test_tag, exten)
    assert result.status == "granted"
    expected = recording_set(result.recording_id)
    await wait_until(lambda: recording_files(asterisk) - recordings_before == expected, 15, "the recording files")
    await asterisk_log.wait_for(r"End MixMonitor Recording", 15)
    assert (asterisk.recordings_dir.stat().st_mode & 0o7777) == 0o700
    for name in expected:
        assert (asterisk.recordings_dir / name).stat().st_mode & 0o777 == 0o600, name


# -- on a default host (umask 0022) -------------------------------------------------------------

@dataclass
class DefaultHost:
    sandbox: AsteriskSandbox
    service: GateService
    caller: Line
    agent: Line
    config: Path

    def log(self) -> AsteriskLog:
        return AsteriskLog(self.sandbox.full_log)

    def check_config(self, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "consent_gate.ari.main", "--config", str(self.config), "--check-config"],
                              env={**self.service.env(), **env}, check=False, capture_output=True, text=True, timeout=60)

    def make_private(self) -> None:
        os.chown(self.sandbox.recordings_dir, os.geteuid(), -1)
        self.sandbox.recordings_dir.chmod(0o700)


@pytest.fixture(scope="module")
async def default_host(asterisk: AsteriskSandbox, phones: Phones, pg_dsn: str,
                       tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DefaultHost]:
    # Depends on the session sandbox: that one mounts /proc and /dev in the shared root, so
    # stopping this one never unmounts them under it.
    base = sandbox_settings_for_tests()
    settings = dataclasses.replace(
        base, name=f"{base.name}-umask022", sip_port=base.sip_port + 2, http_port=base.http_port + 2,
        ami_port=base.ami_port + 2, rtp_start=base.rtp_end + 1, rtp_end=base.rtp_end + 200, umask=0o022)
    sandbox = AsteriskSandbox(settings)
    if not sandbox.is_running():
        # Registrations of an earlier run (phones gone) would be the contact Dial() rings first.
        (sandbox.host_dir / "lib" / "astdb.sqlite3").unlink(missing_ok=True)
    sandbox.up()
    work = tmp_path_factory.mktemp("default-host")
    config = work / "consent-gate.toml"
    config.write_text(SANDBOX_PURPOSES)
    service = GateService(sandbox, pg_dsn, work, config_path=config)
    try:
        # baresip runs once per process: the session's phone gets two more lines, on this PBX.
        caller = await phones.softphone.register("caller", sandbox.state.sip_password, sandbox.sip_domain)
        agent = await phones.softphone.register("agent", sandbox.state.sip_password, sandbox.sip_domain)
        await service.start()
        host = DefaultHost(sandbox, service, caller, agent, config)
        try:
            yield host
        finally:
            host.make_private()
            await service.stop()
            for line in (caller, agent):
                await line.unregister()
    finally:
        sandbox.down()


async def test_default_umask_and_a_private_directory_still_record(default_host: DefaultHost, test_tag: str) -> None:
    """The control: this Asterisk records, and its umask 0022 makes files world-readable (0644) --
    only the 0700 directory keeps others out, which is why both are required."""
    sandbox = default_host.sandbox
    assert process_umask(sandbox.state.pid) == 0o022
    default_host.make_private()
    checked = default_host.check_config()  # logs in to this Asterisk's AMI, probes the journal
    assert (checked.returncode, checked.stdout.strip()) == (0, "configuration ok"), checked.stderr
    before = recording_files(sandbox)
    log = default_host.log()
    result = await consenting_call(default_host.caller, default_host.agent, sandbox.sip_domain, log, test_tag, "200")
    assert result.status == "granted"
    await wait_until(lambda: recording_files(sandbox) - before == recording_set(result.recording_id), 15, "files")
    await log.wait_for(r"End MixMonitor Recording", 15)
    assert (sandbox.recordings_dir / f"{result.recording_id}.wav").stat().st_mode & 0o777 == 0o644


def test_check_config_names_the_ami_login_it_could_not_make(default_host: DefaultHost) -> None:
    default_host.make_private()
    settings = default_host.sandbox.settings
    checked = default_host.check_config(CONSENT_GATE_AMI_SECRET="not-the-secret")
    assert checked.returncode == 2
    assert f"ami: cannot log in to 127.0.0.1:{settings.ami_port} as {settings.ami_user!r}" in checked.stderr
    assert "not-the-secret" not in checked.stderr and default_host.sandbox.state.ami_password not in checked.stderr


@pytest.mark.parametrize("damage", ["mode-0755", "other-owner"])
async def test_a_directory_that_is_not_private_records_nothing(
    default_host: DefaultHost, pg_dsn: str, test_tag: str, damage: str,
) -> None:
    sandbox, service = default_host.sandbox, default_host.service
    await service.start()  # running with a private directory; then the directory changes under it
    if damage == "mode-0755":
        sandbox.recordings_dir.chmod(0o755)
    else:
        os.chown(sandbox.recordings_dir, 54321, -1)
    try:
        checked = default_host.check_config()
        assert checked.returncode == 2, checked.stdout + checked.stderr
        assert f"recordings.dir {sandbox.recordings_dir}:" in checked.stderr

        before = recording_files(sandbox)
        # ARI: the service is running; the grant is refused before it is handed back.
        log = default_host.log()
        ari = await consenting_call(default_host.caller, default_host.agent, sandbox.sip_domain, log,
                                    f"{test_tag}-ari", "200")
        assert (ari.status, ari.recording_id) == ("unavailable", "")
        event = await ledger_event(pg_dsn, ari.consent_id)
        assert (event["event"], event["digit"], event["recording_id"]) == ("unavailable", "1", None)
        assert str(sandbox.recordings_dir) in event["detail"]
        # AGI: the script refuses to start, so nobody asks and the dialplan's "unavailable" stands.
        log = default_host.log()
        agi = await consenting_call(default_host.caller, default_host.agent, sandbox.sip_domain, log,
                                    f"{test_tag}-agi", "300")
        assert (agi.status, agi.recording_id) == ("unavailable", "")
        assert "question-training" not in log.text(), "the script refused at start-up: no question"
        assert "MixMonitor(" not in log.text()
        assert recording_files(sandbox) == before, "nothing recorded into a directory others can read"

        # And a restart is refused, naming the directory.
        await service.stop()
        with pytest.raises(RuntimeError, match=re.escape(f"recordings.dir {sandbox.recordings_dir}:")):
            await service.start()
    finally:
        default_host.make_private()
        await service.start()

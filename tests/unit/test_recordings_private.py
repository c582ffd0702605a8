"""Recordings are private (issue 16, case 7) and --check-config checks what start-up needs (case 12).

The directory check on real directories (lstat, owner, mode); the per-grant check in the
dialog's core path, with the real PostgreSQL ledger; the ARI service's start-up and
--check-config (AMI login against a scripted AMI socket, journal probe); the AGI script's
start-up refusal as a real subprocess.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from consent_gate.config import load_settings
from consent_gate.core.dialog import CallInfo, GateContext, PromptRef, run_consent_dialog
from consent_gate.core.events import Decision
from consent_gate.ledger.store import Ledger
from consent_gate.prompts.catalog import PromptCatalog, packaged_sounds_dir
from consent_gate.recordings import (
    RecordingsDirError,
    check_private_dir,
    owner_uid,
    private_dir_problem,
    recordings_dir_problem,
)
from consent_gate_rig.fakes import ScriptedAmi
from consent_gate_rig.harness import run_ari_command

ROOT = Path(__file__).resolve().parents[2]
SOUNDS = packaged_sounds_dir()
ME = os.geteuid()
SECRETS = {"CONSENT_GATE_HMAC_KEY": "private-dir-hmac-key-0123456789", "CONSENT_GATE_ARI_PASSWORD": "ari-pw-1"}


# -- the directory check ----------------------------------------------------------------------

def test_a_private_directory_passes(private: Path) -> None:
    assert private_dir_problem(private, ME) is None
    check_private_dir(private, ME)


def test_a_missing_directory_says_how_to_create_it(tmp_path: Path) -> None:
    problem = private_dir_problem(tmp_path / "nope", ME)
    assert problem is not None and str(tmp_path / "nope") in problem
    user = pwd.getpwuid(ME).pw_name
    assert problem.endswith(f"install -d -m 0700 -o {user} -g {grp.getgrgid(pwd.getpwuid(ME).pw_gid).gr_name} "
                            f"{tmp_path / 'nope'}")


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o710, 0o701, 0o770, 0o777, 0o1700, 0o500])
def test_any_mode_but_0700_is_refused(private: Path, mode: int) -> None:
    private.chmod(mode)
    with pytest.raises(RecordingsDirError) as caught:
        check_private_dir(private, ME)
    assert str(private) in str(caught.value) and f"{mode:04o}" in str(caught.value)


def test_another_owner_is_refused(private: Path) -> None:
    os.chown(private, 54321, -1)  # the tests run as root (the sandbox needs it)
    problem = private_dir_problem(private, ME)
    assert problem is not None and "uid 54321" in problem and str(private) in problem


def test_a_symlink_is_refused_even_to_a_private_directory(private: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(private)
    problem = private_dir_problem(link, ME)
    assert problem is not None and "symbolic link" in problem


def test_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("")
    assert "not a directory" in (private_dir_problem(path, ME) or "")


def test_owner_by_name_or_number() -> None:
    assert owner_uid("root") == 0 and owner_uid("4242") == 4242
    with pytest.raises(RecordingsDirError, match="recordings.owner"):
        owner_uid("no-such-user-here")


# -- the per-grant check in the dialog's core path ---------------------------------------------

class KeyOnePort:
    """Presses "1" during the question (a consenting caller)."""

    source = "ari"

    async def play(self, prompt: PromptRef, *, stop_keys: str) -> str | None:
        return "1" if stop_keys else None

    async def wait_key(self, timeout: float) -> str | None:
        return None

    async def discard_keys(self) -> None:
        pass


async def _consenting_call(private: Path, ledger: Ledger, pg_dsn: str, call_id: str) -> tuple[Decision, dict]:
    settings = load_settings(None, env={**SECRETS, "CONSENT_GATE_RECORDINGS_DIR": str(private),
                                        "CONSENT_GATE_RECORDINGS_OWNER": str(ME)})
    gate = GateContext(settings, PromptCatalog.load(SOUNDS), ledger)
    call = CallInfo(call_id=call_id, caller_number="+4511223344", language="en")
    result = await run_consent_dialog(KeyOnePort(), call, settings.purposes["training"], gate)
    connection = await asyncpg.connect(pg_dsn)
    try:
        row = await connection.fetchrow("SELECT * FROM consent_events WHERE call_id = $1", call_id)
    finally:
        await connection.close()
    assert result.recording_id is None or result.status is Decision.GRANTED
    return result.status, dict(row)


async def test_a_grant_into_a_private_directory_records(private: Path, ledger: Ledger, pg_dsn: str) -> None:
    status, row = await _consenting_call(private, ledger, pg_dsn, "private-ok-1")
    assert status is Decision.GRANTED and row["event"] == "granted"


async def test_a_grant_into_a_directory_that_stopped_being_private_is_unavailable(
    private: Path, ledger: Ledger, pg_dsn: str,
) -> None:
    private.chmod(0o755)  # changed while the service runs: the start-up check cannot see it
    status, row = await _consenting_call(private, ledger, pg_dsn, "private-755-1")
    assert status is Decision.UNAVAILABLE
    # The ledger tells the truth: the caller pressed 1, nothing was recorded, and why.
    assert row["event"] == "unavailable" and row["digit"] == "1" and row["recording_id"] is None
    assert "0755" in json.loads(row["detail"])["failure"]


async def test_a_grant_into_a_missing_directory_is_unavailable(tmp_path: Path, ledger: Ledger, pg_dsn: str) -> None:
    # MixMonitor would create it 0777 & ~umask.
    status, row = await _consenting_call(tmp_path / "gone", ledger, pg_dsn, "private-missing-1")
    assert status is Decision.UNAVAILABLE and row["event"] == "unavailable"


def test_unknown_owner_fails_the_grant_check(private: Path) -> None:
    settings = load_settings(None, env={**SECRETS, "CONSENT_GATE_RECORDINGS_DIR": str(private),
                                        "CONSENT_GATE_RECORDINGS_OWNER": "no-such-asterisk"})
    assert "no-such-asterisk" in (recordings_dir_problem(settings) or "")


# -- the ARI service: start-up and --check-config ----------------------------------------------

def test_check_config_passes_and_leaves_no_probe(service_env: dict[str, str], ami: ScriptedAmi) -> None:
    code, output = run_ari_command(service_env, "--check-config")
    assert (code, output.strip()) == (0, "configuration ok")
    assert ami.logins == ["cg-check"]  # it did log in
    assert list(Path(service_env["CONSENT_GATE_JOURNAL_DIR"]).iterdir()) == []


@pytest.mark.parametrize("damage", ["chmod", "chown", "missing"])
def test_check_config_and_start_up_fail_naming_the_directory(
    service_env: dict[str, str], private: Path, ami: ScriptedAmi, damage: str,
) -> None:
    if damage == "chmod":
        private.chmod(0o755)
    elif damage == "chown":
        os.chown(private, 54321, -1)
    else:
        shutil.rmtree(private)
    code, output = run_ari_command(service_env, "--check-config")
    assert code == 2 and f"recordings.dir {private}" in output
    # Without --check-config the service refuses to start the same way (before any connection).
    code, output = run_ari_command(service_env)
    assert code == 2 and f"recordings.dir {private}" in output
    assert ami.logins == []


def test_check_config_fails_on_a_refused_ami_login_without_showing_the_secret(
    service_env: dict[str, str], ami: ScriptedAmi,
) -> None:
    code, output = run_ari_command(service_env, "--check-config", CONSENT_GATE_AMI_SECRET="wrong-ami-secret")
    assert code == 2
    assert f"ami: cannot log in to 127.0.0.1:{ami.server_address[1]} as 'cg-check'" in output
    assert "Authentication failed" in output
    assert "wrong-ami-secret" not in output and "right-ami-secret" not in output


def test_check_config_fails_when_ami_does_not_answer(service_env: dict[str, str]) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connection refused
        code, output = run_ari_command(service_env, "--check-config", CONSENT_GATE_AMI_PORT=str(port))
    assert code == 2 and f"ami: cannot log in to 127.0.0.1:{port} as 'cg-check'" in output
    assert "right-ami-secret" not in output


def test_check_config_fails_when_the_journal_is_not_writable(service_env: dict[str, str], tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # root ignores modes: a path through a file cannot be created by anyone
    code, output = run_ari_command(service_env, "--check-config", CONSENT_GATE_JOURNAL_DIR=str(blocker / "journal"))
    assert code == 2 and f"ledger.journal_dir {blocker / 'journal'}: not writable" in output


# -- the AGI script's start-up refusal ----------------------------------------------------------

def _agi(tmp_path: Path, recordings: Path, argument: str) -> subprocess.CompletedProcess[bytes]:
    config = tmp_path / "agi.toml"
    config.write_text(f"[recordings]\ndir = {json.dumps(str(recordings))}\n"
                      f"[ledger]\ndsn = \"postgresql://127.0.0.1:1/none\"\n"
                      f"journal_dir = {json.dumps(str(tmp_path / 'agi-journal'))}\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONSENT_GATE_")}
    env.update(CONSENT_GATE_HMAC_KEY=SECRETS["CONSENT_GATE_HMAC_KEY"], PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "consent_gate.agi.script", argument, "--config", str(config)],
                          input=b"", capture_output=True, env=env, timeout=60, check=False)


@pytest.mark.parametrize("mode", [0o755, 0o750])
def test_agi_refuses_to_ask_when_the_directory_is_not_private(tmp_path: Path, private: Path, mode: int) -> None:
    private.chmod(mode)
    done = _agi(tmp_path, private, "training")
    assert done.returncode == 2 and done.stdout == b""  # not even ANSWER: the dialplan's "unavailable" stands
    assert f"recordings.dir {private}: mode {mode:04o}" in done.stderr.decode()


def test_agi_checks_against_its_own_uid(tmp_path: Path, private: Path) -> None:
    os.chown(private, 54321, -1)  # e.g. recordings.owner wrong, or Asterisk runs as another user
    done = _agi(tmp_path, private, "training")
    assert done.returncode == 2 and f"uid {ME}" in done.stderr.decode()


@pytest.mark.parametrize("argument", ["midcall-withdraw-caller", "midcall-pause-agent"])
def test_agi_withdrawal_and_pause_are_never_refused(tmp_path: Path, private: Path, argument: str) -> None:
    private.chmod(0o755)  # a withdrawal must still stop and delete: it is not refused at start-up
    done = _agi(tmp_path, private, argument)
    assert b"recordings.dir" not in done.stderr


def test_agi_resume_is_refused(tmp_path: Path, private: Path) -> None:
    private.chmod(0o755)  # a resume starts MixMonitor again
    done = _agi(tmp_path, private, "midcall-resume-agent")
    assert done.returncode == 2 and b"recordings.dir" in done.stderr

"""deploy/: the example settings document every setting and load as they are; the systemd unit
is valid (systemd-analyze verify) and keeps its hardening and its secrets out of sight."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

from consent_gate import config, recordings
from consent_gate.config import DEFAULT_PURPOSES, load_settings
from consent_gate.ledger.store import SQL_DIR

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "consent-gate.example.toml"
UNIT = ROOT / "deploy" / "consent-gate-ari.service"
FASTAGI_UNIT = ROOT / "deploy" / "consent-gate-fastagi.service"
SECRET_ENV = {"CONSENT_GATE_HMAC_KEY": "k" * 32, "CONSENT_GATE_ARI_PASSWORD": "test-password"}


def test_example_loads_as_shipped() -> None:
    settings = load_settings(EXAMPLE, env=SECRET_ENV)
    assert settings.ari_url == "http://127.0.0.1:8088"
    assert settings.ari_app == settings.ari_user == "consent-gate"
    assert str(settings.journal_dir) == "/var/lib/consent-gate/journal"
    assert str(settings.recordings_dir) == "/var/spool/asterisk/consent-gate"
    # The example's purposes are the built-in ones, spelt out.
    assert dict(settings.purposes) == DEFAULT_PURPOSES


def test_commented_settings_are_the_defaults(tmp_path: Path) -> None:
    """Uncommenting any "#key = value" line of the example changes nothing: they show defaults.
    (Secret-file settings stay commented: the files need not exist here.)"""
    lines, section = [], None
    for line in EXAMPLE.read_text().splitlines():
        header = re.match(r"^#?\[(\w+)\]$", line)
        if header:
            section = header[1]
            known = section in config._SECTION_KEYS
            lines.append(line.lstrip("#") if known else line)
            continue
        setting = re.match(r"^#(\w+) = ", line)
        keys = config._SECTION_KEYS.get(section or "")
        if setting and keys is not None and setting[1] in keys and not setting[1].endswith("_file"):
            line = line[1:]
        lines.append(line)
    uncommented = tmp_path / "uncommented.toml"
    uncommented.write_text("\n".join(lines) + "\n")
    assert load_settings(uncommented, env=SECRET_ENV) == load_settings(EXAMPLE, env=SECRET_ENV)


def test_example_documents_every_setting() -> None:
    text = EXAMPLE.read_text()
    for section, keys in config._SECTION_KEYS.items():
        assert re.search(rf"(?m)^#?\[{section}[\].]", text), f"section [{section}] undocumented"
        for key in sorted(keys or ()):
            assert re.search(rf"(?m)^#?{key} = ", text), f"{section}.{key} undocumented"
    for key in ("legal_basis", "prompt", "retention_days", "training_copy"):
        assert re.search(rf"(?m)^#   {key} ", text), f"purposes.*.{key} undocumented"
    # Every environment variable the settings loader reads is named.
    for env_name in sorted(set(re.findall(r'"(CONSENT_GATE_[A-Z_]+)"', Path(config.__file__).read_text()))):
        assert env_name in text, f"${env_name} undocumented"


def test_example_holds_no_secret() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    flat = {f"{section}.{key}": value for section, table in data.items() if section != "purposes"
            for key, value in table.items()}
    assert not [key for key in flat if re.search(r"password|secret|token|key", key)], flat
    assert "@" not in flat["ledger.dsn"] and "password" not in flat["ledger.dsn"]


def _unit(path: Path = UNIT) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_unit_is_hardened_and_reads_secrets_as_credentials() -> None:
    unit = _unit()
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["UMask"] == ["0077"]
    assert unit["NoNewPrivileges"] == ["yes"]
    # asterisk: it deletes a withdrawn recording at once in asterisk's 0700 directory (case 7).
    assert unit["User"] == ["asterisk"] and unit["Group"] == ["asterisk"]
    assert unit["CapabilityBoundingSet"] == [""] and unit["AmbientCapabilities"] == [""]
    example = tomllib.loads(EXAMPLE.read_text())
    assert unit["ReadWritePaths"] == [example["ledger"]["journal_dir"], example["recordings"]["dir"]]
    # Only the journal leaf is created for asterisk (not /var/lib/consent-gate: training copies).
    assert unit["StateDirectory"] == ["consent-gate/journal"]
    assert unit["IPAddressAllow"] == ["localhost"]
    credentials = {value.split(":", 1)[0] for value in unit["LoadCredential"]}
    assert credentials == {"ari-password", "hmac-key", "ami-secret"}
    environment = unit["Environment"]
    assert "CONSENT_GATE_ARI_PASSWORD_FILE=%d/ari-password" in environment
    assert "CONSENT_GATE_HMAC_KEY_FILE=%d/hmac-key" in environment
    assert "CONSENT_GATE_AMI_SECRET_FILE=%d/ami-secret" in environment
    # No secret value in the unit itself.
    assert not [e for e in environment if re.match(r"CONSENT_GATE_\w*(PASSWORD|KEY|SECRET)=", e)]
    assert all("--config /etc/consent-gate/consent-gate.toml" in cmd for cmd in unit["ExecStart"] + unit["ExecStartPre"])


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart= exists: point it at this checkout's entry point.
    entry = shutil.which("consent-gate-ari") or str(Path(sys.executable).with_name("consent-gate-ari"))
    assert Path(entry).exists(), "consent-gate-ari is not installed (pip install -e .)"
    text = UNIT.read_text().replace("/usr/local/bin/consent-gate-ari", entry)
    copy = tmp_path / "consent-gate-ari.service"
    copy.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "consent-gate-ari.service" not in done.stderr, done.stderr


API_UNIT = ROOT / "deploy" / "consent-gate-api.service"


def test_api_unit_runs_as_the_tools_and_reads_its_token_as_a_credential() -> None:
    unit = _unit(API_UNIT)
    assert unit["User"] == ["consent-gate-admin"] and unit["Group"] == ["consent-gate-admin"]
    assert unit["SupplementaryGroups"] == ["consent-gate"]
    assert unit["ProtectSystem"] == ["strict"] and unit["NoNewPrivileges"] == ["yes"]
    assert unit["ReadWritePaths"] == [str(load_settings(EXAMPLE, env=SECRET_ENV).recordings_dir)]
    assert {value.split(":", 1)[0] for value in unit["LoadCredential"]} == {"hmac-key", "api-token", "admin-pgpass"}
    assert "CONSENT_GATE_API_TOKEN_FILE=%d/api-token" in unit["Environment"]
    assert not [e for e in unit["Environment"] if re.match(r"CONSENT_GATE_\w*(PASSWORD|KEY|SECRET|TOKEN)=", e)]
    assert unit["ExecStart"] == ["/usr/local/bin/consent-gate api serve --config /etc/consent-gate/consent-gate.toml"]


def test_api_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    entry = shutil.which("consent-gate") or str(Path(sys.executable).with_name("consent-gate"))
    assert Path(entry).exists(), "consent-gate is not installed (pip install -e .)"
    copy = tmp_path / "consent-gate-api.service"
    copy.write_text(API_UNIT.read_text().replace("/usr/local/bin/consent-gate", entry))
    done = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "consent-gate-api.service" not in done.stderr, done.stderr


RETENTION_UNIT = ROOT / "deploy" / "consent-gate-retention.service"
TOOL_UNITS = (API_UNIT, RETENTION_UNIT)


def test_the_tools_never_run_as_asterisk_and_have_their_own_database_role() -> None:
    """Asterisk must not end up with the tools' database rights: the tools have their own user,
    and their role's password arrives as a credential only their unit can read."""
    for path in TOOL_UNITS:
        unit = _unit(path)
        assert unit["User"] == ["consent-gate-admin"] and unit["Group"] == ["consent-gate-admin"], path.name
        assert "asterisk" not in unit.get("SupplementaryGroups", [""])[0].split(), path.name
        assert "admin-pgpass:/etc/consent-gate/admin-pgpass" in unit["LoadCredential"], path.name
        assert "PGPASSFILE=%d/admin-pgpass" in unit["Environment"], path.name
        assert "PGUSER=consent_gate_tools" in unit["Environment"], path.name
        assert unit["ReadWritePaths"] == [str(load_settings(EXAMPLE, env=SECRET_ENV).recordings_dir)], path.name
    # The gate keeps its INSERT-only role: no admin credential, not the tools' user.
    gate = _unit(UNIT)
    assert gate["User"] == ["asterisk"]
    assert not [c for c in gate["LoadCredential"] if c.startswith("admin-pgpass")]
    assert not [e for e in gate["Environment"] if e.startswith(("PGUSER=", "PGPASSFILE="))]
    # The shared DSN names no user, so each unit's own role applies.
    dsn = tomllib.loads(EXAMPLE.read_text())["ledger"]["dsn"]
    assert "@" not in dsn and "user=" not in dsn
    # Of deploy/'s units only the gate (ARI service, FastAGI server) runs as asterisk, and only the
    # tools load the admin credential.
    for path in sorted((ROOT / "deploy").glob("*.service")):
        unit = _unit(path)
        assert (unit.get("User") == ["asterisk"]) == (path in (UNIT, FASTAGI_UNIT)), path.name
        admin = [c for c in unit.get("LoadCredential", []) if "admin-pgpass" in c]
        assert bool(admin) == (path in TOOL_UNITS), path.name


def test_roles_sql_documents_one_login_role_per_user() -> None:
    text = (SQL_DIR / "roles" / "roles.sql").read_text()
    assert "CREATE ROLE consent_gate_tools LOGIN IN ROLE consent_gate_admin;" in text
    assert "/etc/consent-gate/admin-pgpass" in text


def test_retention_unit_and_timer_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    entry = shutil.which("consent-gate") or str(Path(sys.executable).with_name("consent-gate"))
    assert Path(entry).exists(), "consent-gate is not installed (pip install -e .)"
    service = tmp_path / "consent-gate-retention.service"
    service.write_text(RETENTION_UNIT.read_text().replace("/usr/local/bin/consent-gate", entry))
    timer = tmp_path / "consent-gate-retention.timer"
    timer.write_text((ROOT / "deploy" / "consent-gate-retention.timer").read_text())
    done = subprocess.run(["systemd-analyze", "verify", str(service), str(timer)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "consent-gate-retention" not in done.stderr, done.stderr


TOOLS_CAPABILITY = "CAP_DAC_OVERRIDE"


def test_the_tools_reach_the_private_recordings_with_one_fenced_capability() -> None:
    """No group, no ACL on the 0700 recordings directory: the tools' units grant CAP_DAC_OVERRIDE
    and nothing else, and fence it in (read-only system, only the recordings writable, Asterisk's
    and the gate's secrets hidden; the settings in /etc/consent-gate stay readable)."""
    recordings = str(load_settings(EXAMPLE, env=SECRET_ENV).recordings_dir)
    for path in TOOL_UNITS:
        unit = _unit(path)
        assert unit["AmbientCapabilities"] == [TOOLS_CAPABILITY], path.name
        assert unit["CapabilityBoundingSet"] == [TOOLS_CAPABILITY], path.name
        assert unit["NoNewPrivileges"] == ["yes"] and unit["ProtectSystem"] == ["strict"], path.name
        assert unit["ProtectHome"] == ["yes"] and unit["PrivateTmp"] == ["yes"], path.name
        assert unit["ReadWritePaths"] == [recordings], path.name
        assert unit["UMask"] == ["0077"], path.name
        hidden = {entry.lstrip("-") for line in unit["InaccessiblePaths"] for entry in line.split()}
        assert {"/etc/asterisk", "/var/lib/asterisk", "/var/lib/consent-gate/journal", "/etc/shadow",
                "/etc/consent-gate/ari-password", "/etc/consent-gate/ami-secret"} <= hidden, path.name
        needed = ("/etc/consent-gate/consent-gate.toml", recordings, "/run/postgresql")
        assert not [h for h in hidden for n in needed if n == h or n.startswith(h.rstrip("/") + "/")], path.name
        assert "SupplementaryGroups" not in unit or "asterisk" not in unit["SupplementaryGroups"][0].split()


def _systemd_run_properties(readme: str) -> dict[str, list[str]]:
    block = readme[readme.index("systemd-run --pipe"):]
    block = block[:block.index("```")].replace("\\\n", " ")
    properties: dict[str, list[str]] = {}
    for value in re.findall(r'-p ("[^"]*"|\S+)', block):
        key, _, setting = value.strip('"').partition("=")
        properties.setdefault(key, []).append(setting)
    return properties


def test_the_readme_creates_the_recordings_directory_as_the_gate_requires() -> None:
    readme = (ROOT / "README.md").read_text()
    install = readme[readme.index("## Production install"):readme.index("## Design in one screen")]
    assert "install -d -m 0700 -o asterisk -g asterisk /var/spool/asterisk/consent-gate" in install
    assert "deploy/asterisk.service.d/consent-gate.conf" in install
    # The shared-group setup is gone everywhere an admin reads.
    for path in [ROOT / "README.md", ROOT / "dialplan" / "README.md", *sorted((ROOT / "docs").glob("*.md")),
                 *sorted((ROOT / "deploy").glob("consent-gate*"))]:
        text = path.read_text()
        assert "setfacl" not in text and "2770" not in text and "asterisk:consent-gate-admin" not in text, path.name
    # The admin CLI's transient unit runs like the tools' units: their user, their one capability,
    # the same fence.
    cli = _systemd_run_properties(install)
    api = _unit(API_UNIT)
    for key in ("User", "AmbientCapabilities", "CapabilityBoundingSet", "NoNewPrivileges", "ProtectSystem",
                "ProtectHome", "PrivateTmp", "UMask"):
        assert cli[key] == api[key], key
    assert cli["ReadWritePaths"][0] == api["ReadWritePaths"][0] and len(cli["ReadWritePaths"]) == 2
    assert "admin-pgpass:/etc/consent-gate/admin-pgpass" in cli["LoadCredential"]
    hidden = {entry.lstrip("-") for line in cli["InaccessiblePaths"] for entry in line.split()}
    assert {"/etc/asterisk", "/var/lib/consent-gate/journal", "/etc/consent-gate/ari-password"} <= hidden


def _run_as(uid: int, capabilities: list[str], *argv: str) -> subprocess.CompletedProcess[str]:
    """argv as uid, with exactly the unit's capabilities (ambient, bounding set) and no_new_privs,
    the way systemd starts the unit (setpriv does the same system calls)."""
    caps = "".join(f",+{c.removeprefix('CAP_').lower()}" for c in capabilities if c)
    command = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs",
               f"--inh-caps=-all{caps}", f"--bounding-set=-all{caps}"]
    if caps:
        command.append(f"--ambient-caps=-all{caps}")
    return subprocess.run([*command, *argv], capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_the_units_can_do_their_work_in_the_private_recordings_directory() -> None:
    """A recordings directory exactly as case 7 requires (owner 0700, files 0600): the gate, as its
    owner and with no capability, deletes a withdrawn recording; the tools, another user with the
    units' capability, list, read and delete there; that user without it can do nothing."""
    asterisk, tools = 65533, 65534  # stand-ins for asterisk and consent-gate-admin
    with tempfile.TemporaryDirectory(prefix="consent-gate-recordings-") as parent:
        os.chmod(parent, 0o711)  # searchable, so only the recordings directory's own mode decides
        directory = Path(parent) / "recordings"
        directory.mkdir(mode=0o700)
        names = [f"{'a' * 32}.wav", f"{'b' * 32}.wav", f"{'c' * 32}.wav"]
        for name in names:
            (directory / name).write_bytes(b"RIFF")
            (directory / name).chmod(0o600)
            os.chown(directory / name, asterisk, asterisk)
        os.chown(directory, asterisk, asterisk)
        assert recordings.dir_mode_problem(directory) is None
        gate, admin = _unit(UNIT), _unit(API_UNIT)

        withdrawn = _run_as(asterisk, gate["AmbientCapabilities"], "rm", "-f", str(directory / names[0]))
        assert withdrawn.returncode == 0 and not (directory / names[0]).exists(), withdrawn.stderr

        no_capability = _run_as(tools, [], "cat", str(directory / names[1]))
        assert no_capability.returncode != 0 and "Permission denied" in no_capability.stderr
        assert _run_as(tools, [], "rm", "-f", str(directory / names[1])).returncode != 0
        assert (directory / names[1]).exists()

        listed = _run_as(tools, admin["AmbientCapabilities"], "ls", str(directory))
        assert listed.returncode == 0 and listed.stdout.split() == names[1:], listed.stderr
        exported = _run_as(tools, admin["AmbientCapabilities"], "cat", str(directory / names[1]))
        assert exported.returncode == 0 and exported.stdout == "RIFF", exported.stderr
        erased = _run_as(tools, admin["AmbientCapabilities"], "rm", "-f", str(directory / names[1]))
        assert erased.returncode == 0 and not (directory / names[1]).exists(), erased.stderr
        # The directory is still exactly as private as the gate requires.
        assert recordings.dir_mode_problem(directory) is None
        assert os.stat(directory).st_uid == asterisk


ASTERISK_DROP_IN = ROOT / "deploy" / "asterisk.service.d" / "consent-gate.conf"


def test_asterisk_drop_in_sets_a_private_umask() -> None:
    """MixMonitor creates files 0666 & ~umask: Asterisk must run with UMask=0077 (issue 16, case 7)."""
    text = ASTERISK_DROP_IN.read_text()
    assert re.search(r"(?m)^\[Service\]$", text)
    assert _unit(ASTERISK_DROP_IN)["UMask"] == ["0077"]
    # The comments say where it goes and how the directory is made.
    assert "/etc/systemd/system/asterisk.service.d/consent-gate.conf" in text
    assert "install -d -m 0700 -o asterisk -g asterisk" in text


def test_asterisk_drop_in_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = tmp_path / "asterisk.service"
    unit.write_text(f"[Unit]\nDescription=stand-in for Asterisk\n[Service]\nExecStart={shutil.which('true')}\n")
    drop_in = tmp_path / "asterisk.service.d"
    drop_in.mkdir()
    shutil.copy(ASTERISK_DROP_IN, drop_in / "consent-gate.conf")
    # Drop-ins are read from the unit search path (a trailing ":" keeps the built-in paths).
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{tmp_path}:")
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "consent-gate.conf" not in done.stderr, done.stderr


def test_example_recordings_dir_is_the_units_and_owned_by_asterisk() -> None:
    settings = load_settings(EXAMPLE, env=SECRET_ENV)
    assert settings.recordings_owner == "asterisk" and settings.api_allow_remote is False



def test_fastagi_unit_is_hardened_and_holds_only_the_hmac_key() -> None:
    unit, gate = _unit(FASTAGI_UNIT), _unit(UNIT)
    for key in ("ProtectSystem", "UMask", "NoNewPrivileges", "User", "Group", "CapabilityBoundingSet",
                "AmbientCapabilities", "ReadWritePaths", "StateDirectory", "IPAddressDeny", "IPAddressAllow",
                "SystemCallFilter", "MemoryDenyWriteExecute"):
        assert unit[key] == gate[key], key
    # AGI does everything on the channel: no ARI password, no AMI secret.
    assert [value.split(":", 1)[0] for value in unit["LoadCredential"]] == ["hmac-key"]
    assert unit["Environment"] == ["CONSENT_GATE_HMAC_KEY_FILE=%d/hmac-key"]
    assert unit["ExecStartPre"] == ["/usr/local/bin/consent-gate-fastagi --config /etc/consent-gate/consent-gate.toml "
                                    "--check-config"]
    assert unit["ExecStart"] == ["/usr/local/bin/consent-gate-fastagi --config /etc/consent-gate/consent-gate.toml"]


def test_fastagi_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    entry = shutil.which("consent-gate-fastagi") or str(Path(sys.executable).with_name("consent-gate-fastagi"))
    assert Path(entry).exists(), "consent-gate-fastagi is not installed (pip install -e .)"
    copy = tmp_path / "consent-gate-fastagi.service"
    copy.write_text(FASTAGI_UNIT.read_text().replace("/usr/local/bin/consent-gate-fastagi", entry))
    done = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "consent-gate-fastagi.service" not in done.stderr, done.stderr

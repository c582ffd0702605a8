"""deploy/: the example settings document every setting and load as they are; the systemd unit
is valid (systemd-analyze verify) and keeps its hardening and its secrets out of sight."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import tomllib
from pathlib import Path

from consent_gate import config, retention
from consent_gate.config import DEFAULT_PURPOSES, load_settings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "consent-gate.example.toml"
UNIT = ROOT / "deploy" / "consent-gate-ari.service"
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
    assert unit["User"] == ["consent-gate"] or unit.get("DynamicUser") == ["yes"]
    example = tomllib.loads(EXAMPLE.read_text())
    assert unit["ReadWritePaths"] == [example["ledger"]["journal_dir"]]
    assert unit["IPAddressAllow"] == ["localhost"]
    credentials = {value.split(":", 1)[0] for value in unit["LoadCredential"]}
    assert credentials == {"ari-password", "hmac-key"}
    environment = unit["Environment"]
    assert "CONSENT_GATE_ARI_PASSWORD_FILE=%d/ari-password" in environment
    assert "CONSENT_GATE_HMAC_KEY_FILE=%d/hmac-key" in environment
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
    assert gate["User"] == ["consent-gate"]
    assert not [c for c in gate["LoadCredential"] if c.startswith("admin-pgpass")]
    assert not [e for e in gate["Environment"] if e.startswith(("PGUSER=", "PGPASSFILE="))]
    # The shared DSN names no user, so each unit's own role applies.
    dsn = tomllib.loads(EXAMPLE.read_text())["ledger"]["dsn"]
    assert "@" not in dsn and "user=" not in dsn
    # Nothing in deploy/ runs as asterisk.
    for path in sorted((ROOT / "deploy").glob("*.service")):
        assert _unit(path).get("User") != ["asterisk"], path.name


def test_roles_sql_documents_one_login_role_per_user() -> None:
    text = (ROOT / "sql" / "roles" / "roles.sql").read_text()
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


def _posix_acl(entries: tuple[tuple[int, int], ...]) -> bytes:
    """The kernel's xattr form of a POSIX ACL (what setfacl writes): version 2, then tag, perm, id."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in entries)


def test_the_documented_recordings_directory_lets_the_tools_group_read_new_files(tmp_path: Path) -> None:
    """README: install -d -m 2770 -o asterisk -g consent-gate-admin + setfacl -d -m u::rw,g::r,o::-.
    A file created the way MixMonitor does (mode 0666, Asterisk's umask 0077) must come out 0640
    in the tools' group, and the sweeper must accept the directory as private."""
    readme = (ROOT / "README.md").read_text()
    assert "install -d -m 2770 -o asterisk -g consent-gate-admin /var/spool/asterisk/consent-gate" in readme
    assert "setfacl -d -m u::rw,g::r,o::- /var/spool/asterisk/consent-gate" in readme
    directory = tmp_path / "recordings"
    directory.mkdir()
    os.chown(directory, -1, os.getegid())  # stands for consent-gate-admin: the group the tools run as
    directory.chmod(0o2770)
    os.setxattr(directory, "system.posix_acl_default", _posix_acl(((0x01, 6), (0x04, 4), (0x20, 0))))
    recording = directory / ("a" * 32 + ".wav")
    create = ("import os, sys; os.umask(0o077); "
              "os.close(os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o666))")
    subprocess.run([sys.executable, "-c", create, str(recording)], check=True, timeout=30)
    info = recording.stat()
    assert oct(info.st_mode & 0o7777) == oct(0o640) and info.st_gid == directory.stat().st_gid
    assert retention.recordings_dir_problem(directory) is None

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

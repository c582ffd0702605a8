"""The production install path: a wheel built from this checkout, installed into a fresh venv
(as /opt/consent-gate would be), run from another directory, with nothing of the checkout on
its path.

* The wheel holds the product only (consent_gate/...: migrations, prompts, py.typed) and no
  test rig, no tests.
* Its ``consent-gate db migrate`` migrates a new database, applies nothing the second time, and
  refuses a ledger that a newer version migrated.
* Its ``consent-gate-ari --check-config`` passes against the sandbox Asterisk.
* Its ``consent-gate-ari`` serves a real SIP call through the sandbox Asterisk: the caller
  presses 1, the decision is in the new database, the recording exists.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import asyncpg
import pytest

from consent_gate_rig.calls import Phones, finish, ledger_events, recording_files, run_gate_call
from consent_gate_rig.harness import SANDBOX_PURPOSES, AsteriskLog, FastAgiService, GateService
from consent_gate_rig.pgsandbox import PgSandbox
from consent_gate_rig.sandbox import AsteriskSandbox

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def run(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel`` of the checkout, then ``pip install`` of that file into a new venv: its bin/."""
    base = tmp_path_factory.mktemp("wheel")
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q",
                 "-w", str(base / "dist"), str(ROOT)], cwd=base)
    assert built.returncode == 0, built.stderr
    [wheel] = (base / "dist").glob("consent_gate-*.whl")
    prefix = base / "opt" / "consent-gate"
    venv.EnvBuilder(with_pip=True, clear=True).create(prefix)
    clean_env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = run([str(prefix / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                str(wheel)], cwd=base, env=clean_env)
    assert done.returncode == 0, done.stderr
    (base / "wheel-path").write_text(str(wheel))
    return prefix / "bin"


def test_the_wheel_holds_the_product_and_no_rig(installed: Path) -> None:
    wheel = Path((installed.parents[2] / "wheel-path").read_text())
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/", 1)[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"consent_gate"}
    for needed in ("consent_gate/py.typed", "consent_gate/ledger/sql/001_ledger.sql",
                   "consent_gate/ledger/sql/roles/roles.sql", "consent_gate/prompts/manifest.json",
                   "consent_gate/prompts/sounds/da/question-training.wav",
                   "consent_gate/prompts/sounds/en/question-training.wav",
                   "consent_gate/prompts/texts/en/question-training.txt", "consent_gate/agi/script.py",
                   "consent_gate/agi/session.py", "consent_gate/agi/fastagi.py", "consent_gate/ari/main.py"):
        assert needed in names, needed
    assert not [n for n in names if "rig" in n.split("/") or "softphone" in n or "sandbox" in n or n.startswith("tests/")]
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "consent_gate_rig" not in entry_points and "consent-gate-ari" in entry_points
    assert not [p for p in ("consent-gate-sandbox", "consent-gate-softphone", "consent-gate-demo")
                if (installed / p).exists()]
    sql = [n for n in names if n.startswith("consent_gate/ledger/sql/") and n.endswith(".sql")]
    assert len(sql) == len(list((ROOT / "consent_gate" / "ledger" / "sql").rglob("*.sql")))


def test_nothing_of_the_checkout_is_on_the_installed_path(installed: Path, tmp_path: Path) -> None:
    probe = run([str(installed / "python"), "-c",
                 "import consent_gate, importlib.util as u; print(consent_gate.__file__); "
                 "print(u.find_spec('consent_gate_rig'))"], cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    where, rig = probe.stdout.split()
    assert Path(where).is_relative_to(installed.parent) and "site-packages" in where
    assert rig == "None"


async def test_the_installed_cli_migrates_a_new_ledger_once_and_refuses_a_downgrade(
    installed: Path, pg_sandbox: PgSandbox, tmp_path: Path,
) -> None:
    dsn = await pg_sandbox.new_database("cg_wheel")
    first = run([str(installed / "consent-gate"), "db", "migrate", "--dsn", dsn], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    shipped = sorted(p.name for p in (ROOT / "consent_gate" / "ledger" / "sql").glob("[0-9]*.sql"))
    assert first.stdout.strip() == "applied: " + ", ".join(shipped)
    again = run([str(installed / "consent-gate"), "db", "migrate", "--dsn", dsn], cwd=tmp_path)
    assert (again.returncode, again.stdout.strip()) == (0, "applied: nothing (up to date)")

    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute("INSERT INTO schema_migrations (version) VALUES ('999_from_a_newer_version.sql')")
        tables_before = await connection.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await connection.close()
    refused = run([str(installed / "consent-gate"), "db", "migrate", "--dsn", dsn], cwd=tmp_path)
    assert refused.returncode == 2
    assert "999_from_a_newer_version.sql" in refused.stderr and "newer version" in refused.stderr
    assert "Traceback" not in refused.stderr
    connection = await asyncpg.connect(dsn)
    try:
        assert await connection.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == tables_before
    finally:
        await connection.close()


async def test_the_installed_service_checks_its_config_and_serves_a_real_call(
    installed: Path, pg_sandbox: PgSandbox, asterisk: AsteriskSandbox, asterisk_log: AsteriskLog,
    phones: Phones, gate_service: GateService, tmp_path: Path, test_tag: str,
) -> None:
    dsn = await pg_sandbox.new_database("cg_wheel")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    migrated = run([str(installed / "consent-gate"), "db", "migrate", "--dsn", dsn], cwd=elsewhere)
    assert migrated.returncode == 0, migrated.stderr

    service = GateService(asterisk, dsn, tmp_path / "service", command=[str(installed / "consent-gate-ari")])
    service.work_dir.mkdir()
    config = service.work_dir / "consent-gate.toml"
    config.write_text(SANDBOX_PURPOSES)
    service.config_path = config
    env = {key: value for key, value in service.env().items() if key != "PYTHONPATH"}
    checked = run([str(installed / "consent-gate-ari"), "--config", str(config), "--check-config"],
                  cwd=elsewhere, env=env, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # One ARI application, one service: the session's gate steps aside for the installed one.
    await gate_service.stop()
    before = recording_files(asterisk)
    try:
        await service.start()
        call = await run_gate_call(phones, asterisk_log, test_tag, exten="200", key="1", key_after_prompt=1.0)
        await finish(call)
        assert call.result.status == "granted", service.log_tail()
        events = await ledger_events(dsn, call.result.consent_id)
        assert [e["event"] for e in events][:1] == ["granted"]
        # The session's own ledger never saw this call: the installed service wrote the new one.
        assert await ledger_events(gate_service.dsn, call.result.consent_id) == []
        assert f"{call.result.recording_id}.wav" in recording_files(asterisk) - before
        # ... and it was the installed one that served it.
        assert service.process is not None
        assert str(installed / "consent-gate-ari") in Path(f"/proc/{service.process.pid}/cmdline").read_text()
    finally:
        await service.stop()
        await gate_service.start()


async def test_the_installed_fastagi_server_checks_its_config_and_serves_a_real_call(
    installed: Path, pg_sandbox: PgSandbox, asterisk: AsteriskSandbox, asterisk_log: AsteriskLog,
    phones: Phones, gate_service: GateService, fastagi_service: FastAgiService, tmp_path: Path, test_tag: str,
) -> None:
    dsn = await pg_sandbox.new_database("cg_wheel")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert run([str(installed / "consent-gate"), "db", "migrate", "--dsn", dsn], cwd=elsewhere).returncode == 0
    owner = GateService(asterisk, dsn, tmp_path / "service", hmac_key=gate_service.hmac_key)
    server = FastAgiService(owner, command=[str(installed / "consent-gate-fastagi")])
    server.work_dir.mkdir(parents=True)
    env = {key: value for key, value in server.env().items() if key != "PYTHONPATH"}
    config = server.work_dir / "consent-gate.toml"
    config.write_text(SANDBOX_PURPOSES)
    owner.config_path = config
    checked = run([str(installed / "consent-gate-fastagi"), "--config", str(config), "--check-config"],
                  cwd=elsewhere, env=env, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # One FastAGI port: the session's server steps aside for the installed one.
    await fastagi_service.stop()
    try:
        await server.start()
        call = await run_gate_call(phones, asterisk_log, test_tag, exten="350", key="1", key_after_prompt=1.0)
        await finish(call)
        assert call.result.status == "granted", server.log_tail()
        assert [e["event"] for e in await ledger_events(dsn, call.result.consent_id)][:1] == ["granted"]
        assert await ledger_events(gate_service.dsn, call.result.consent_id) == []
        assert server.process is not None
        assert str(installed / "consent-gate-fastagi") in Path(f"/proc/{server.process.pid}/cmdline").read_text()
    finally:
        await server.stop()
        await fastagi_service.start()

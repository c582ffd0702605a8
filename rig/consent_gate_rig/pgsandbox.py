"""A throwaway PostgreSQL cluster for tests and the demo (initdb + pg_ctl, private port and socket).

Runs as the ``postgres`` system user when started by root (initdb refuses root).  The socket
directory and data directory are private to the instance; only 127.0.0.1 is listened on.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PG_BIN_CANDIDATES = ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/17/bin")


class PgSandboxError(RuntimeError):
    pass


def find_pg_bin() -> Path:
    override = os.environ.get("CONSENT_GATE_PG_BIN")
    if override:
        return Path(override)
    for candidate in PG_BIN_CANDIDATES:
        if (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    raise PgSandboxError("PostgreSQL server binaries not found (apt-get install postgresql)")


@dataclass
class PgSandbox:
    base_dir: Path
    port: int = 25432
    database: str = "consent_gate"
    user: str = "consent_gate"

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "socket"

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def admin_dsn(self, database: str = "postgres") -> str:
        """As the superuser (tests that create databases or roles)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    async def new_database(self, prefix: str = "cg", *, template: str | None = None) -> str:
        """A new database owned by the application role (empty, or a copy of ``template``);
        returns its DSN, whose last path part is the database's name."""
        import uuid

        import asyncpg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        admin = await asyncpg.connect(self.admin_dsn(), timeout=10)
        try:
            copy = f" TEMPLATE {template}" if template else ""
            await admin.execute(f"CREATE DATABASE {name}{copy} OWNER {self.user}")
        finally:
            await admin.close()
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{name}"

    def _as_owner(self, cmd: list[str]) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *cmd]
        return cmd

    def _run(self, cmd: list[str], what: str, timeout: float = 120) -> str:
        done = subprocess.run(self._as_owner(cmd), capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise PgSandboxError(f"{what} failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()}")
        return done.stdout

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def start(self) -> None:
        """initdb on first use, then start; idempotent if already running."""
        pg_bin = find_pg_bin()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for directory in (self.base_dir, self.socket_dir):
            directory.mkdir(mode=0o700, exist_ok=True)
            self._chown(directory)
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                [str(pg_bin / "initdb"), "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
                 "--encoding=UTF8", "--locale=C", "--no-sync"],
                "initdb",
            )
        if self.is_running():
            return
        options = (
            f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 "
            "-c fsync=on -c max_connections=200 -c shared_buffers=64MB"
        )
        self._run(
            [str(pg_bin / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.base_dir / "postgres.log"),
             "-o", options, "-w", "-t", "60", "start"],
            "pg_ctl start",
        )
        self._ensure_database(pg_bin)

    def _psql(self, pg_bin: Path, sql: str, database: str = "postgres") -> str:
        return self._run(
            [str(pg_bin / "psql"), "-h", str(self.socket_dir), "-p", str(self.port), "-U", "postgres",
             "-d", database, "-Atqc", sql],
            f"psql {sql[:40]!r}",
        )

    def _ensure_database(self, pg_bin: Path) -> None:
        if not self._psql(pg_bin, f"SELECT 1 FROM pg_roles WHERE rolname = '{self.user}'").strip():
            self._psql(pg_bin, f"CREATE ROLE {self.user} LOGIN")
        if not self._psql(pg_bin, f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'").strip():
            self._psql(pg_bin, f"CREATE DATABASE {self.database} OWNER {self.user}")

    def is_running(self) -> bool:
        pg_bin = find_pg_bin()
        done = subprocess.run(
            self._as_owner([str(pg_bin / "pg_ctl"), "-D", str(self.data_dir), "status"]),
            capture_output=True, text=True,
        )
        return done.returncode == 0

    def stop(self, mode: str = "fast") -> None:
        if not (self.data_dir / "PG_VERSION").exists() or not self.is_running():
            return
        pg_bin = find_pg_bin()
        self._run([str(pg_bin / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60", "stop"], "pg_ctl stop")

    def wait_ready(self, timeout: float = 30) -> None:
        pg_bin = find_pg_bin()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = subprocess.run(
                [str(pg_bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)], capture_output=True
            )
            if done.returncode == 0:
                return
            time.sleep(0.1)
        raise PgSandboxError(f"PostgreSQL on port {self.port} not ready after {timeout:.0f} s")

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base_dir, ignore_errors=True)

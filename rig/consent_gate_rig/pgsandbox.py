"""A throwaway PostgreSQL cluster for tests and the demo (initdb + pg_ctl, private port and socket).

Runs as the ``postgres`` system user when started by root (initdb refuses root).  The socket
directory and data directory are private to the instance; only 127.0.0.1 is listened on.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
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
    # More server options (``-c name=value ...``), e.g. a replication primary's.
    extra_options: str = ""

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
        if self.extra_options:
            options += " " + self.extra_options
        try:
            self._run(
                [str(pg_bin / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.base_dir / "postgres.log"),
                 "-o", options, "-w", "-t", "60", "start"],
                "pg_ctl start",
            )
        except PgSandboxError as error:  # the reason is in the server's log, which teardown removes
            try:
                tail = "\n".join((self.base_dir / "postgres.log").read_text(errors="replace").splitlines()[-5:])
            except OSError:
                tail = ""
            raise PgSandboxError(f"{error}\n{tail}") from None
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

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None

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


def child_pids(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


@dataclass
class PgCluster:
    """A primary and a streaming-replication standby with synchronous commit (loopback only).

    The primary waits for the standby to flush every commit (``synchronous_standby_names``), so
    an acknowledged write survives losing the primary.  ``kill_primary`` SIGKILLs the primary's
    postmaster and its backends (no shutdown, no goodbye to the clients); ``promote`` makes the
    standby the primary (``pg_ctl promote``), as Patroni would.  The standby runs without
    synchronous standbys of its own, so once promoted it commits alone.
    """

    base_dir: Path
    primary_port: int
    standby_port: int
    standby_name: str = "standby1"
    database: str = "consent_gate"
    user: str = "consent_gate"

    def __post_init__(self) -> None:
        self.primary = PgSandbox(
            self.base_dir / "primary", port=self.primary_port, database=self.database, user=self.user,
            extra_options="-c wal_level=replica -c max_wal_senders=5 -c synchronous_commit=on")
        self.standby = PgSandbox(self.base_dir / "standby", port=self.standby_port, database=self.database,
                                 user=self.user, extra_options="-c hot_standby=on")

    @property
    def dsn(self) -> str:
        """Both hosts; libpq and asyncpg connect to whichever one accepts writes."""
        return (f"postgresql://{self.user}@127.0.0.1:{self.primary_port},127.0.0.1:{self.standby_port}"
                f"/{self.database}?target_session_attrs=read-write")

    def start(self, timeout: float = 60) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.primary._chown(self.base_dir)
        self.primary.start()
        pg_bin = find_pg_bin()
        standby = self.standby
        if not (standby.data_dir / "PG_VERSION").exists():
            for directory in (standby.base_dir, standby.socket_dir):
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                standby._chown(directory)
            standby._run(
                [str(pg_bin / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(self.primary_port), "-U", "postgres",
                 "-D", str(standby.data_dir), "-X", "stream", "-R", "--no-sync", "--checkpoint=fast"],
                "pg_basebackup", timeout=timeout,
            )
            # -R wrote standby.signal and a primary_conninfo; this one names the standby, which
            # is how synchronous_standby_names recognises it.  A later line wins.
            with open(standby.data_dir / "postgresql.auto.conf", "a") as conf:
                conf.write(f"primary_conninfo = 'host=127.0.0.1 port={self.primary_port} user=postgres "
                           f"application_name={self.standby_name}'\n")
        standby.start()
        # Only now (a commit would wait for a standby that is not there yet), and only on the
        # primary (its postgresql.auto.conf, written after the base backup was taken).
        self.primary._psql(pg_bin, f"ALTER SYSTEM SET synchronous_standby_names = '{self.standby_name}'")
        self.primary._psql(pg_bin, "SELECT pg_reload_conf()")
        self.wait_synchronous(timeout)

    def sync_state(self) -> str:
        return self.primary._psql(
            find_pg_bin(),
            f"SELECT sync_state FROM pg_stat_replication WHERE application_name = '{self.standby_name}'").strip()

    def wait_synchronous(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.sync_state() != "sync":
            if time.monotonic() > deadline:
                raise PgSandboxError(f"the standby on port {self.standby_port} is not a synchronous standby "
                                     f"after {timeout:.0f} s")
            time.sleep(0.1)

    def kill_primary(self) -> None:
        """Lose the primary at once: SIGKILL its postmaster and every backend."""
        pid = self.primary.postmaster_pid()
        if pid is None:
            raise PgSandboxError("the primary is not running")
        children = child_pids(pid)
        for victim in (pid, *children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{victim}").exists() for victim in (pid, *children)):
            if time.monotonic() > deadline:
                raise PgSandboxError(f"the primary's processes survived SIGKILL: {pid} {children}")
            time.sleep(0.05)

    def promote(self, timeout: float = 60) -> None:
        self.standby._run([str(find_pg_bin() / "pg_ctl"), "-D", str(self.standby.data_dir), "-w",
                           "-t", str(int(timeout)), "promote"], "pg_ctl promote", timeout=timeout + 5)

    def is_in_recovery(self, sandbox: PgSandbox) -> bool:
        return sandbox._psql(find_pg_bin(), "SELECT pg_is_in_recovery()").strip() == "t"

    def destroy(self) -> None:
        for sandbox in (self.standby, self.primary):
            with contextlib.suppress(PgSandboxError, subprocess.SubprocessError):
                sandbox.stop("immediate")
        shutil.rmtree(self.base_dir, ignore_errors=True)


PATRONI_YAML = """\
scope: {scope}
name: {name}
restapi: {{listen: "127.0.0.1:{rest}", connect_address: "127.0.0.1:{rest}"}}
etcd: {{host: "127.0.0.1:{etcd}"}}
bootstrap:
  dcs:
    ttl: 10
    loop_wait: 1
    retry_timeout: 4
    synchronous_mode: true
    postgresql:
      use_pg_rewind: false
      parameters: {{wal_level: replica, max_wal_senders: 5, synchronous_commit: "on", fsync: "on",
                   max_connections: 200, shared_buffers: 64MB}}
  initdb: [{{encoding: UTF8}}, {{locale: C}}, {{auth: trust}}]
postgresql:
  listen: "127.0.0.1:{port}"
  connect_address: "127.0.0.1:{port}"
  data_dir: "{data}"
  bin_dir: "{bin}"
  pgpass: "{base}/pgpass"
  basebackup: [{{checkpoint: fast}}]   # else the standby's base backup waits for a spread checkpoint
  parameters: {{unix_socket_directories: "{socket}"}}
  authentication:
    superuser: {{username: postgres}}
    replication: {{username: postgres}}
  pg_hba: ["local all all trust", "host all all 127.0.0.1/32 trust", "host replication all 127.0.0.1/32 trust"]
"""


@dataclass
class PatroniCluster:
    """The same primary + synchronous standby, but run and promoted by Patroni (Debian packages
    ``patroni`` and ``etcd-server``): one etcd member, two Patroni members, loopback only.

    ``synchronous_mode: true`` (Patroni manages synchronous_standby_names); not
    ``synchronous_mode_strict``, which with one standby would leave the promoted primary unable
    to commit at all (docs/deployment.md: production runs two standbys with strict mode).
    ``kill_primary`` SIGKILLs the leader's Patroni and PostgreSQL; ``promote`` waits until
    Patroni has promoted the standby (the leader key's TTL, 10 s here, then the promotion).
    Ports: the primary's and the standby's PostgreSQL as given, their REST APIs + 2, etcd's
    client and peer ports + 4 and + 5 from the primary's.
    """

    base_dir: Path
    primary_port: int
    standby_port: int
    database: str = "consent_gate"
    user: str = "consent_gate"
    scope: str = "consent-gate-rig"

    def __post_init__(self) -> None:
        self.primary = PgSandbox(self.base_dir / "pg1", port=self.primary_port, database=self.database, user=self.user)
        self.standby = PgSandbox(self.base_dir / "pg2", port=self.standby_port, database=self.database, user=self.user)
        self.etcd_port = self.primary_port + 4
        self._processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def dsn(self) -> str:
        return (f"postgresql://{self.user}@127.0.0.1:{self.primary_port},127.0.0.1:{self.standby_port}"
                f"/{self.database}?target_session_attrs=read-write")

    @staticmethod
    def available() -> bool:
        return shutil.which("patroni") is not None and shutil.which("etcd") is not None

    def _spawn(self, key: str, cmd: list[str], log: Path) -> None:
        with open(log, "ab") as out:
            self._processes[key] = subprocess.Popen(
                self.primary._as_owner(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)

    def _member(self, key: str, sandbox: PgSandbox) -> None:
        for directory in (sandbox.base_dir, sandbox.socket_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            sandbox._chown(directory)
        config = sandbox.base_dir / "patroni.yml"
        config.write_text(PATRONI_YAML.format(
            scope=self.scope, name=key, rest=sandbox.port + 2, etcd=self.etcd_port, port=sandbox.port,
            data=sandbox.data_dir, bin=find_pg_bin(), base=sandbox.base_dir, socket=sandbox.socket_dir))
        sandbox._chown(config)
        self._spawn(key, ["patroni", str(config)], sandbox.base_dir / "patroni.log")

    def _wait(self, what: str, predicate: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if predicate():
                    return
            except (PgSandboxError, subprocess.SubprocessError):
                pass
            for key, process in self._processes.items():
                if process.poll() is not None:
                    raise PgSandboxError(f"{key} exited ({process.returncode}) while waiting for {what}:\n"
                                         f"{self._log_tail(key)}")
            if time.monotonic() > deadline:
                raise PgSandboxError(f"{what}: not within {timeout:.0f} s:\n{self._log_tail('pg1')}\n"
                                     f"{self._log_tail('pg2')}")
            time.sleep(0.2)

    def _log_tail(self, key: str, lines: int = 12) -> str:
        """The end of a member's log (teardown removes the directory)."""
        path = self.base_dir / ("etcd.log" if key == "etcd" else f"{key}/patroni.log")
        try:
            return f"{path}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return f"{path}: (none)"

    def start(self, timeout: float = 90) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.primary._chown(self.base_dir)
        etcd_dir = self.base_dir / "etcd"
        etcd_dir.mkdir(mode=0o700, exist_ok=True)
        self.primary._chown(etcd_dir)
        client, peer = f"http://127.0.0.1:{self.etcd_port}", f"http://127.0.0.1:{self.etcd_port + 1}"
        self._spawn("etcd", ["etcd", "--name", "rig", "--data-dir", str(etcd_dir / "data"),
                             "--listen-client-urls", client, "--advertise-client-urls", client,
                             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                             "--initial-cluster", f"rig={peer}", "--enable-v2=true"], self.base_dir / "etcd.log")
        self._member("pg1", self.primary)  # bootstraps (initdb) and takes the leader key
        pg_bin = find_pg_bin()
        self._wait("the first member to lead", lambda: self.primary._psql(pg_bin, "SELECT NOT pg_is_in_recovery()")
                   .strip() == "t", timeout)
        self.primary._ensure_database(pg_bin)
        self._member("pg2", self.standby)  # a base backup of pg1, then a synchronous standby
        self.wait_synchronous(timeout)

    def sync_state(self) -> str:
        return self.primary._psql(find_pg_bin(), "SELECT sync_state FROM pg_stat_replication "
                                                 "WHERE application_name = 'pg2'").strip()

    def wait_synchronous(self, timeout: float = 90) -> None:
        self._wait("the standby to be synchronous", lambda: self.sync_state() == "sync", timeout)

    def kill_primary(self) -> None:
        """Lose the leader at once: its Patroni (no leader key release) and its PostgreSQL."""
        process = self._processes.pop("pg1")
        victims = [process.pid, *child_pids(process.pid)]
        pid = self.primary.postmaster_pid()
        if pid is not None:
            victims += [pid, *child_pids(pid)]
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        process.wait(30)
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{victim}").exists() for victim in victims):
            if time.monotonic() > deadline:
                raise PgSandboxError(f"the primary's processes survived SIGKILL: {victims}")
            time.sleep(0.05)

    def promote(self, timeout: float = 60) -> None:
        """Patroni promotes; this waits for it (and for the promoted server to accept writes)."""
        self._wait("Patroni to promote the standby", lambda: not self.is_in_recovery(self.standby), timeout)

    def is_in_recovery(self, sandbox: PgSandbox) -> bool:
        return sandbox._psql(find_pg_bin(), "SELECT pg_is_in_recovery()").strip() == "t"

    def destroy(self) -> None:
        members = [self._processes.pop(key) for key in ("pg2", "pg1") if key in self._processes]
        for process in members:  # runuser relays SIGTERM; Patroni stops its PostgreSQL, runuser reaps
            process.terminate()
        for process in members:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
        for sandbox in (self.standby, self.primary):
            with contextlib.suppress(PgSandboxError, subprocess.SubprocessError):
                sandbox.stop("immediate")
        etcd = self._processes.pop("etcd", None)
        if etcd is not None:
            etcd.terminate()
            try:
                etcd.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(etcd.pid, signal.SIGKILL)
        shutil.rmtree(self.base_dir, ignore_errors=True)

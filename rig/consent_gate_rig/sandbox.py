"""Asterisk sandbox: a real Asterisk 22 for tests and the demo, two providers, one interface.

* ``chroot``: a cached Debian sid root (``debootstrap --variant=minbase``) with Debian's
  ``asterisk`` package, started as ``chroot ROOT asterisk -C <instance>/etc/asterisk.conf -f``.
  Used on Debian hosts without a Docker engine (this project's CI).
* ``docker``: ``docker-compose.asterisk.yml`` runs the stack's Asterisk image (the one
  ``docker-compose.yml`` gives admins: same Dockerfile, base and tag; built on first use, see
  :mod:`consent_gate_rig.dockerimages`) and mounts the same instance directory at the same path,
  so the configuration is identical.  No engine, a failed build or a container that exits is an
  error naming the cause; the docker provider never falls back to the chroot one.

The instance directory holds the rendered configuration (``etc/``), a copy of the project's
``dialplan/``, the prompt audio (``sounds/``), the recordings (``recordings/``, mode 0700) and
Asterisk's logs.  Inside Asterisk it is always ``/srv/consent-gate/<name>``; on the host it is
``<root>/srv/consent-gate/<name>`` (chroot) or ``.run/<name>`` (docker).

Teardown stops exactly the process this sandbox started (pid in ``state.json``) and unmounts
exactly the mounts it made.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol

import consent_gate
from consent_gate.prompts.catalog import packaged_sounds_dir
from consent_gate_rig import dockerimages
from consent_gate_rig.sandbox_errors import SandboxError

# The checkout this rig lives in (rig/ beside the product): the dialplan, the deploy files and
# the compose file come from there.  The product's own files (the AGI code, the prompts) come
# from the installed consent_gate package, so a wheel install is tested as installed.
PROJECT_DIR = Path(os.environ.get("CONSENT_GATE_PROJECT_DIR") or Path(__file__).resolve().parents[2])
TEMPLATES_DIR = Path(__file__).resolve().parent / "asterisk_etc"
DIALPLAN_DIR = PROJECT_DIR / "dialplan"
PROMPTS_SOUNDS_DIR = packaged_sounds_dir()
COMPOSE_FILE = PROJECT_DIR / "docker-compose.asterisk.yml"
# The systemd drop-in shipped for Asterisk: the sandbox starts Asterisk with its UMask.
ASTERISK_DROP_IN = PROJECT_DIR / "deploy" / "asterisk.service.d" / "consent-gate.conf"

SID_MIRROR = "http://deb.debian.org/debian"
# Bump ROOT_FORMAT when the package list changes: an older cached root is then rebuilt.
# python3 with asyncpg and structlog runs the AGI script inside the root (AGI programs are
# executed by Asterisk, so they live where Asterisk lives).
ROOT_PACKAGES = (
    "asterisk", "asterisk-core-sounds-en-wav", "python3", "python3-asyncpg", "python3-structlog", "python3-six",
)
ROOT_FORMAT = 4


__all__ = ["AsteriskSandbox", "SandboxError", "SandboxSettings"]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SandboxError(f"{name}={raw!r} is not a port number") from None


@dataclass(frozen=True)
class SandboxSettings:
    """Where and on which ports a sandbox runs.  Defaults stay away from 5060/8088/5038."""

    name: str = "default"
    provider: str = "auto"
    root_dir: Path = Path("/var/cache/consent-gate/sid-root")
    docker_state_dir: Path = PROJECT_DIR / ".run"
    sip_port: int = 25060
    http_port: int = 28088
    ami_port: int = 25038
    rtp_start: int = 26000
    rtp_end: int = 26399
    ari_app: str = "consent-gate"
    ari_user: str = "consent-gate"
    ami_user: str = "consent-gate"
    agi_command: str = ""
    # Where the sandbox dialplan's FastAGI extensions (350...) reach consent-gate-fastagi
    # (rig/consent_gate_rig/harness.py starts it there; Asterisk only connects to it).
    fastagi_port: int = 25073
    # asterisk.conf systemname ("" = none): the prefix of channel uniqueids, which nodes sharing
    # one ledger must each have their own of (consent_gate.ledger.cluster).
    system_name: str = ""
    # asterisk.conf entityid ("" = Asterisk's default, from a MAC address): what tells nodes
    # apart; sandboxes on one machine share the default, so the scale-out nodes get their own.
    entity_id: str = ""
    # Asterisk's umask; None: the UMask= of the shipped drop-in (what a deployed Asterisk gets).
    umask: int | None = None

    @classmethod
    def from_env(cls, **overrides: object) -> SandboxSettings:
        """Settings from CONSENT_GATE_SANDBOX_* variables, then explicit overrides."""
        values: dict[str, object] = {
            "name": os.environ.get("CONSENT_GATE_SANDBOX_NAME", cls.name),
            "provider": os.environ.get("CONSENT_GATE_SANDBOX_PROVIDER", cls.provider),
            "root_dir": Path(os.environ.get("CONSENT_GATE_SANDBOX_ROOT", str(cls.root_dir))),
            "sip_port": _env_int("CONSENT_GATE_SANDBOX_SIP_PORT", cls.sip_port),
            "http_port": _env_int("CONSENT_GATE_SANDBOX_HTTP_PORT", cls.http_port),
            "ami_port": _env_int("CONSENT_GATE_SANDBOX_AMI_PORT", cls.ami_port),
            "rtp_start": _env_int("CONSENT_GATE_SANDBOX_RTP_START", cls.rtp_start),
            "rtp_end": _env_int("CONSENT_GATE_SANDBOX_RTP_END", cls.rtp_end),
            "fastagi_port": _env_int("CONSENT_GATE_SANDBOX_FASTAGI_PORT", cls.fastagi_port),
        }
        values.update(overrides)
        settings = cls(**values)  # type: ignore[arg-type]
        if settings.provider not in ("auto", "chroot", "docker"):
            raise SandboxError(
                f"CONSENT_GATE_SANDBOX_PROVIDER={settings.provider!r}: use auto, chroot or docker"
            )
        if not settings.name.replace("-", "").isalnum():
            raise SandboxError(f"sandbox name {settings.name!r}: use letters, digits and '-'")
        return settings

    @property
    def inside_dir(self) -> PurePosixPath:
        return PurePosixPath("/srv/consent-gate") / self.name


@dataclass
class SandboxState:
    """What a running sandbox started, so teardown stops exactly that."""

    provider: str
    pid: int | None = None
    mounts: list[str] = field(default_factory=list)
    ari_password: str = ""
    ami_password: str = ""
    sip_password: str = ""
    # docker provider: the container it started (``docker inspect`` tells whether it still runs).
    container: str = ""


class Provider(Protocol):
    name: str

    def host_dir(self, settings: SandboxSettings) -> Path: ...
    def prepare(self) -> None: ...
    def start(self, settings: SandboxSettings, state: SandboxState, log_path: Path) -> None: ...
    def run_cli(self, settings: SandboxSettings, command: str, timeout: float) -> subprocess.CompletedProcess[str]: ...
    def stop(self, settings: SandboxSettings, state: SandboxState) -> None: ...
    def exited(self, state: SandboxState) -> str | None: ...


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def drop_in_umask(path: Path = ASTERISK_DROP_IN) -> int:
    """The UMask= that deploy/asterisk.service.d/consent-gate.conf gives Asterisk."""
    for line in path.read_text().splitlines():
        if line.startswith("UMask="):
            return int(line.removeprefix("UMask="), 8)
    raise SandboxError(f"{path}: no UMask= line")


def _run(cmd: list[str], *, timeout: float, what: str, env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except FileNotFoundError:
        raise SandboxError(f"{what}: {cmd[0]!r} is not installed") from None
    except subprocess.TimeoutExpired:
        raise SandboxError(f"{what}: {' '.join(cmd)} did not finish in {timeout:.0f} s") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        raise SandboxError(f"{what} failed (exit {done.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))
    return done.stdout


def _is_mounted(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


class ChrootProvider:
    """Debian sid root made by debootstrap, cached between runs."""

    name = "chroot"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.marker = root / ".consent-gate-root.json"

    def host_dir(self, settings: SandboxSettings) -> Path:
        return self.root / str(settings.inside_dir).lstrip("/")

    def _root_is_ready(self) -> bool:
        try:
            info = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return False
        if info.get("format") != ROOT_FORMAT:
            return False
        probe = subprocess.run(
            ["chroot", str(self.root), "asterisk", "-V"], capture_output=True, text=True, timeout=30
        )
        return probe.returncode == 0 and probe.stdout.startswith("Asterisk 22")

    def prepare(self) -> None:
        """Build the root once; later runs reuse it, a broken or outdated one is rebuilt."""
        if os.geteuid() != 0:
            raise SandboxError("the chroot provider needs root (debootstrap, chroot, mount)")
        with _locked(self.root.with_name(self.root.name + ".lock")):
            if self._root_is_ready():
                return
            self._build()

    def _build(self) -> None:
        if shutil.which("debootstrap") is None:
            raise SandboxError("debootstrap is not installed: apt-get install debootstrap")
        started = time.monotonic()
        fresh = self.root.with_name(self.root.name + ".new")
        self._unmount_all_under(fresh)
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.parent.mkdir(parents=True, exist_ok=True)
        print(f"sandbox: debootstrap sid into {fresh} ...", file=sys.stderr, flush=True)
        _run(["debootstrap", "--variant=minbase", "sid", str(fresh), SID_MIRROR], timeout=900, what="debootstrap")
        # The mirror's sid Release file can be past its Valid-Until date.
        (fresh / "etc/apt/apt.conf.d/99consent-gate").write_text(
            'Acquire::Check-Valid-Until "false";\nAPT::Install-Recommends "false";\n'
        )
        mounted = self._mount(fresh)
        try:
            _run(["chroot", str(fresh), "apt-get", "update", "-qq"], timeout=600, what="apt-get update in the root")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            _run(
                ["chroot", str(fresh), "apt-get", "install", "-y", "-qq", "--no-install-recommends", *ROOT_PACKAGES],
                timeout=1200, what="apt-get install asterisk in the root", env=env,
            )
            _run(["chroot", str(fresh), "apt-get", "clean"], timeout=120, what="apt-get clean")
        finally:
            self._unmount(mounted)
        version = _run(["chroot", str(fresh), "asterisk", "-V"], timeout=30, what="asterisk -V").strip()
        (fresh / ".consent-gate-root.json").write_text(
            json.dumps({"format": ROOT_FORMAT, "packages": ROOT_PACKAGES, "asterisk": version})
        )
        if self.root.exists():
            self._unmount_all_under(self.root)
            shutil.rmtree(self.root)
        fresh.rename(self.root)
        print(f"sandbox: root ready ({version}) in {time.monotonic() - started:.0f} s", file=sys.stderr)

    def _mount(self, root: Path) -> list[str]:
        made: list[str] = []
        for target, cmd in (
            (root / "proc", ["mount", "-t", "proc", "proc"]),
            (root / "dev", ["mount", "--bind", "/dev"]),
        ):
            if not _is_mounted(target):
                _run([*cmd, str(target)], timeout=30, what=f"mount {target}")
                made.append(str(target))
        return made

    @staticmethod
    def _unmount(targets: list[str]) -> None:
        for target in reversed(targets):
            if _is_mounted(Path(target)):
                if subprocess.run(["umount", target], capture_output=True).returncode != 0:
                    subprocess.run(["umount", "-l", target], capture_output=True)

    def _unmount_all_under(self, root: Path) -> None:
        if not root.exists():
            return
        prefix = str(root.resolve()) + "/"
        with open("/proc/self/mounts") as mounts:
            targets = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
        self._unmount(sorted(targets))

    def _asterisk_cmd(self, settings: SandboxSettings) -> list[str]:
        return ["chroot", str(self.root), "asterisk", "-C", str(settings.inside_dir / "etc/asterisk.conf")]

    def start(self, settings: SandboxSettings, state: SandboxState, log_path: Path) -> None:
        state.mounts = self._mount(self.root)
        umask = drop_in_umask() if settings.umask is None else settings.umask
        with open(log_path, "ab") as console_log:
            # As the drop-in (UMask=0077): recordings and logs are created 0600, not world-readable.
            process = subprocess.Popen(
                [*self._asterisk_cmd(settings), "-f"],
                stdin=subprocess.DEVNULL, stdout=console_log, stderr=subprocess.STDOUT,
                start_new_session=True, umask=umask,
            )
        state.pid = process.pid

    def run_cli(self, settings: SandboxSettings, command: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self._asterisk_cmd(settings), "-rx", command], capture_output=True, text=True, timeout=timeout
        )

    def exited(self, state: SandboxState) -> str | None:
        if state.pid is not None and not _pid_alive(state.pid):
            return f"Asterisk (pid {state.pid}) exited"
        return None

    def stop(self, settings: SandboxSettings, state: SandboxState) -> None:
        if state.pid is not None and _pid_alive(state.pid):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.run_cli(settings, "core stop now", timeout=10)
            _wait_pid_gone(state.pid, 10) or _kill_group(state.pid)
        self._unmount(state.mounts)
        state.mounts = []


class DockerProvider:
    """The stack's Asterisk image (docker-compose.asterisk.yml) with the sandbox's configuration."""

    name = "docker"

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def host_dir(self, settings: SandboxSettings) -> Path:
        return self.state_dir / settings.name

    def project(self, settings: SandboxSettings) -> str:
        return f"consent-gate-{settings.name}"

    def _compose(self, settings: SandboxSettings) -> tuple[list[str], dict[str, str]]:
        env = dict(
            os.environ,
            CONSENT_GATE_INSTANCE_HOST=str(self.host_dir(settings)),
            CONSENT_GATE_INSTANCE=str(settings.inside_dir),
            CONSENT_GATE_IMAGE_TAG=dockerimages.image_tag(),
            CONSENT_GATE_BASE_IMAGE=dockerimages.base_image(),
        )
        cmd = dockerimages.compose_command()
        return [*cmd, "-f", str(COMPOSE_FILE), "-p", self.project(settings)], env

    def prepare(self) -> None:
        """An engine, and the image: built once (from CONSENT_GATE_BASE_IMAGE), reused after."""
        dockerimages.require_engine("the docker provider")
        if not dockerimages.image_exists(dockerimages.asterisk_image()):
            _, env = self._compose(SandboxSettings())
            dockerimages.build_asterisk_image(PROJECT_DIR, COMPOSE_FILE, env)

    def start(self, settings: SandboxSettings, state: SandboxState, log_path: Path) -> None:
        cmd, env = self._compose(settings)
        _run([*cmd, "up", "-d", "--no-build", "--force-recreate", "asterisk"], timeout=300,
             what=f"docker compose up ({dockerimages.asterisk_image()})", env=env)
        state.container = _run([*cmd, "ps", "-q", "asterisk"], timeout=60, what="docker compose ps", env=env).strip()
        if not state.container:
            raise SandboxError(f"docker compose up started no asterisk container (project {self.project(settings)})")

    def exited(self, state: SandboxState) -> str | None:
        if not state.container:
            return None
        done = subprocess.run(["docker", "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", state.container],
                              capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            return f"the container {state.container[:12]} is gone"
        status, _, code = done.stdout.strip().partition(" ")
        if status in ("running", "created", "restarting"):
            return None
        logs = subprocess.run(["docker", "logs", "--tail", "30", state.container], capture_output=True,
                              text=True, timeout=30)
        return f"the container {state.container[:12]} is {status} (exit {code}):\n{(logs.stdout + logs.stderr).strip()}"

    def run_cli(self, settings: SandboxSettings, command: str, timeout: float) -> subprocess.CompletedProcess[str]:
        cmd, env = self._compose(settings)
        conf = str(settings.inside_dir / "etc/asterisk.conf")
        return subprocess.run(
            [*cmd, "exec", "-T", "asterisk", "asterisk", "-C", conf, "-rx", command],
            capture_output=True, text=True, timeout=timeout, env=env,
        )

    def stop(self, settings: SandboxSettings, state: SandboxState) -> None:
        """Remove the container, its network and volumes (the image stays for the next run)."""
        cmd, env = self._compose(settings)
        done = subprocess.run([*cmd, "down", "--timeout", "10", "--volumes", "--remove-orphans"],
                              capture_output=True, text=True, env=env, timeout=120)
        if done.returncode != 0:
            raise SandboxError(f"docker compose down (project {self.project(settings)}) failed: "
                               f"{(done.stderr or done.stdout).strip()}")
        state.container = ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours is not alive; reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.1)
    return not _pid_alive(pid)


def _kill_group(pid: int) -> bool:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        if _wait_pid_gone(pid, 5):
            return True
    return False


def docker_engine_available() -> bool:
    return dockerimages.engine_problem() is None


def pick_provider(settings: SandboxSettings) -> Provider:
    choice = settings.provider
    if choice == "auto":
        choice = "docker" if docker_engine_available() else "chroot"
    if choice == "docker":
        return DockerProvider(settings.docker_state_dir)
    return ChrootProvider(settings.root_dir)


def render_template(text: str, values: dict[str, str]) -> str:
    """Fill @@NAME@@ markers (Asterisk itself uses ${...}); an unknown marker is an error."""
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    if "@@" in text:
        start = text.index("@@")
        raise SandboxError(f"unfilled template marker near {text[start:start + 40]!r}")
    return text


class AsteriskSandbox:
    """One Asterisk instance: ``up()``, ``wait_booted()``, ``cli()``, ``down()``."""

    def __init__(self, settings: SandboxSettings | None = None) -> None:
        self.settings = settings or SandboxSettings.from_env()
        self.provider = pick_provider(self.settings)
        self.host_dir = self.provider.host_dir(self.settings)
        self.inside_dir = self.settings.inside_dir
        self.state_path = self.host_dir / "state.json"
        self.state = self._load_state()

    # -- paths -------------------------------------------------------------------------------
    def host_path(self, inside: PurePosixPath | str) -> Path:
        """Translate a path as Asterisk sees it into the host's view of the same file."""
        rel = PurePosixPath(inside).relative_to(self.inside_dir)
        return self.host_dir / rel

    @property
    def recordings_dir(self) -> Path:
        return self.host_dir / "recordings"

    @property
    def asterisk_user(self) -> str:
        """The uid Asterisk runs as (recordings.owner): the user who started the sandbox (root;
        the docker image's Asterisk is root too)."""
        return str(os.geteuid())

    @property
    def full_log(self) -> Path:
        return self.host_dir / "log" / "full"

    @property
    def ari_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.http_port}"

    @property
    def sip_domain(self) -> str:
        return f"127.0.0.1:{self.settings.sip_port}"

    def _load_state(self) -> SandboxState:
        try:
            return SandboxState(**json.loads(self.state_path.read_text()))
        except (OSError, ValueError, TypeError):
            return SandboxState(provider=self.provider.name)

    def _save_state(self) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.state)))
        os.chmod(tmp, 0o600)
        tmp.replace(self.state_path)

    # -- lifecycle ---------------------------------------------------------------------------
    def is_running(self) -> bool:
        if self.state.pid is not None:
            return _pid_alive(self.state.pid)
        if self.provider.name == "docker":
            if not self.state.container or self.provider.exited(self.state) is not None:
                return False
            return self.provider.run_cli(self.settings, "core show uptime", 20).returncode == 0
        return False

    def up(self, *, boot_timeout: float = 90.0) -> None:
        """Prepare the provider, render the configuration and start Asterisk, then wait for boot."""
        if self.is_running():
            self.install_files()
            self.wait_booted(boot_timeout)
            return
        self.check_ports_free()
        self.provider.prepare()
        for secret_name in ("ari_password", "ami_password", "sip_password"):
            if not getattr(self.state, secret_name):
                setattr(self.state, secret_name, secrets.token_hex(12))
        self.install_files()
        log_dir = self.host_dir / "log"
        self.full_log.unlink(missing_ok=True)
        self.provider.start(self.settings, self.state, log_dir / "console.log")
        self._save_state()
        self.wait_booted(boot_timeout)

    def check_ports_free(self) -> None:
        """Refuse to start on ports another process holds: Asterisk would start anyway, fail to
        bind, and our requests would reach the other PBX (e.g. a second sandbox: HTTP 401)."""
        wanted = (("CONSENT_GATE_SANDBOX_SIP_PORT", socket.SOCK_DGRAM, self.settings.sip_port),
                  ("CONSENT_GATE_SANDBOX_SIP_PORT", socket.SOCK_STREAM, self.settings.sip_port),
                  ("CONSENT_GATE_SANDBOX_HTTP_PORT", socket.SOCK_STREAM, self.settings.http_port),
                  ("CONSENT_GATE_SANDBOX_AMI_PORT", socket.SOCK_STREAM, self.settings.ami_port))
        for variable, kind, port in wanted:
            with socket.socket(socket.AF_INET, kind) as probe:
                if kind == socket.SOCK_STREAM:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError as error:
                    proto = "udp" if kind == socket.SOCK_DGRAM else "tcp"
                    raise SandboxError(
                        f"sandbox {self.settings.name!r}: 127.0.0.1:{port}/{proto} is in use ({error.strerror}); "
                        f"another sandbox or PBX holds it -- stop it (consent-gate-sandbox down, with its "
                        f"CONSENT_GATE_SANDBOX_NAME) or choose another port with {variable}") from None

    def install_files(self) -> None:
        """(Re)write config, dialplan and prompt audio into the instance directory."""
        host = self.host_dir
        for sub in ("etc", "lib", "lib/keys", "cache", "spool", "run", "log", "agi-bin", "sounds"):
            (host / sub).mkdir(parents=True, exist_ok=True)
        self.recordings_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.recordings_dir, 0o700)
        values = {
            "INSTANCE": str(self.inside_dir),
            "SIP_PORT": str(self.settings.sip_port),
            "SYSTEM_NAME": self.settings.system_name,
            "ENTITY_ID_LINE": f"entityid = {self.settings.entity_id}" if self.settings.entity_id else "",
            "HTTP_PORT": str(self.settings.http_port),
            "AMI_PORT": str(self.settings.ami_port),
            "RTP_START": str(self.settings.rtp_start),
            "RTP_END": str(self.settings.rtp_end),
            "ARI_APP": self.settings.ari_app,
            "ARI_USER": self.settings.ari_user,
            "ARI_PASSWORD": self.state.ari_password,
            "AMI_USER": self.settings.ami_user,
            "AMI_PASSWORD": self.state.ami_password,
            "SIP_PASSWORD": self.state.sip_password,
            "AGI_COMMAND": self.settings.agi_command or str(self.inside_dir / "agi-bin" / "consent-gate-agi"),
            "FASTAGI_URL": self.fastagi_url,
        }
        for template in sorted(TEMPLATES_DIR.glob("*.conf")):
            target = host / "etc" / template.name
            target.write_text(render_template(template.read_text(), values))
            os.chmod(target, 0o600)
        shutil.copytree(DIALPLAN_DIR, host / "dialplan", dirs_exist_ok=True)
        if PROMPTS_SOUNDS_DIR.is_dir():
            shutil.copytree(PROMPTS_SOUNDS_DIR, host / "sounds" / "consent-gate", dirs_exist_ok=True)
            shutil.copy2(PROMPTS_SOUNDS_DIR.parent / "manifest.json", host / "sounds" / "consent-gate" / "manifest.json")
        self._install_agi()

    def _install_agi(self) -> None:
        """The AGI script and the code it imports, where the Asterisk inside the root can run it."""
        import asterisk.agi  # pyst2: pure Python, copied beside our packages

        lib = self.host_dir / "agi-bin" / "lib"
        if lib.exists():
            shutil.rmtree(lib)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.wav")
        # The installed product (editable checkout or wheel), as Asterisk's Python will import it.
        shutil.copytree(Path(consent_gate.__file__).parent, lib / "consent_gate", ignore=ignore)
        shutil.copytree(Path(asterisk.agi.__file__).parent, lib / "asterisk", ignore=ignore)
        launcher = self.host_dir / "agi-bin" / "consent-gate-agi"
        inside = self.inside_dir
        launcher.write_text(
            "#!/usr/bin/python3\n"
            "# consent-gate AGI launcher written by the sandbox.\n"
            "import sys\n"
            f"sys.path.insert(0, {str(inside / 'agi-bin' / 'lib')!r})\n"
            "from consent_gate.agi.script import main\n"
            f"sys.exit(main(sys.argv[1:2] + ['--config', {str(inside / 'etc' / 'consent-gate.toml')!r}]))\n"
        )
        os.chmod(launcher, 0o755)

    def write_gate_config(self, dsn: str, hmac_key: str, extra: str = "") -> Path:
        """Settings for the AGI script (as Asterisk sees paths); the key goes to a 0600 file."""
        inside = self.inside_dir
        key_file = self.host_dir / "etc" / "hmac.key"
        key_file.write_text(hmac_key)
        os.chmod(key_file, 0o600)
        config = self.host_dir / "etc" / "consent-gate.toml"
        config.write_text(
            "# Written by the consent-gate sandbox for the AGI script.\n"
            f"[ledger]\ndsn = {dsn!r}\njournal_dir = {str(inside / 'journal')!r}\n\n"
            f"[privacy]\nhmac_key_file = {str(inside / 'etc' / 'hmac.key')!r}\n\n"
            f"[recordings]\ndir = {str(inside / 'recordings')!r}\nowner = {self.asterisk_user!r}\n\n"
            f"[prompts]\ndir = {str(inside / 'sounds' / 'consent-gate')!r}\n"
            f"asterisk_dir = {str(inside / 'sounds' / 'consent-gate')!r}\n" + extra
        )
        os.chmod(config, 0o600)
        return config

    def wait_booted(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            gone = self.provider.exited(self.state)
            if gone is not None:
                raise SandboxError(f"{gone} during start; see {self.host_dir / 'log'}\n{self.console_tail()}")
            try:
                probe = self.provider.run_cli(self.settings, "core waitfullybooted", timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
            if probe.returncode == 0 and "fully booted" in probe.stdout.lower():
                return
            last = (probe.stderr or probe.stdout).strip()
            time.sleep(0.2)
        raise SandboxError(f"Asterisk did not finish booting in {timeout:.0f} s ({last})\n{self.console_tail()}")

    def console_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.host_dir / "log" / "console.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def fastagi_url(self) -> str:
        """CONSENT_GATE_AGI for the FastAGI path: the server on loopback, path consent-gate."""
        return f"agi://127.0.0.1:{self.settings.fastagi_port}/consent-gate"

    def cli(self, command: str, timeout: float = 20.0) -> str:
        done = self.provider.run_cli(self.settings, command, timeout)
        if done.returncode != 0:
            raise SandboxError(f"asterisk -rx {command!r} failed: {(done.stderr or done.stdout).strip()}")
        return done.stdout

    def reload_dialplan(self) -> None:
        self.install_files()
        self.cli("dialplan reload")

    def down(self) -> None:
        try:
            self.provider.stop(self.settings, self.state)
        finally:
            self.state.pid = None
            self._save_state()

    def env(self) -> dict[str, str]:
        """What a client (the ARI app, a softphone, the demo) needs to reach this sandbox."""
        return {
            "CONSENT_GATE_ARI_URL": self.ari_url,
            "CONSENT_GATE_ARI_USER": self.settings.ari_user,
            "CONSENT_GATE_ARI_PASSWORD": self.state.ari_password,
            "CONSENT_GATE_ARI_APP": self.settings.ari_app,
            "CONSENT_GATE_AMI_HOST": "127.0.0.1",
            "CONSENT_GATE_AMI_PORT": str(self.settings.ami_port),
            "CONSENT_GATE_AMI_USER": self.settings.ami_user,
            "CONSENT_GATE_AMI_SECRET": self.state.ami_password,
            "CONSENT_GATE_SIP_DOMAIN": self.sip_domain,
            "CONSENT_GATE_SIP_PASSWORD": self.state.sip_password,
            "CONSENT_GATE_RECORDINGS_DIR": str(self.recordings_dir),
            "CONSENT_GATE_RECORDINGS_OWNER": self.asterisk_user,
            "CONSENT_GATE_ASTERISK_SOUNDS_DIR": str(self.inside_dir / "sounds" / "consent-gate"),
            "CONSENT_GATE_SANDBOX_DIR": str(self.host_dir),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="consent-gate-sandbox",
        description="Start, inspect and stop the project's Asterisk 22 sandbox (chroot or docker provider). "
        "Settings come from CONSENT_GATE_SANDBOX_* environment variables (PROVIDER=auto|chroot|docker, "
        "ROOT, NAME, SIP_PORT, HTTP_PORT, AMI_PORT, RTP_START, RTP_END, FASTAGI_PORT).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="build/reuse the provider, write config, start Asterisk, wait until booted")
    sub.add_parser("prepare", help="build/reuse the provider only (the chroot root, or the docker image)")
    base = sub.add_parser("base-image", help="import the cached sid root (built if missing) into Docker as the "
                          f"base image for hosts without a registry (default {dockerimages.IMPORTED_BASE_IMAGE})")
    base.add_argument("--tag", default=dockerimages.IMPORTED_BASE_IMAGE)
    sub.add_parser("down", help="stop the Asterisk this sandbox started and remove its mounts")
    sub.add_parser("status", help="print provider, pid and whether Asterisk runs")
    sub.add_parser("wait-booted", help="wait until Asterisk is fully booted")
    sub.add_parser("env", help="print shell exports for clients (ARI URL and password, SIP domain, ...)")
    cli_parser = sub.add_parser("cli", help="run one Asterisk CLI command, e.g. 'pjsip show endpoints'")
    cli_parser.add_argument("cli_command")
    args = parser.parse_args(argv)
    try:
        sandbox = AsteriskSandbox()
        match args.command:
            case "up":
                sandbox.up()
                print(f"Asterisk is up ({sandbox.provider.name}): SIP {sandbox.sip_domain}, ARI {sandbox.ari_url}")
            case "down":
                sandbox.down()
            case "prepare":
                sandbox.provider.prepare()
                print(f"provider {sandbox.provider.name} is ready")
            case "base-image":
                root = ChrootProvider(sandbox.settings.root_dir)
                root.prepare()
                started = time.monotonic()
                tag = dockerimages.import_base(root.root, args.tag)
                print(f"imported {root.root} as {tag} in {time.monotonic() - started:.0f} s")
            case "status":
                print(json.dumps({"provider": sandbox.provider.name, "pid": sandbox.state.pid,
                                  "running": sandbox.is_running(), "dir": str(sandbox.host_dir)}))
            case "wait-booted":
                sandbox.wait_booted()
            case "env":
                for key, value in sandbox.env().items():
                    print(f"export {key}={value}")
            case "cli":
                print(sandbox.cli(args.cli_command), end="")
    except SandboxError as error:
        print(f"consent-gate-sandbox: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

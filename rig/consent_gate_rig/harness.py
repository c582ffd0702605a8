"""Pieces the integration tests and the demo share: the ARI service as a real process, and a
reader for Asterisk's log that waits for lines with a bound.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from .sandbox import AsteriskSandbox

# The purpose catalogue the sandbox service runs with: the shipped defaults plus a purpose
# recorded by law (MiFID II securities orders) for the legal-obligation tests.
SANDBOX_PURPOSES = """
[purposes.training]
legal_basis = "consent"
prompt = "question-training"
retention_days = 90
training_copy = true

[purposes.documentation]
legal_basis = "consent"
prompt = "question-documentation"
retention_days = 365

[purposes.securities]
legal_basis = "legal-obligation"
prompt = "notice-legal-obligation"
retention_days = 1825
"""

RESULT_LINE = re.compile(
    r"consent-result: test=(?P<tag>[A-Za-z0-9-]*) status=(?P<status>[a-z-]*) "
    r"id=(?P<consent_id>[0-9a-f-]*) recording=(?P<recording_id>[0-9a-f]*)"
)


@dataclass(frozen=True)
class GateResult:
    """What the dialplan saw after the gate returned (from the sandbox's test-report line)."""

    tag: str
    status: str
    consent_id: str
    recording_id: str


class AsteriskLog:
    """Reads Asterisk's 'full' log from a start offset; waits for patterns with a deadline."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def text(self) -> str:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                return handle.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    async def wait_for(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.text())
            if match:
                return match
            if time.monotonic() > deadline:
                raise TimeoutError(f"{regex.pattern!r} not in {self.path} within {timeout:.0f} s")
            await asyncio.sleep(0.05)

    async def gate_result(self, tag: str, timeout: float) -> GateResult:
        match = await self.wait_for(
            re.compile(RESULT_LINE.pattern.replace("(?P<tag>[A-Za-z0-9-]*)", f"(?P<tag>{re.escape(tag)})")),
            timeout,
        )
        return GateResult(**match.groupdict())


class ServiceProcess:
    """A service of ours as a real child process: started with its log file, stopped by
    SIGTERM (SIGKILL after ``timeout``), its log readable."""

    process: subprocess.Popen[bytes] | None
    stop_timeout: float = 10.0

    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    @staticmethod
    def _config(given: Path | None, work_dir: Path) -> Path:
        """The settings file: the one given, else one with the sandbox's purposes."""
        if given is not None:
            return given
        config = work_dir / "consent-gate.toml"
        config.write_text(SANDBOX_PURPOSES)
        return config

    def _spawn(self, args: list[str], env: dict[str, str]) -> None:
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(args, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def stop(self, *, kill: bool = False, timeout: float | None = None) -> int | None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        deadline = time.monotonic() + (self.stop_timeout if timeout is None else timeout)
        while process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if process.poll() is None:
            process.kill()
            process.wait(5)
        return process.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


# One deployment, one pseudonym key: every service this process starts shares it by default, as
# the nodes of one ledger must (--check-config compares it with the ledger's, issue 15).
SESSION_HMAC_KEY = secrets.token_hex(16)


@dataclass
class GateService(ServiceProcess):
    """The consent-gate ARI service as a real child process (what systemd would run)."""

    sandbox: AsteriskSandbox
    dsn: str
    work_dir: Path
    hmac_key: str = SESSION_HMAC_KEY
    extra_env: dict[str, str] = field(default_factory=dict)
    config_path: Path | None = None
    # The service command before "--config FILE"; default: this Python's consent_gate.ari.main.
    # The wheel-install test runs the installed /opt/.../bin/consent-gate-ari instead.
    command: list[str] | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.work_dir / "consent-gate-ari.log"

    @property
    def journal_dir(self) -> Path:
        return self.work_dir / "journal"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.sandbox.env())
        env.update(
            CONSENT_GATE_DSN=self.dsn,
            CONSENT_GATE_HMAC_KEY=self.hmac_key,
            CONSENT_GATE_JOURNAL_DIR=str(self.journal_dir),
        )
        env.update(self.extra_env)
        return env

    async def start(self, timeout: float = 20.0) -> None:
        if self.running:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        # The AGI script (run by Asterisk) shares the ledger, the purposes and the pseudonym key.
        self.sandbox.write_gate_config(self.dsn, self.hmac_key, SANDBOX_PURPOSES)
        self._spawn([*(self.command or [sys.executable, "-m", "consent_gate.ari.main"]),
                     "--config", str(self._config(self.config_path, self.work_dir))], self.env())
        await self.wait_registered(timeout)

    async def wait_registered(self, timeout: float) -> None:
        """Until Asterisk lists our ARI application (the websocket is connected)."""
        env = self.sandbox.env()
        url = f"{env['CONSENT_GATE_ARI_URL']}/ari/applications/{env['CONSENT_GATE_ARI_APP']}"
        token = base64.b64encode(f"{env['CONSENT_GATE_ARI_USER']}:{env['CONSENT_GATE_ARI_PASSWORD']}".encode())
        headers = {"Authorization": "Basic " + token.decode()}
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"consent-gate-ari exited ({self.process.returncode}):\n{self.log_tail()}")
                try:
                    async with session.get(url, headers=headers) as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError(f"consent-gate-ari did not register with ARI in {timeout:.0f} s:\n{self.log_tail()}")



@dataclass
class FastAgiService(ServiceProcess):
    """consent-gate-fastagi as a real child process (what systemd would run), beside the ARI
    service: the same ledger, purposes and pseudonym key, its own journal, listening where the
    sandbox dialplan's FastAGI extensions (350...) connect (the sandbox's fastagi_port)."""

    gate: GateService
    extra_env: dict[str, str] = field(default_factory=dict)
    command: list[str] | None = None  # default: this Python's consent_gate.agi.fastagi
    process: subprocess.Popen[bytes] | None = None
    stop_timeout: float = 15.0  # it lets the sessions in flight finish (10 s) first

    @property
    def work_dir(self) -> Path:
        return self.gate.work_dir / "fastagi"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "consent-gate-fastagi.log"

    @property
    def journal_dir(self) -> Path:
        return self.work_dir / "journal"

    @property
    def port(self) -> int:
        return self.gate.sandbox.settings.fastagi_port

    def env(self) -> dict[str, str]:
        env = self.gate.env()
        env.update(CONSENT_GATE_JOURNAL_DIR=str(self.journal_dir),
                   CONSENT_GATE_FASTAGI_LISTEN=f"127.0.0.1:{self.port}")
        env.update(self.extra_env)
        return env

    async def start(self, timeout: float = 20.0) -> None:
        if self.running:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._spawn([*(self.command or [sys.executable, "-m", "consent_gate.agi.fastagi"]),
                     "--config", str(self._config(self.gate.config_path, self.work_dir))], self.env())
        await self.wait_listening(timeout)

    async def wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"consent-gate-fastagi exited ({self.process.returncode}):\n{self.log_tail()}")
            if "consent_gate.fastagi_started" in self.log_text():
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"consent-gate-fastagi did not listen in {timeout:.0f} s:\n{self.log_tail()}")


def run_ari_command(env: dict[str, str], *args: str, **changes: str) -> tuple[int, str]:
    """consent-gate-ari as systemd runs it (a process of its own, e.g. ``--check-config``): its
    exit code and its output (stdout then stderr)."""
    done = subprocess.run([sys.executable, "-m", "consent_gate.ari.main", "--log-format", "console", *args],
                          env={**env, **changes}, capture_output=True, text=True, timeout=60, check=False)
    return done.returncode, done.stdout + done.stderr


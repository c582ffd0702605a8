"""Shared pieces of the load benchmark and the soak: the rig, SIPp, /proc readings, log parsing.

Everything runs on this machine against 127.0.0.1 only; every SIPp run is bounded in calls and
in time.  Nothing here asserts timings: the scripts print figures and write JSON.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

SCENARIO = Path(__file__).resolve().parent / "caller.xml"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The gates measured side by side: extension in the sandbox dialplan.  "fastagi" is the AGI gate
# through consent-gate-fastagi (the same [consent-gate-agi], CONSENT_GATE_AGI an agi:// URL).
# "refwrap" (401) is the reference inside the same AGI-mode dialplan wrapper as 300/350 (an
# experiment: what the wrapper costs Asterisk, apart from the AGI call).
GATES = {"ari": "200", "agi": "300", "fastagi": "350", "ref": "400", "refwrap": "401"}


# -- /proc ---------------------------------------------------------------------------------

def proc_cpu(pid: int) -> tuple[float, float]:
    """(own CPU s, CPU s of reaped children) of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (3rd field of stat): utime is field 14 -> index 11.
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) / CLK_TCK, (cutime + cstime) / CLK_TCK


def system_cpu() -> tuple[float, float]:
    """(busy s, total s) of the whole machine, from /proc/stat: how much else was running."""
    with open("/proc/stat") as handle:
        values = [int(x) for x in handle.readline().split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


def children(pid: int) -> list[int]:
    """Live children of every thread of the process (Asterisk forks AGI scripts from call threads)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                out += [int(x) for x in handle.read().split()]
        except OSError:
            pass
    return out


def tree_cpu(pid: int) -> float:
    """CPU s of a process, its reaped children and its live children (e.g. postgres backends)."""
    own, reaped = proc_cpu(pid)
    live = 0.0
    for child in children(pid):
        try:
            live += sum(proc_cpu(child))
        except OSError:
            pass
    return own + reaped + live


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


# -- the rig ---------------------------------------------------------------------------------

@dataclass
class Rig:
    """Asterisk sandbox + throwaway PostgreSQL + the ARI service and the FastAGI server as real
    processes."""

    work_dir: Path
    pg_port: int
    extra_env: dict[str, str] = field(default_factory=dict)
    started_asterisk: bool = False  # set by start(): stop() takes down only what start() brought up

    async def start(self) -> None:
        from consent_gate.ledger.store import migrate
        from consent_gate_rig.harness import FastAgiService, GateService
        from consent_gate_rig.pgsandbox import PgSandbox
        from consent_gate_rig.sandbox import AsteriskSandbox, SandboxSettings

        self.asterisk = AsteriskSandbox(SandboxSettings.from_env())
        # A sandbox that was already up (e.g. a developer's) stays up; one we start, we stop.
        self.started_asterisk = not self.asterisk.is_running()
        self.asterisk.up()
        self.asterisk.reload_dialplan()
        # Not under /tmp/pytest-*: its directories are 0700 root, postgres must enter.
        self.pg_base = Path(tempfile.mkdtemp(prefix="consent-gate-bench-pg-"))
        self.pg = PgSandbox(self.pg_base, port=self.pg_port)
        self.pg.start()
        await migrate(self.pg.dsn)
        self.gate = GateService(self.asterisk, self.pg.dsn, self.work_dir / "gate", extra_env=self.extra_env)
        await self.gate.start()
        self.fastagi = FastAgiService(self.gate, extra_env=self.extra_env)
        await self.fastagi.start()

    async def stop(self) -> None:
        await self.fastagi.stop()
        await self.gate.stop()
        self.pg.destroy()
        shutil.rmtree(self.pg_base, ignore_errors=True)
        if self.started_asterisk:
            self.asterisk.down()

    @property
    def asterisk_pid(self) -> int:
        assert self.asterisk.state.pid is not None
        return self.asterisk.state.pid

    @property
    def gate_pid(self) -> int:
        assert self.gate.process is not None
        return self.gate.process.pid

    @property
    def fastagi_pid(self) -> int:
        assert self.fastagi.process is not None
        return self.fastagi.process.pid

    @property
    def postmaster_pid(self) -> int:
        return int((self.pg.data_dir / "postmaster.pid").read_text().split()[0])

    def cpu_snapshot(self) -> dict[str, float]:
        ast_own, ast_children = proc_cpu(self.asterisk_pid)
        return {
            "asterisk": ast_own,
            # AGI scripts are Asterisk's children: their CPU shows up once Asterisk reaps them.
            "agi_scripts": ast_children,
            "ari_app": sum(proc_cpu(self.gate_pid)),
            "fastagi_app": sum(proc_cpu(self.fastagi_pid)),
            "postgres": tree_cpu(self.postmaster_pid),
            "machine_busy": system_cpu()[0],
            "machine_total": system_cpu()[1],
        }

    def channels(self) -> int:
        out = self.asterisk.cli("core show channels count")
        match = re.search(r"(\d+) active channels?", out)
        return int(match.group(1)) if match else -1

    def recordings(self) -> set[str]:
        return {p.name for p in self.asterisk.recordings_dir.iterdir()}


# -- SIPp ------------------------------------------------------------------------------------

def caller_audio(path: Path, seconds: float = 10.0) -> Path:
    """Raw G.711 u-law the callers send (a quiet tone), looped by SIPp's rtp_stream."""
    if not path.exists():
        subprocess.run(["sox", "-n", "-r", "8000", "-c", "1", "-e", "u-law", "-t", "raw", str(path),
                        "synth", str(seconds), "sine", "300", "vol", "0.1"], check=True)
    return path


def render_scenario(out: Path, *, audio: Path, key_delay_ms: int, hold_limit_ms: int) -> Path:
    text = SCENARIO.read_text()
    for key, value in {"AUDIO": str(audio), "KEY_DELAY_MS": str(key_delay_ms),
                       "HOLD_LIMIT_MS": str(hold_limit_ms)}.items():
        text = text.replace("{{" + key + "}}", value)
    assert "{{" not in text
    out.write_text(text)
    return out


@dataclass
class SippResult:
    successful: int
    failed: int
    wall_s: float
    returncode: int


async def run_sipp(rig: Rig, *, scenario: Path, exten: str, tag: str, calls: int, concurrency: int,
                   work_dir: Path, sip_port: int, media_port: int, timeout_s: float) -> SippResult:
    """One bounded SIPp run: ``calls`` calls, at most ``concurrency`` at once, ended after ``timeout_s``."""
    work_dir.mkdir(parents=True, exist_ok=True)
    for old in work_dir.glob("*.csv"):
        old.unlink()
    settings = rig.asterisk.settings
    rate = max(1, concurrency)
    cmd = [
        "sipp", f"127.0.0.1:{settings.sip_port}", "-sf", str(scenario),
        "-key", "exten", exten, "-key", "tag", tag,
        "-au", "caller-info", "-ap", rig.asterisk.state.sip_password,
        "-i", "127.0.0.1", "-mi", "127.0.0.1", "-p", str(sip_port), "-mp", str(media_port),
        "-m", str(calls), "-l", str(concurrency), "-r", str(rate), "-rp", "2000",
        "-timeout", f"{int(timeout_s)}s", "-nostdin", "-trace_stat", "-fd", "1", "-trace_err",
    ]
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(*cmd, cwd=work_dir, stdout=asyncio.subprocess.DEVNULL,
                                                   stderr=asyncio.subprocess.DEVNULL)
    try:
        await asyncio.wait_for(process.wait(), timeout_s + 30)
    except TimeoutError:
        process.kill()
        await process.wait()
    wall = time.monotonic() - started
    successful = failed = 0
    for csv in work_dir.glob("*.csv"):
        lines = [line for line in csv.read_text().splitlines() if line.strip()]
        header = lines[0].split(";")
        last = lines[-1].split(";")
        row = dict(zip(header, last))
        successful = int(row.get("SuccessfulCall(C)", 0) or 0)
        failed = int(row.get("FailedCall(C)", 0) or 0)
    return SippResult(successful, failed, wall, process.returncode or 0)


# -- Asterisk's full log ----------------------------------------------------------------------

TS = r"\[(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\]"
LINE = re.compile(TS + r" (?P<level>[A-Z]+)\[\d+\](?:\[(?P<cid>C-[0-9a-f]+)\])? (?P<msg>.*)")
RESULT = re.compile(r"consent-result: test=(?P<tag>[A-Za-z0-9-]*) status=(?P<status>[a-z-]*)")
TRANSMIT = re.compile(r"<--- Transmitting SIP response .*--->")
RECEIVE = re.compile(r"<--- Received SIP request .*--->")


def _ts(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").timestamp()


@dataclass
class CallTimes:
    tag: str = ""
    status: str = ""
    answered: float | None = None  # 200 OK to the INVITE transmitted (pjsip logger)
    prompt: float | None = None    # Playing '.../question-training'
    dtmf: float | None = None      # DTMF end '1' received
    mixmonitor: float | None = None  # Begin MixMonitor Recording


def parse_log(text: str, tag_prefix: str) -> dict[str, CallTimes]:
    """Per call (by X-Test-Call tag) the timestamps the latencies are computed from.

    Channel lines carry Asterisk's call id ([C-...]); the consent-result line ties that to the
    tag.  The answer time is the pjsip logger's "Transmitting" of the INVITE's 200 OK, tied to
    the tag through the SIP Call-ID of the INVITE that carried X-Test-Call.
    """
    by_cid: dict[str, CallTimes] = {}
    sip_call_tag: dict[str, str] = {}
    answered_by_sip_call: dict[str, float] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = LINE.match(lines[i])
        i += 1
        if not match:
            continue
        msg, cid = match.group("msg"), match.group("cid")
        if TRANSMIT.search(msg) or RECEIVE.search(msg):
            block = []
            while i < len(lines) and lines[i].strip() and not LINE.match(lines[i]):
                block.append(lines[i].strip())
                i += 1
            headers = {}
            for row in block[1:]:
                name, _, value = row.partition(":")
                headers.setdefault(name.strip().lower(), value.strip())
            call_id = headers.get("call-id", "")
            if RECEIVE.search(msg) and block and block[0].startswith("INVITE"):
                tag = headers.get("x-test-call", "")
                if tag.startswith(tag_prefix):
                    sip_call_tag[call_id] = tag
            elif block and block[0].startswith("SIP/2.0 200") and headers.get("cseq", "").endswith("INVITE"):
                answered_by_sip_call.setdefault(call_id, _ts(match.group("ts")))
            continue
        if not cid:
            continue
        times = by_cid.setdefault(cid, CallTimes())
        ts = _ts(match.group("ts"))
        if "Playing '" in msg and "/question-training." in msg and times.prompt is None:
            times.prompt = ts
        elif "DTMF end '1' received" in msg and times.dtmf is None:
            times.dtmf = ts
        elif "Begin MixMonitor Recording" in msg and times.mixmonitor is None:
            times.mixmonitor = ts
        elif (result := RESULT.search(msg)) and result.group("tag").startswith(tag_prefix):
            times.tag, times.status = result.group("tag"), result.group("status")
    by_tag = {t.tag: t for t in by_cid.values() if t.tag}
    for call_id, tag in sip_call_tag.items():
        if tag in by_tag and call_id in answered_by_sip_call:
            by_tag[tag].answered = answered_by_sip_call[call_id]
    return by_tag


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        # nearest-rank percentile
        rank = max(1, int(-(-q * len(ordered) // 1)))
        return ordered[min(len(ordered), rank) - 1]

    return {"n": len(ordered), "p50": round(statistics.median(ordered), 1), "p99": round(pick(0.99), 1),
            "max": round(ordered[-1], 1)}


def latencies(calls: dict[str, CallTimes]) -> dict[str, dict[str, float | int | None]]:
    answer_prompt = [(c.prompt - c.answered) * 1000 for c in calls.values() if c.prompt and c.answered]
    key_record = [(c.mixmonitor - c.dtmf) * 1000 for c in calls.values() if c.mixmonitor and c.dtmf]
    return {"answer_to_prompt_ms": percentiles(answer_prompt), "key_to_mixmonitor_ms": percentiles(key_record)}

#!/usr/bin/env python3
"""Soak: the ARI gate under steady load for a long time; are resources flat at the end?

    python3 bench/soak/soak.py --minutes 30 --concurrency 10 --out bench/soak/result.json

SIPp keeps ``--concurrency`` consenting SIP callers in the ARI gate (extension 200; the same
caller as bench/load) for ``--minutes``.  Every ``--sample`` seconds it records the service's
RSS, open files, threads and asyncio tasks (from its Prometheus endpoint), and Asterisk's
channels and RSS.  After the load stops and the calls drain it compares the end with the start:
RSS growth over the second half, open files, tasks and channels back at their idle values.

Run by hand (it takes as long as you ask); it prints a verdict and writes JSON, never asserts
timing.  Bounded: SIPp stops after ``--minutes`` and a fixed number of calls, whichever first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

import aiohttp

from consent_gate_rig import loadlib


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def scrape(port: int) -> dict[str, float]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            text = await response.text()
    out: dict[str, float] = {}
    for name in ("consent_gate_asyncio_tasks", "consent_gate_active_dialogs", "consent_gate_active_watches",
                 "process_open_fds", "process_resident_memory_bytes", "consent_gate_journal_backlog_events"):
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        if match:
            out[name] = float(match.group(1))
    granted = sum(float(m.group(1)) for m in re.finditer(
        r'^consent_gate_decisions_total\{[^}]*status="granted"[^}]*\} (\S+)$', text, re.M))
    out["granted_total"] = granted
    return out


async def sample(rig: loadlib.Rig, port: int, started: float) -> dict[str, float]:
    metrics = await scrape(port)
    return {
        "t_s": round(time.monotonic() - started, 1),
        "ari_rss_kib": loadlib.rss_kib(rig.gate_pid),
        "ari_open_files": loadlib.open_files(rig.gate_pid),
        "ari_threads": loadlib.threads(rig.gate_pid),
        "asyncio_tasks": metrics.get("consent_gate_asyncio_tasks", -1),
        "active_dialogs": metrics.get("consent_gate_active_dialogs", -1),
        "active_watches": metrics.get("consent_gate_active_watches", -1),
        "granted_total": metrics.get("granted_total", 0),
        "asterisk_channels": await asyncio.to_thread(rig.channels),
        "asterisk_rss_kib": loadlib.rss_kib(rig.asterisk_pid),
        "asterisk_open_files": loadlib.open_files(rig.asterisk_pid),
    }


async def main_async(args: argparse.Namespace) -> int:
    port = free_port()
    extra = {"CONSENT_GATE_METRICS_PORT": str(port)}
    if args.tracemalloc:
        extra["CONSENT_GATE_TRACEMALLOC"] = "1"
    rig = loadlib.Rig(args.work_dir, args.pg_port, extra_env=extra)
    await rig.start()
    samples: list[dict] = []
    try:
        audio = loadlib.caller_audio(args.work_dir / "caller.ulaw")
        scenario = loadlib.render_scenario(args.work_dir / "caller.xml", audio=audio, key_delay_ms=2000,
                                           hold_limit_ms=32000)
        started = time.monotonic()
        idle = await sample(rig, port, started)
        print("idle:", idle, flush=True)
        before_files = rig.recordings()
        seconds = args.minutes * 60
        # Upper bound on calls: every slot busy, a call at least 9 s long.
        calls = int(args.concurrency * seconds / 9) + args.concurrency
        sipp = asyncio.create_task(loadlib.run_sipp(
            rig, scenario=scenario, exten="200", tag=f"soak{int(time.time())}", calls=calls,
            concurrency=args.concurrency, work_dir=args.work_dir / "sipp", sip_port=31990, media_port=31000,
            timeout_s=seconds))
        while not sipp.done():
            await asyncio.wait({sipp}, timeout=args.sample)
            row = await sample(rig, port, started)
            samples.append(row)
            print(row, flush=True)
            # Recordings are not what is soaked: keep the disk flat.
            for name in rig.recordings() - before_files:
                path = rig.asterisk.recordings_dir / name
                if time.time() - path.stat().st_mtime > 30:
                    path.unlink(missing_ok=True)
        result = sipp.result()
        # Drain: calls end within the hold limit; then the service and Asterisk must be idle again.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            end = await sample(rig, port, started)
            if end["asterisk_channels"] == 0 and end["active_dialogs"] == 0 and end["active_watches"] == 0:
                break
            await asyncio.sleep(1)
        await asyncio.sleep(3)  # reapers and websocket bookkeeping settle
        end = await sample(rig, port, started)
        print("end:", end, flush=True)
        memory = None
        if args.tracemalloc:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/debug/memory") as response:
                    memory = await response.text()
            print(memory, flush=True)
        for name in rig.recordings() - before_files:
            (rig.asterisk.recordings_dir / name).unlink(missing_ok=True)
    finally:
        await rig.stop()

    loaded = [s for s in samples if s["asterisk_channels"] > 0]
    half = loaded[len(loaded) // 2:] if loaded else []
    rss_growth = (half[-1]["ari_rss_kib"] - half[0]["ari_rss_kib"]) if len(half) > 1 else None
    verdict = {
        "calls_successful": result.successful, "calls_failed": result.failed,
        "granted_total": end["granted_total"], "minutes": args.minutes, "concurrency": args.concurrency,
        "ari_rss_kib": {"idle": idle["ari_rss_kib"], "max": max((s["ari_rss_kib"] for s in samples), default=None),
                        "second_half_growth": rss_growth, "end": end["ari_rss_kib"]},
        "ari_open_files": {"idle": idle["ari_open_files"], "max": max((s["ari_open_files"] for s in samples),
                                                                      default=None), "end": end["ari_open_files"]},
        "asyncio_tasks": {"idle": idle["asyncio_tasks"], "max": max((s["asyncio_tasks"] for s in samples),
                                                                    default=None), "end": end["asyncio_tasks"]},
        "asterisk_channels": {"max": max((s["asterisk_channels"] for s in samples), default=None),
                              "end": end["asterisk_channels"]},
        "asterisk_rss_kib": {"idle": idle["asterisk_rss_kib"], "end": end["asterisk_rss_kib"]},
        "flat": end["asterisk_channels"] == 0 and end["asyncio_tasks"] <= idle["asyncio_tasks"] + 2
        and end["ari_open_files"] <= idle["ari_open_files"] + 2,
    }
    print(json.dumps(verdict, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                                    "verdict": verdict, "idle": idle, "end": end, "samples": samples,
                                    **({"tracemalloc_top": memory.splitlines()} if memory else {})},
                                   indent=2) + "\n")
    return 0 if verdict["flat"] else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--sample", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="run the service with tracemalloc and save its top allocation growth at the end")
    parser.add_argument("--pg-port", type=int, default=int(os.environ.get("CONSENT_GATE_TEST_PG_PORT", "26132")))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/consent-gate-soak"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "result.json")
    args = parser.parse_args()
    if args.minutes > 240 or args.concurrency > 60:
        parser.error("bounded by design: at most 240 minutes and 60 calls at once")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Load benchmark: the ARI gate, the AGI gate (script and FastAGI) and a pure-dialplan reference, side by side.

    . as root, from the project directory, with the sandbox's CONSENT_GATE_SANDBOX_* ports set:
    python3 bench/load/run.py --levels 1,10,30,50 --out bench/load/results.json

For every concurrency level and every gate (interleaved, so all gates see the same machine),
SIPp places real SIP calls (digest auth, G.711 RTP from the caller, the consent key as SIP INFO)
against the real Asterisk 22 sandbox: a consenting caller per call.  Reported per run:

* calls/s completed (a call counts when the gate reported ``granted`` for it and SIPp ended it
  normally) and failed calls;
* CPU seconds per call from /proc: Asterisk itself, our process (the ARI service; for AGI the
  scripts, which are Asterisk's reaped children; for FastAGI the consent-gate-fastagi server)
  and PostgreSQL, each separately;
* answer → question-prompt start and keypress → MixMonitor start, p50/p99, from Asterisk's full
  log (pjsip logger for the 200 OK, "Playing '.../question-training'", "DTMF end '1'",
  "Begin MixMonitor Recording");
* the ARI service's and the FastAGI server's RSS (and the AGI scripts' peak total RSS).

Each level is one round; repeat a level for repeats (``--levels 20,20,20``).  Within a round the
gates run one after the other, their order rotating from round to round, and the summary gives
per gate and level the median and the range over the rounds (CPU per call, and its ratio to the
reference of the same round).

The benchmark prints figures and writes JSON; it asserts nothing about timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path

from consent_gate_rig import loadlib
from consent_gate_rig.loadlib import GATES, Rig

DEFAULT_OUT = Path(__file__).resolve().parent / "results.json"


async def sample_memory(rig: Rig, stop: asyncio.Event, out: dict[str, int]) -> None:
    """Peak RSS of the ARI service, and of all running AGI scripts together, every 200 ms."""
    while not stop.is_set():
        out["ari_rss_kib_max"] = max(out.get("ari_rss_kib_max", 0), loadlib.rss_kib(rig.gate_pid))
        out["fastagi_rss_kib_max"] = max(out.get("fastagi_rss_kib_max", 0), loadlib.rss_kib(rig.fastagi_pid))
        scripts = [pid for pid in loadlib.children(rig.asterisk_pid)]
        total = sum(loadlib.rss_kib(pid) for pid in scripts)
        out["agi_rss_kib_max"] = max(out.get("agi_rss_kib_max", 0), total)
        out["agi_procs_max"] = max(out.get("agi_procs_max", 0), len(scripts))
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except TimeoutError:
            pass


async def wait_idle(rig: Rig, timeout: float = 60.0) -> int:
    """Until Asterisk has no channels left (the previous run drained); returns what is left."""
    deadline = time.monotonic() + timeout
    while True:
        left = await asyncio.to_thread(rig.channels)
        if left == 0 or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.5)


async def run_one(rig: Rig, args: argparse.Namespace, scenario: Path, gate: str, concurrency: int,
                  run_id: str) -> dict:
    calls = max(args.min_calls, concurrency * args.calls_per_slot)
    tag = f"b{run_id}-{gate}-{concurrency}"
    before_files = rig.recordings()
    log = rig.asterisk.full_log
    offset = log.stat().st_size
    cpu0 = rig.cpu_snapshot()
    stop = asyncio.Event()
    memory: dict[str, int] = {}
    sampler = asyncio.create_task(sample_memory(rig, stop, memory))
    # Bound: every call ends within hold_limit; the run gets the ideal duration plus slack.
    hold_s = args.key_delay + 10 + 2
    limit = calls / concurrency * hold_s * 3 + 60
    result = await loadlib.run_sipp(
        rig, scenario=scenario, exten=GATES[gate], tag=tag, calls=calls, concurrency=concurrency,
        work_dir=args.work_dir / "sipp" / tag, sip_port=args.sip_port, media_port=args.media_port,
        timeout_s=limit)
    left = await wait_idle(rig)
    stop.set()
    await sampler
    cpu1 = rig.cpu_snapshot()
    with open(log, "rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
    times = loadlib.parse_log(text, tag)
    granted = sum(1 for t in times.values() if t.status == "granted")
    completed = min(granted, result.successful)
    cpu = {name: round(cpu1[name] - cpu0[name], 2) for name in cpu0}
    # Everything else on the machine in the same interval (other engineers' tests, SIPp itself).
    machine_busy = cpu.pop("machine_busy")
    machine_total = cpu.pop("machine_total")
    others = machine_busy - sum(cpu.values())
    per_call = max(completed, 1)
    ours = {"ari": cpu["ari_app"], "agi": cpu["agi_scripts"], "fastagi": cpu["fastagi_app"]}.get(gate, 0.0)
    row = {
        "gate": gate, "extension": GATES[gate], "concurrency": concurrency, "calls": calls,
        "completed": completed, "granted": granted, "sipp_successful": result.successful,
        "failed": calls - completed, "wall_s": round(result.wall_s, 2),
        "calls_per_s": round(completed / result.wall_s, 3) if result.wall_s else 0.0,
        "cpu_s": cpu,
        "cpu_ms_per_call": {
            "asterisk": round(cpu["asterisk"] / per_call * 1000, 1),
            "ours": round(ours / per_call * 1000, 1),
            "postgres": round(cpu["postgres"] / per_call * 1000, 1),
            "total": round((cpu["asterisk"] + ours + cpu["postgres"]) / per_call * 1000, 1),
        },
        **loadlib.latencies(times),
        "machine_busy_pct": round(100 * machine_busy / machine_total, 1) if machine_total else None,
        "other_cpu_s": round(others, 2),
        "ari_rss_kib_end": loadlib.rss_kib(rig.gate_pid),
        "fastagi_rss_kib_end": loadlib.rss_kib(rig.fastagi_pid),
        **memory,
        "channels_left": left,
    }
    if not args.keep_recordings:
        for name in rig.recordings() - before_files:
            (rig.asterisk.recordings_dir / name).unlink(missing_ok=True)
    return row


# Experiment for a proposed fix (not the shipped behaviour): only the event types the service
# acts on reach it.  ChannelVarset stays (the mid-call watcher finds the bridge by BRIDGEPEER).
EVENTS_USED = ["StasisStart", "StasisEnd", "PlaybackFinished", "ChannelDtmfReceived", "ChannelDestroyed",
               "ChannelHangupRequest", "ChannelEnteredBridge", "ChannelLeftBridge", "ChannelVarset"]


async def set_event_filter(rig: Rig) -> None:
    import aiohttp

    env = rig.asterisk.env()
    url = f"{env['CONSENT_GATE_ARI_URL']}/ari/applications/{env['CONSENT_GATE_ARI_APP']}/eventFilter"
    auth = aiohttp.helpers.BasicAuth(env["CONSENT_GATE_ARI_USER"], env["CONSENT_GATE_ARI_PASSWORD"]).encode()
    async with aiohttp.ClientSession(headers={"Authorization": auth}) as session:
        async with session.put(url, json={"allowed": [{"type": name} for name in EVENTS_USED]}) as response:
            body = await response.text()
            if response.status != 200:
                raise RuntimeError(f"eventFilter: HTTP {response.status} {body}")
    print(f"ARI event filter set: {', '.join(EVENTS_USED)}", flush=True)


def print_row(row: dict) -> None:
    ap, km = row["answer_to_prompt_ms"], row["key_to_mixmonitor_ms"]
    cpc = row["cpu_ms_per_call"]
    print(f"{row['gate']:>4} c={row['concurrency']:>3} calls={row['calls']:>4} ok={row['completed']:>4} "
          f"fail={row['failed']:>3} {row['calls_per_s']:6.2f} calls/s  cpu/call ms: ast={cpc['asterisk']:6.1f} "
          f"ours={cpc['ours']:6.1f} pg={cpc['postgres']:5.1f}  answer->prompt p50/p99={ap['p50']}/{ap['p99']} ms  "
          f"key->rec p50/p99={km['p50']}/{km['p99']} ms  ari_rss={row.get('ari_rss_kib_max', 0) // 1024} MiB  "
          f"fastagi_rss={row.get('fastagi_rss_kib_max', 0) // 1024} MiB  "
          f"machine busy {row['machine_busy_pct']}%",
          flush=True)


def summary(rows: list[dict]) -> dict:
    """Ratios against the reference of the same round (level): calls/s and total CPU per call."""
    out = {}
    for row in rows:
        if row["gate"] == "ref":
            continue
        ref = next((r for r in rows if r["gate"] == "ref" and r["round"] == row["round"]), None)
        if ref is None:
            continue
        key = f"{row['gate']}@{row['concurrency']}#{row['round']}"
        out[key] = {
            "throughput_ratio": round(row["calls_per_s"] / ref["calls_per_s"], 3) if ref["calls_per_s"] else None,
            "cpu_per_call_ratio": round(row["cpu_ms_per_call"]["total"] / ref["cpu_ms_per_call"]["total"], 2)
            if ref["cpu_ms_per_call"]["total"] else None,
            "asterisk_cpu_per_call_ratio": round(row["cpu_ms_per_call"]["asterisk"]
                                                 / ref["cpu_ms_per_call"]["asterisk"], 2)
            if ref["cpu_ms_per_call"]["asterisk"] else None,
        }
    return out


def _spread(values: list[float]) -> dict[str, float | int | None]:
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0, "median": None, "min": None, "max": None}
    return {"n": len(values), "median": round(statistics.median(values), 2), "min": min(values), "max": max(values)}


def aggregate(rows: list[dict], ratios: dict) -> dict:
    """Per gate and concurrency over the rounds: median and range of total CPU per call (ms),
    of its ratio to the same round's reference, and of calls/s."""
    out: dict[str, dict] = {}
    for gate in dict.fromkeys(r["gate"] for r in rows):
        for level in dict.fromkeys(r["concurrency"] for r in rows):
            mine = [r for r in rows if r["gate"] == gate and r["concurrency"] == level]
            if not mine:
                continue
            out[f"{gate}@{level}"] = {
                "cpu_ms_per_call_total": _spread([r["cpu_ms_per_call"]["total"] for r in mine]),
                "cpu_ms_per_call_ours": _spread([r["cpu_ms_per_call"]["ours"] for r in mine]),
                "cpu_ms_per_call_asterisk": _spread([r["cpu_ms_per_call"]["asterisk"] for r in mine]),
                "cpu_per_call_ratio": _spread([ratios[k]["cpu_per_call_ratio"] for k in ratios
                                               if k.startswith(f"{gate}@{level}#")]),
                "calls_per_s": _spread([r["calls_per_s"] for r in mine]),
                "failed": sum(r["failed"] for r in mine),
                "machine_busy_pct": _spread([r["machine_busy_pct"] for r in mine]),
            }
    return out


async def main_async(args: argparse.Namespace) -> int:
    args.work_dir.mkdir(parents=True, exist_ok=True)
    rig = Rig(args.work_dir, args.pg_port, extra_env={"CONSENT_GATE_LOG_LEVEL": args.app_log_level})
    await rig.start()
    rows: list[dict] = []
    try:
        # Read now: the rig is gone when the JSON is written.
        asterisk_version = rig.asterisk.cli("core show version").strip()
        if args.ari_event_filter:
            await set_event_filter(rig)
        # The 200 OK times come from the pjsip logger, limited to INVITE transactions.
        rig.asterisk.cli("pjsip set logger method INVITE")
        rig.asterisk.cli("pjsip set logger on")
        audio = loadlib.caller_audio(args.work_dir / "caller.ulaw")
        scenario = loadlib.render_scenario(args.work_dir / "caller.xml", audio=audio,
                                           key_delay_ms=int(args.key_delay * 1000),
                                           hold_limit_ms=int((args.key_delay + 30) * 1000))
        run_id = uuid.uuid4().hex[:6]
        # Warm-up: one call per gate (first AGI start, first pool connection), not reported.
        for gate in args.gates:
            await run_one(rig, argparse.Namespace(**{**vars(args), "min_calls": 1, "calls_per_slot": 1}),
                          scenario, gate, 1, run_id + "w")
        for round_no, concurrency in enumerate(args.levels):
            # Interleaved, and the order rotates each round: no gate always runs first or last.
            shift = round_no % len(args.gates)
            for gate in args.gates[shift:] + args.gates[:shift]:
                row = await run_one(rig, args, scenario, gate, concurrency, f"{run_id}r{round_no}")
                row["round"] = round_no
                rows.append(row)
                print_row(row)
    finally:
        try:
            rig.asterisk.cli("pjsip set logger off")
        finally:
            await rig.stop()
    ratios = summary(rows)
    for key, value in ratios.items():
        print(f"{key}: throughput {value['throughput_ratio']}x ref, CPU/call {value['cpu_per_call_ratio']}x ref "
              f"(Asterisk alone {value['asterisk_cpu_per_call_ratio']}x)")
    spread = aggregate(rows, ratios)
    for key, value in spread.items():
        total, ratio = value["cpu_ms_per_call_total"], value["cpu_per_call_ratio"]
        print(f"{key}: CPU/call total median {total['median']} ms [{total['min']}..{total['max']}] over {total['n']}"
              + (f", vs ref median {ratio['median']}x [{ratio['min']}..{ratio['max']}]" if ratio["n"] else ""))
    result = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(args.started)),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                    "asterisk": asterisk_version},
        "settings": {"key_delay_s": args.key_delay, "calls_per_slot": args.calls_per_slot,
                     "ari_event_filter": args.ari_event_filter,
                     "min_calls": args.min_calls, "app_log_level": args.app_log_level},
        "runs": rows,
        "ratios_vs_reference": ratios,
        "medians": spread,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def markdown_table(result: dict) -> str:
    """The short table for docs/performance.md from a results JSON."""
    lines = ["| gate | conc. | calls ok/failed | calls/s | CPU ms/call Asterisk | ours | PostgreSQL "
             "| answer→prompt p50/p99 ms | key→MixMonitor p50/p99 ms | app RSS MiB | machine busy |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in result["runs"]:
        ap, km, cpc = row["answer_to_prompt_ms"], row["key_to_mixmonitor_ms"], row["cpu_ms_per_call"]
        rss = {"ari": row.get("ari_rss_kib_max", 0), "agi": row.get("agi_rss_kib_max", 0),
               "fastagi": row.get("fastagi_rss_kib_max", 0)}.get(row["gate"], 0) / 1024
        lines.append(
            f"| {row['gate']} | {row['concurrency']} | {row['completed']}/{row['failed']} | {row['calls_per_s']:.2f} "
            f"| {cpc['asterisk']:.0f} | {cpc['ours']:.0f} | {cpc['postgres']:.0f} | {ap['p50']}/{ap['p99']} "
            f"| {km['p50']}/{km['p99']} | {rss:.0f} | {row.get('machine_busy_pct')} % |")
    lines.append("")
    lines.append("| vs reference | throughput | CPU per call (all processes) | Asterisk CPU per call |")
    lines.append("| --- | ---: | ---: | ---: |")
    for key, value in result["ratios_vs_reference"].items():
        lines.append(f"| {key} | {value['throughput_ratio']}× | {value['cpu_per_call_ratio']}× "
                     f"| {value['asterisk_cpu_per_call_ratio']}× |")
    if result.get("medians"):
        lines.append("")
        lines.append("| gate@level | runs | CPU ms/call total, median [range] | ours | Asterisk "
                     "| vs reference, median [range] | calls/s median | failed | machine busy median |")
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")

        def cell(spread: dict, unit: str = "") -> str:
            if not spread["n"]:
                return "–"
            return f"{spread['median']:g}{unit} [{spread['min']:g}–{spread['max']:g}]"

        for key, value in result["medians"].items():
            lines.append(f"| {key} | {value['cpu_ms_per_call_total']['n']} | {cell(value['cpu_ms_per_call_total'])} "
                         f"| {cell(value['cpu_ms_per_call_ours'])} | {cell(value['cpu_ms_per_call_asterisk'])} "
                         f"| {cell(value['cpu_per_call_ratio'], '×')} | {value['calls_per_s']['median']} "
                         f"| {value['failed']} | {value['machine_busy_pct']['median']} % |")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--table":
        print(markdown_table(json.loads(Path(sys.argv[2]).read_text())))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="run.py --table results.json prints the markdown table of a run")
    parser.add_argument("--levels", default="1,10,30,50",
                        help="concurrency levels, one round each (default 1,10,30,50); repeat a level for repeats, "
                        "e.g. 20,20,20")
    parser.add_argument("--gates", default="ari,agi,fastagi,ref", help="which gates: ari, agi, fastagi, ref, refwrap (the reference in the AGI-mode dialplan wrapper)")
    parser.add_argument("--calls-per-slot", type=int, default=4, help="calls per concurrent slot (default 4)")
    parser.add_argument("--min-calls", type=int, default=10, help="at least this many calls per run")
    parser.add_argument("--key-delay", type=float, default=2.0, help="seconds from answer to the key")
    parser.add_argument("--app-log-level", default="info", choices=("debug", "info", "warning"))
    parser.add_argument("--pg-port", type=int, default=int(os.environ.get("CONSENT_GATE_TEST_PG_PORT", "26132")))
    parser.add_argument("--sip-port", type=int, default=31990, help="SIPp's local SIP port")
    parser.add_argument("--media-port", type=int, default=31000, help="SIPp's local RTP port")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/consent-gate-bench"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--keep-recordings", action="store_true")
    parser.add_argument("--ari-event-filter", action="store_true",
                        help="experiment: let only the event types the service uses reach it (proposed fix)")
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    args.gates = [g for g in args.gates.split(",") if g]
    unknown = set(args.gates) - set(GATES)
    if unknown:
        parser.error(f"unknown gate(s): {', '.join(sorted(unknown))}")
    args.started = time.time()
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())

"""The demo: Asterisk, PostgreSQL and the consent-gate service, then real SIP calls.

    python -m consent_gate_rig.demo [--keep]

A caller consents (presses 1) and speaks to an agent; a second caller declines (presses 2).
The ledger and the recordings directory are printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from consent_gate.cli import _history, _print_rows
from consent_gate.ledger.store import migrate
from consent_gate_rig import audio
from consent_gate_rig.harness import AsteriskLog, GateService
from consent_gate_rig.pgsandbox import PgSandbox
from consent_gate_rig.sandbox import PROJECT_DIR, AsteriskSandbox, SandboxSettings
from consent_gate_rig.softphone import Softphone

RUN_DIR = PROJECT_DIR / ".run"


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def make_speech(directory: Path) -> Path:
    raw, out = directory / "speech-raw.wav", directory / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(raw),
                    "Hi, I am calling about my invoice from last month."], check=True)
    subprocess.run(["sox", str(raw), "-r", "8000", "-c", "1", "-b", "16", str(out)], check=True)
    return out


async def place_call(phone_line, agent_line, sandbox: AsteriskSandbox, key: str, tag: str, speech: Path,
                     *, first_key: str | None = None, midcall: str | None = None) -> dict:
    log = AsteriskLog(sandbox.full_log)
    call = await phone_line.call(f"sip:200@{sandbox.sip_domain}", headers={"X-Test-Call": tag})
    await call.wait_answered(10)
    await log.wait_for(r"Playing '[^']*/question-training\.", 10)
    if first_key:
        print(f"   caller presses {first_key}: they record the call themselves; the question is asked again")
        await asyncio.sleep(2)
        await call.send_dtmf(first_key)
        await log.wait_for(r"(?s)caller-records-ack.*Playing '[^']*/question-training\.", 20)
    print(f"   caller hears the consent question, presses {key} after 3 s")
    await asyncio.sleep(3)  # a person listening before pressing
    await call.send_dtmf(key)
    result = await log.gate_result(tag, 20)
    print(f"   gate returned CONSENT_STATUS={result.status} CONSENT_ID={result.consent_id}")
    agent = await agent_line.wait_incoming(20)
    await agent.answer()
    print("   agent answered and hears how the call is handled; caller speaks")
    await call.play_silence(3.5)
    await call.play_wav(speech)
    if midcall:
        print(f"   caller presses {midcall} mid-call: consent withdrawn, recording stopped and deleted")
        await call.send_dtmf(midcall)
        await call.play_silence(4.0)
    await call.hangup()
    await agent.wait_hangup(10)
    heard = audio.rms_dbfs(agent.heard_segment(0.3, 2.5))
    print(f"   agent heard the caller at {heard:.0f} dBFS; call ended")
    return {"status": result.status, "recording_id": result.recording_id, "consent_id": result.consent_id}


async def run_demo(keep: bool) -> int:
    started = time.monotonic()
    say("Asterisk 22 sandbox")
    sandbox = AsteriskSandbox(SandboxSettings.from_env(name="demo"))
    sandbox.up()
    print(f"   provider={sandbox.provider.name} SIP={sandbox.sip_domain} ARI={sandbox.ari_url}")
    say("PostgreSQL ledger")
    pg = PgSandbox(RUN_DIR / "demo-pg", port=25432)
    pg.start()
    applied = await migrate(pg.dsn)
    print(f"   {pg.dsn} (migrations applied now: {', '.join(applied) or 'none, up to date'})")
    service = GateService(sandbox, pg.dsn, RUN_DIR / "demo-service")
    try:
        say("consent-gate ARI service")
        await service.start()
        print(f"   running, log: {service.log_path}")
        with tempfile.TemporaryDirectory() as tmp:
            speech = make_speech(Path(tmp))
            async with Softphone(listen="127.0.0.1:0") as phone:
                password = sandbox.state.sip_password
                caller = await phone.register("caller", password, sandbox.sip_domain)
                agent = await phone.register("agent", password, sandbox.sip_domain)
                say("Call 1: the caller consents (key 1)")
                first = await place_call(caller, agent, sandbox, "1", "demo-consent", speech)
                say("Call 2: the caller declines (key 2)")
                second = await place_call(caller, agent, sandbox, "2", "demo-decline", speech)
                say("Call 3: the caller consents, then withdraws mid-call (*0)")
                third = await place_call(caller, agent, sandbox, "1", "demo-withdraw", speech, midcall="*0")
                say("Call 4: the caller says they record too (3), then declines (2)")
                fourth = await place_call(caller, agent, sandbox, "2", "demo-reciprocal", speech, first_key="3")
        await asyncio.sleep(0.5)  # MixMonitor closes the file as the channel goes away
        say("Recordings (file names are opaque ids; mode 0600 in a 0700 directory)")
        calls = (first, second, third, fourth)
        for path in sorted(sandbox.recordings_dir.glob("*.wav")):
            if any(c["recording_id"] and path.name.startswith(c["recording_id"]) for c in calls):
                print(f"   {path.name}  {oct(path.stat().st_mode & 0o777)}  {audio.duration(path):.1f} s")
        print(f"   declined call recorded: {'yes' if second['recording_id'] else 'no'}")
        withdrawn_left = list(sandbox.recordings_dir.glob(f"{third['recording_id']}*"))
        print(f"   withdrawn call's files left: {len(withdrawn_left)}")
        say("Ledger (consent-gate history)")
        for result in calls:
            _print_rows(await _history(pg.dsn, None, result["consent_id"]), as_json=False)
        say(f"Demo finished in {time.monotonic() - started:.0f} s")
        return 0
    finally:
        await service.stop()
        if not keep:
            sandbox.down()
            pg.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="consent-gate-demo", description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="leave Asterisk and PostgreSQL running")
    args = parser.parse_args(argv)
    return asyncio.run(run_demo(args.keep))


if __name__ == "__main__":
    sys.exit(main())

"""The demo: Asterisk, PostgreSQL and the consent-gate service, then real SIP calls.

    python -m consent_gate.rig.demo [--keep]

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
from consent_gate.ledger import migrate
from consent_gate.rig import audio
from consent_gate.rig.harness import AsteriskLog, GateService
from consent_gate.rig.pgsandbox import PgSandbox
from consent_gate.rig.sandbox import PROJECT_DIR, AsteriskSandbox, SandboxSettings
from consent_gate.rig.softphone import Softphone

RUN_DIR = PROJECT_DIR / ".run"


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def make_speech(directory: Path) -> Path:
    raw, out = directory / "speech-raw.wav", directory / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(raw),
                    "Hi, I am calling about my invoice from last month."], check=True)
    subprocess.run(["sox", str(raw), "-r", "8000", "-c", "1", "-b", "16", str(out)], check=True)
    return out


async def place_call(phone_line, agent_line, sandbox: AsteriskSandbox, key: str, tag: str, speech: Path) -> dict:
    log = AsteriskLog(sandbox.full_log)
    call = await phone_line.call(f"sip:200@{sandbox.sip_domain}", headers={"X-Test-Call": tag})
    await call.wait_answered(10)
    await log.wait_for(r"Playing '[^']*/question-training\.", 10)
    print(f"   caller hears the consent question, presses {key} after 3 s")
    await asyncio.sleep(3)  # a person listening before pressing
    await call.send_dtmf(key)
    result = await log.gate_result(tag, 20)
    print(f"   gate returned CONSENT_STATUS={result.status} CONSENT_ID={result.consent_id}")
    agent = await agent_line.wait_incoming(20)
    await agent.answer()
    print("   agent answered; caller speaks")
    await call.play_wav(speech)
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
        await asyncio.sleep(0.5)  # MixMonitor closes the file as the channel goes away
        say("Recordings (file names are opaque ids; mode 0600 in a 0700 directory)")
        for path in sorted(sandbox.recordings_dir.glob("*.wav")):
            if path.stem in (first["recording_id"], second["recording_id"]):
                print(f"   {path.name}  {oct(path.stat().st_mode & 0o777)}  {audio.duration(path):.1f} s")
        print(f"   declined call recorded: {'yes' if second['recording_id'] else 'no'}")
        say("Ledger (consent-gate history)")
        for result in (first, second):
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

#!/usr/bin/env python3
"""Randomised callers on the ARI-Local tier: the invariant over many calls (default 1,000).

    python3 bench/load/random_callers.py --calls 1000 --concurrency 30 [--seed N] [--ami-faults] --out bench/load/random-callers.json

Each call is a Local channel pair originated through ARI on the sandbox Asterisk: the ;2 half
goes through the real ARI gate (extension ``500-TAG``), the ;1 half (``cgcaller``) keys with
``SendDTMF`` at a random moment — grant, decline, invalid then grant, "I record too" then grant,
grant then withdraw (``*0``), DTMF floods without the consent key — and hangs up at a random
moment (at answer, in the question, while storing, in the confirmation, later).  Afterwards,
for every call: exactly one decision in the ledger; a recording exists ⇔ a granted, not
withdrawn decision exists; no MixMonitor without a grant; no file that belongs to no call.

The integration test ``tests/integration/test_faults_load.py`` runs the same check with 100
calls in CI; this script is the big run, by hand.  It prints the outcome and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import uuid
from pathlib import Path

from consent_gate_rig import loadlib
from consent_gate_rig.harness import AsteriskLog
from consent_gate_rig.random_callers import flaky_ami, random_run


async def main_async(args: argparse.Namespace) -> int:
    rig = loadlib.Rig(args.work_dir, args.pg_port)
    await rig.start()
    try:
        log = AsteriskLog(rig.asterisk.full_log)
        before = rig.recordings()
        started = time.monotonic()
        faults: dict[str, int] = {}
        if args.ami_faults:
            # The service's AMI through a proxy that refuses and cuts connections (seeded).
            async with flaky_ami(rig.gate, rig.asterisk, args.seed) as proxy:
                report = await random_run(rig.asterisk, rig.pg.dsn, log, calls=args.calls,
                                          concurrency=args.concurrency, seed=args.seed,
                                          tag_prefix=f"rc{uuid.uuid4().hex[:6]}")
                faults = {"refused": proxy.refused, "cut": proxy.cuts, "forwarded": proxy.forwarded}
        else:
            report = await random_run(rig.asterisk, rig.pg.dsn, log, calls=args.calls, concurrency=args.concurrency,
                                      seed=args.seed, tag_prefix=f"rc{uuid.uuid4().hex[:6]}")
        elapsed = time.monotonic() - started
        alive = rig.gate.running
        channels_left = rig.channels()
        new_files = rig.recordings() - before
        result = {
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "seed": args.seed, "calls": report.calls, "concurrency": args.concurrency,
            "elapsed_s": round(elapsed, 1), "outcomes": dict(report.outcomes),
            "granted_but_hung_up_before_mixmonitor": report.granted_hung_up_before_recording,
            "withdrawal_keyed_but_not_withdrawn": report.withdrawal_ignored,
            "recordings_kept": len({name.split("-")[0].removesuffix(".wav") for name in new_files}),
            "violations": report.violations, "service_alive": alive, "channels_left": channels_left,
            "ami_faults": faults,
        }
        print(json.dumps(result, indent=2))
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        if not args.keep_recordings:
            for name in new_files:
                (rig.asterisk.recordings_dir / name).unlink(missing_ok=True)
        return 0 if not report.violations and alive else 1
    finally:
        await rig.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=30)
    parser.add_argument("--seed", type=int, default=random.SystemRandom().randrange(1 << 30))
    parser.add_argument("--pg-port", type=int, default=int(os.environ.get("CONSENT_GATE_TEST_PG_PORT", "26132")))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/consent-gate-random-callers"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "random-callers.json")
    parser.add_argument("--keep-recordings", action="store_true")
    parser.add_argument("--ami-faults", action="store_true",
                        help="put the service's AMI behind a proxy that refuses and cuts connections")
    args = parser.parse_args()
    if args.calls > 5000 or args.concurrency > 60:
        parser.error("bounded by design: at most 5000 calls and 60 at once")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())

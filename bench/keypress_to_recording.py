#!/usr/bin/env python3
"""Keypress → MixMonitor start, from an Asterisk 'full' log (millisecond timestamps).

    python bench/keypress_to_recording.py /var/cache/consent-gate/sid-root/srv/consent-gate/test/log/full

For every channel that started MixMonitor, takes the last "DTMF end '<key>' received" on that
channel before "Begin MixMonitor Recording" and prints the distribution of the delays (the
ledger write, the hand-back to the dialplan and MixMonitor's own start).  Prints figures only.
"""

from __future__ import annotations

import re
import statistics
import sys
from datetime import datetime

LINE = re.compile(r"^\[(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\] (?P<level>\w+)\[\d+\](?:\[[^\]]*\])? (?P<msg>.*)$")
DTMF = re.compile(r"DTMF end '(?P<key>.)' received on (?P<chan>\S+?),")
BEGIN = re.compile(r"Begin MixMonitor Recording (?P<chan>\S+)")


def delays(lines: list[str]) -> list[float]:
    last_key: dict[str, datetime] = {}
    found = []
    for raw in lines:
        line = LINE.match(raw)
        if not line:
            continue
        when = datetime.strptime(line["ts"], "%Y-%m-%d %H:%M:%S.%f")
        if (dtmf := DTMF.search(line["msg"])) and dtmf["key"] in "0123456789":
            last_key[dtmf["chan"]] = when
        elif (begin := BEGIN.search(line["msg"])) and begin["chan"] in last_key:
            found.append((when - last_key.pop(begin["chan"])).total_seconds() * 1000)
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1], errors="replace") as log:
        values = sorted(delays(log.readlines()))
    if not values:
        print("no keypress followed by a MixMonitor start in this log")
        return 1
    p = lambda q: values[min(len(values) - 1, int(round(q * (len(values) - 1))))]  # noqa: E731
    print(f"recordings: {len(values)}")
    print(f"keypress -> MixMonitor ms: min {values[0]:.0f}  p50 {p(0.5):.0f}  p90 {p(0.9):.0f}  "
          f"p99 {p(0.99):.0f}  max {values[-1]:.0f}  mean {statistics.mean(values):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""The shipped dialplan files load cleanly into the real Asterisk 22 -- the same files that
scripts/lint-dialplan lints: every context of dialplan/consent-gate.conf is there after
`dialplan reload`, the reload logs no WARNING or ERROR, and the features.conf snippet gives
the mid-call codes.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from consent_gate_rig.harness import AsteriskLog
from consent_gate_rig.sandbox import DIALPLAN_DIR, AsteriskSandbox

pytestmark = pytest.mark.integration

GATE_CONF = DIALPLAN_DIR / "consent-gate.conf"
FEATURES_CONF = DIALPLAN_DIR / "consent-gate-features.conf"
# Asterisk's full log: "[date] LEVEL[thread]" or "[date] LEVEL[thread][C-0000002a]" for a
# line about a call.  Configuration problems carry no call id.
PROBLEM = re.compile(r"^\[[^\]]+\] (WARNING|ERROR)\[\d+\](?!\[C-)", re.MULTILINE)


def shipped_contexts(path: Path) -> list[str]:
    return re.findall(r"(?m)^\[([A-Za-z0-9_-]+)\]", path.read_text())


async def _logged_after(asterisk: AsteriskSandbox, log: AsteriskLog, *commands: str) -> str:
    """Run CLI commands, then wait until everything they logged is in the file: the logger
    writes in order, so a marker logged afterwards bounds their output."""
    outputs = [asterisk.cli(command) for command in commands]
    marker = f"cg-load-{uuid.uuid4().hex[:12]}"
    asterisk.cli(f"dialplan set global CONSENT_GATE_LOAD_MARK {marker}")
    await log.wait_for(re.escape(marker), 15)
    text = log.text()
    return "\n".join(outputs) + "\n" + text[: text.index(marker)]


def _problems(text: str) -> list[str]:
    return [line for line in text.splitlines() if PROBLEM.match(line)]


async def test_every_shipped_context_is_loaded(asterisk: AsteriskSandbox) -> None:
    asterisk.reload_dialplan()  # this checkout's dialplan/, as an admin's #include reads it
    contexts = shipped_contexts(GATE_CONF)
    assert {"consent-gate", "consent-gate-agi", "consent-gate-reset", "consent-gate-apply"} <= set(contexts)
    shown = {context: asterisk.cli(f"dialplan show {context}") for context in contexts}
    for context, text in shown.items():
        assert f"[ Context '{context}' created by 'pbx_config' ]" in text, text
        assert "'s' =>" in text, text
    assert "Stasis(${LOCAL(app)},${LOCAL(purpose)})" in shown["consent-gate"]
    assert "AGI(${CONSENT_GATE_AGI},${LOCAL(purpose)})" in shown["consent-gate-agi"]
    assert ("MixMonitor(${CONSENT_GATE_RECORDINGS}/${LOCAL(recid)}.wav,${LOCAL(bridged)}i(CONSENT_MIXMONITOR_ID))"
            in shown["consent-gate-apply"])
    # A withdrawal keyed before the recorder starts keeps it from starting, and stops it right after.
    assert shown["consent-gate-apply"].count('GotoIf($["${CONSENT_WITHDRAWN}" = "1"]') == 2
    # Labels the Gotos jump to exist where the shipped text puts them.
    assert re.search(r"\[apply\]\s+\d+\. Gosub\(consent-gate-apply,s,1\)", shown["consent-gate"])
    assert re.search(r"\[done\]\s+\d+\. Return\(\)", shown["consent-gate-agi"])


async def test_dialplan_reload_logs_no_warning(asterisk: AsteriskSandbox) -> None:
    asterisk.install_files()
    log = AsteriskLog(asterisk.full_log)
    output = await _logged_after(asterisk, log, "dialplan reload")
    assert "Dialplan reloaded" in output, output
    # The reload really happened and read the globals the shipped include documents.
    for name in ("CONSENT_GATE_APP", "CONSENT_GATE_RECORDINGS", "CONSENT_GATE_AGI"):
        assert f"Setting global variable '{name}'" in output, output
    assert _problems(output) == []


async def test_features_snippet_loads_the_mid_call_codes(asterisk: AsteriskSandbox) -> None:
    """features.conf with the snippet #included under [applicationmap], as its header says."""
    features = asterisk.host_dir / "etc" / "features.conf"
    original = features.read_text()
    snippet = asterisk.inside_dir / "dialplan" / FEATURES_CONF.name
    asterisk.install_files()  # the snippet as shipped, beside consent-gate.conf
    log = AsteriskLog(asterisk.full_log)
    try:
        if not re.search(rf'(?m)^#include\s+"[^"]*/{re.escape(FEATURES_CONF.name)}"', original):
            # (the sandbox's own features.conf may include it already)
            assert original.rstrip().endswith("[applicationmap]"), "the sandbox's features.conf changed"
            features.write_text(original.rstrip() + f'\n#include "{snippet}"\n')
        output = await _logged_after(asterisk, log, "module reload features", "features show")
    finally:
        features.write_text(original)
        asterisk.cli("module reload features")
    assert "reloaded successfully" in output, output
    dynamic = dict(re.findall(r"(?m)^(consent-[a-z-]+)\s+no def\s+(\S+)\s*$", output))
    assert dynamic == {
        "consent-withdraw": "*0",
        "consent-caller-records": "*3",
        "consent-agent-pause": "*5",
        "consent-agent-resume": "*6",
        "consent-pause": "*5",
        "consent-resume": "*6",
    }, output
    assert _problems(output) == []

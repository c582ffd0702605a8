"""The shipped dialplan passes asterisklint (Asterisk 22), through scripts/lint-dialplan.

Also checks that the script really fails: on a finding in a fragment, and on a fragment the
lint entry does not name (asterisklint does not expand globs, so a forgotten #include would
otherwise mean a fragment that is never linted).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from consent_gate.config import DialogSettings

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "lint-dialplan"


def _run(root: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHON=sys.executable, ALINT_IGNORE="W_,E_,H_")  # the script must drop it
    return subprocess.run(["bash", str(root / "scripts" / "lint-dialplan")], capture_output=True,
                          text=True, timeout=120, env=env)


def _copy(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy2(SCRIPT, tmp_path / "scripts" / "lint-dialplan")
    shutil.copytree(ROOT / "dialplan", tmp_path / "dialplan")
    return tmp_path


def test_shipped_dialplan_lints_clean() -> None:
    done = _run(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "clean" in done.stdout
    # Nothing from asterisklint itself (its findings look like "file:line CODE: message").
    assert not re.search(r"\.conf:\d+ [WEH]_", done.stdout + done.stderr)


def test_lint_entry_names_each_fragment_and_the_admin_example() -> None:
    entry = (ROOT / "dialplan" / "lint" / "extensions.conf").read_text()
    assert '#include "../consent-gate.conf"' in entry
    assert "*" not in "".join(line for line in entry.splitlines() if line.startswith("#include"))
    assert "Gosub(consent-gate,s,1(training))" in entry
    assert "Gosub(consent-gate-agi,s,1(training))" in entry
    assert "Dial(PJSIP/" in entry


def test_lint_fails_on_a_finding_in_a_fragment(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    fragment = root / "dialplan" / "consent-gate.conf"
    # A misspelt application and a jump to a context that does not exist.
    fragment.write_text(fragment.read_text() + "\n[consent-gate-broken]\nexten => s,1,Retrun()\n"
                        " same => n,Goto(nowhere,s,1)\n")
    done = _run(root)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "E_APP_MISSING" in done.stdout
    assert "E_DP_GOTO_NOCONTEXT" in done.stdout


def test_lint_fails_when_a_fragment_is_not_included(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    (root / "dialplan" / "consent-gate-extra.conf").write_text("[consent-gate-extra]\nexten => s,1,Return()\n")
    done = _run(root)
    assert done.returncode == 2
    assert "consent-gate-extra.conf is not #included" in done.stderr


# --- the features.conf snippet (not dialplan: asterisklint has no checker for it) ------------

FEATURES = ROOT / "dialplan" / "consent-gate-features.conf"
_ENTRY = re.compile(r"^(?P<name>[a-z][a-z0-9-]*) => (?P<dtmf>[0-9*#]{2,4}),(?P<on>self|peer),"
                    r"Gosub\((?P<context>consent-gate-[a-z-]+),s,1\((?P<who>caller|agent)(?:,(?P<what>pause|resume))?\)\)$")


def _feature_entries() -> dict[str, re.Match[str]]:
    lines = [line.strip() for line in FEATURES.read_text().splitlines()]
    body = [line for line in lines if line and not line.startswith(";")]
    matches = [_ENTRY.match(line) for line in body]
    bad = [line for line, match in zip(body, matches) if match is None]
    assert not bad, f"not an applicationmap line of the documented form: {bad}"
    return {m["name"]: m for m in matches if m is not None}


def test_features_snippet_maps_the_mid_call_codes() -> None:
    entries = _feature_entries()
    dialog = DialogSettings()
    # The codes the service announces and listens for (config defaults) are the ones mapped here.
    expected = {
        "consent-withdraw": (dialog.withdraw_code, "consent-gate-withdraw", "caller", None),
        "consent-caller-records": (getattr(dialog, "caller_records_code", "*3"), "consent-gate-caller-records",
                                   "caller", None),
        "consent-agent-pause": (getattr(dialog, "pause_code", "*5"), "consent-gate-pause", "agent", "pause"),
        "consent-agent-resume": (getattr(dialog, "resume_code", "*6"), "consent-gate-pause", "agent", "resume"),
        "consent-pause": (getattr(dialog, "pause_code", "*5"), "consent-gate-pause", "caller", "pause"),
        "consent-resume": (getattr(dialog, "resume_code", "*6"), "consent-gate-pause", "caller", "resume"),
    }
    assert {name: (m["dtmf"], m["context"], m["who"], m["what"]) for name, m in entries.items()} == expected
    assert entries["consent-withdraw"]["dtmf"] == "*0"
    # Every routine runs on the caller's channel, where [consent-gate-apply] started MixMonitor:
    # the caller's own codes with "self", the agent's with "peer".
    for match in entries.values():
        assert match["on"] == ("self" if match["who"] == "caller" else "peer"), match.group(0)
    for who in ("caller", "agent"):
        codes = [m["dtmf"] for m in entries.values() if m["who"] == who]
        # One channel's DYNAMIC_FEATURES holds one side's set: its codes must differ, and none may
        # be a prefix of another (Asterisk would fire the shorter one first).
        assert len(codes) == len(set(codes)), who
        assert not any(a != b and b.startswith(a) for a in codes for b in codes), who


def test_features_snippet_has_no_section_header() -> None:
    # It is #included under the admin's own [applicationmap]; a second [applicationmap]
    # category in features.conf is not something to rely on.
    assert not [line for line in FEATURES.read_text().splitlines() if line.lstrip().startswith("[")]


@pytest.mark.parametrize("name", ["pjsip.conf", "http.conf", "ari.conf", "manager.conf"])
def test_sample_fragments_bind_to_loopback_only(name: str) -> None:
    text = (ROOT / "dialplan" / "samples" / name).read_text()
    settings = [line.split(";", 1)[0].strip() for line in text.splitlines()]
    settings = [line for line in settings if line]
    for line in settings:
        key, _, value = (part.strip() for part in line.partition("="))
        if key in ("bind", "bindaddr", "media_address", "external_media_address"):
            assert value.startswith("127.0.0.1"), line
        if key in ("password", "secret"):
            # A placeholder that Asterisk would accept must never look like a usable default.
            assert value.startswith("CHANGE-ME"), line


def test_apply_unpacks_the_result_in_the_core_field_order() -> None:
    """[consent-gate-apply] and DialogResult.packed() agree on the fields: field N of the CUT()
    goes to RESULT_FIELDS[N-1], status last, and an unknown status cannot pass through."""
    from consent_gate.core.dialog import RESULT_FIELDS, RESULT_SEPARATOR, RESULT_VARIABLE

    text = (ROOT / "dialplan" / "consent-gate.conf").read_text()
    apply = text.split("\n[consent-gate-apply]\n", 1)[1].split("\n[", 1)[0]
    cut = re.compile(rf"Set\((LOCAL\(status\)|\w+)=\$\{{CUT\({RESULT_VARIABLE},{re.escape(RESULT_SEPARATOR)},(\d+)\)\}}\)")
    unpacked = {int(field): name for name, field in cut.findall(apply)}
    assert sorted(unpacked) == list(range(1, len(RESULT_FIELDS) + 1))
    expected = dict(enumerate(RESULT_FIELDS, start=1))
    expected[len(RESULT_FIELDS)] = "LOCAL(status)"  # the status is checked before it is set
    assert unpacked == expected
    assert 'REGEX("^(granted|declined|no-input|notified)$" ${LOCAL(status)})' in apply
    assert "?${LOCAL(status)}:unavailable)" in apply

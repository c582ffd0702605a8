"""The dialplan and the code share their names through consent_gate.contract, and only there.

These tests read ``dialplan/*.conf`` and the product's sources: a variable the dialplan sets that
the contract does not know, a variable [consent-gate-reset] forgets, a CUT() out of order, a
MixMonitor file name other than ``<id><suffix>``, or a ``"CONSENT_..."`` literal outside the
contract each fail here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from consent_gate import contract

ROOT = Path(__file__).resolve().parents[2]
DIALPLAN = ROOT / "dialplan" / "consent-gate.conf"
FEATURES = ROOT / "dialplan" / "consent-gate-features.conf"
PRODUCT = ROOT / "consent_gate"

KNOWN = {*contract.RESET_VARIABLES, contract.CALLER_RECORDS_VARIABLE}


def context(text: str, name: str) -> str:
    """The lines of one [context] of a dialplan file (comments dropped)."""
    match = re.search(rf"^\[{re.escape(name)}\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    assert match, f"no [{name}] in the dialplan"
    return "\n".join(line.split(";", 1)[0] for line in match.group(1).splitlines())


def dialplan_text() -> str:
    return "\n".join(line.split(";", 1)[0] for line in DIALPLAN.read_text().splitlines())


def test_every_consent_variable_the_dialplan_sets_or_reads_is_in_the_contract() -> None:
    text = dialplan_text() + "\n" + FEATURES.read_text()
    used = set(re.findall(r"\b_{0,2}(CONSENT_(?!GATE_)[A-Z_]+)\b", text))
    assert used, "the dialplan names no CONSENT_ variable: the pattern is wrong"
    assert used <= KNOWN, f"not in consent_gate.contract: {sorted(used - KNOWN)}"


def test_the_reset_empties_every_variable_of_the_contract_and_starts_unavailable() -> None:
    reset = context(DIALPLAN.read_text(), "consent-gate-reset")
    emptied = set(re.findall(r"Set\(_{0,2}(CONSENT_[A-Z_]+)=\)", reset))
    assert re.search(rf"Set\({contract.STATUS_VARIABLE}=unavailable\)", reset)
    expected = set(contract.RESET_VARIABLES) - {contract.STATUS_VARIABLE}
    assert emptied == expected, f"missing: {sorted(expected - emptied)}, extra: {sorted(emptied - expected)}"
    # The agent notice is inherited by the agent's channel: it is reset with the same "__".
    assert f"Set(__{contract.AGENT_NOTICE_VARIABLE}=)" in reset


def test_apply_unpacks_the_result_in_the_contracts_order() -> None:
    apply = context(DIALPLAN.read_text(), "consent-gate-apply")
    cuts = re.findall(rf"Set\(([A-Z_]+|LOCAL\(status\))=\$\{{CUT\({contract.RESULT_VARIABLE},"
                      rf"{re.escape(contract.RESULT_SEPARATOR)},(\d+)\)\}}\)", apply)
    by_field = {int(number): name for name, number in cuts}
    assert sorted(by_field) == list(range(1, len(contract.RESULT_FIELDS) + 1))
    # The status goes through LOCAL() and a pattern check before it becomes CONSENT_STATUS.
    names = [contract.STATUS_VARIABLE if name == "LOCAL(status)" else name for _, name in sorted(by_field.items())]
    assert names == list(contract.RESULT_FIELDS)


def test_every_mixmonitor_file_is_the_recording_id_and_a_contract_suffix() -> None:
    apply = context(DIALPLAN.read_text(), "consent-gate-apply")
    calls = re.findall(r"(?<![A-Za-z])MixMonitor\((.*)\)\s*$", apply, re.M)
    assert len(calls) == 2, "one MixMonitor for the mix alone, one with the legs"
    files = [name for call in calls for name in re.findall(r"\$\{CONSENT_GATE_RECORDINGS\}/(\$\{LOCAL\(recid\)\}[\w.-]*|[^,()]+)", call)]
    suffixes = {name.removeprefix("${LOCAL(recid)}") for name in files}
    assert all(name.startswith("${LOCAL(recid)}") for name in files), files
    assert suffixes == set(contract.RECORDING_FILE_SUFFIXES)
    # The recorder's id goes where the contract says StopMixMonitor finds it.
    assert all(call.endswith(f"i({contract.MIXMONITOR_ID_VARIABLE})") for call in calls)


def test_the_recording_id_is_filtered_and_compared_as_the_contract_defines_it() -> None:
    apply = context(DIALPLAN.read_text(), "consent-gate-apply")
    assert "Set(LOCAL(recid)=${FILTER(0-9a-f,${CONSENT_RECORDING_ID})})" in apply
    check = re.search(r"GotoIf\(\$\[(.*)\]\?refuse\)", apply)
    assert check and '"${LOCAL(recid)}" != "${CONSENT_RECORDING_ID}"' in check.group(1)
    assert "${LEN(${LOCAL(recid)})} != 32" in check.group(1)
    assert contract.RECORDING_ID_PATTERN == "[0-9a-f]{32}"


@pytest.mark.parametrize("value, ok", [
    ("0123456789abcdef0123456789abcdef", True),
    ("0123456789ABCDEF0123456789abcdef", False),  # FILTER(0-9a-f) would drop the capitals
    ("0123456789abcdef0123456789abcde", False),
    ("0123456789abcdef0123456789abcdef;x", False),
    ("../../etc/passwd", False),
])
def test_the_python_id_check_agrees_with_the_dialplans(value: str, ok: bool) -> None:
    filtered = "".join(ch for ch in value if ch in "0123456789abcdef")
    dialplan_accepts = filtered == value and len(filtered) == 32
    assert dialplan_accepts is ok
    assert (contract.valid_recording_id(value) is not None) is ok


def test_release_context_and_label_exist_in_the_dialplan() -> None:
    released = context(DIALPLAN.read_text(), contract.RELEASE_CONTEXT)
    assert re.search(rf"exten => s,1\({contract.RELEASE_LABEL}\),Set\({contract.RESULT_VARIABLE}=\)", released)


def _string_literals(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append((node.lineno, node.value))
    return found


def test_no_consent_variable_name_is_spelled_outside_the_contract() -> None:
    offenders = []
    for path in sorted(PRODUCT.rglob("*.py")):
        if path.name == "contract.py":
            continue
        for line, value in _string_literals(path):
            # Docstrings and messages may mention a name inside a sentence; a bare name is a use.
            if re.fullmatch(r"_{0,2}CONSENT_(?!GATE_)[A-Z_]+", value):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {value!r}")
    assert not offenders, "use the consent_gate.contract constant:\n" + "\n".join(offenders)

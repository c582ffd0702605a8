"""The layout the README's design screen promises, checked on the sources (AST, no imports).

* The product finds its own files through its package (importlib.resources), never through the
  source tree (``Path(__file__).parents[...]``).
* Test infrastructure lives in the rig (consent_gate_rig) or in conftest.py: no test module
  imports another test module, and bench/ imports the rig instead of editing sys.path.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def modules(*tops: str) -> list[Path]:
    return sorted(path for top in tops for path in (ROOT / top).rglob("*.py"))


def test_the_product_never_looks_for_its_files_in_the_source_tree() -> None:
    offenders = []
    for path in modules("consent_gate"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "parents":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, "use importlib.resources (package data), not the checkout: " + ", ".join(offenders)


def test_no_test_module_imports_another_test_module() -> None:
    offenders = []
    for path in modules("tests", "bench", "rig"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = ("." * node.level) + (node.module or "")
                names = [alias.name for alias in node.names]
                ours = node.level > 0 or target.split(".")[0] == "tests"  # not aiohttp.test_utils & co.
                if ours and (target.lstrip(".").split(".")[0] == "tests"
                             or any(part.startswith("test_") for part in target.lstrip(".").split("."))
                             or any(name.startswith("test_") for name in names)):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {target} import {', '.join(names)}")
            elif isinstance(node, ast.Import):
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno}: import {alias.name}" for alias in node.names
                              if alias.name.startswith("tests")]
    assert not offenders, "move shared helpers to consent_gate_rig or conftest.py:\n" + "\n".join(offenders)


def test_bench_imports_the_rig_without_editing_sys_path() -> None:
    offenders = []
    for path in modules("bench"):
        if path.name == "panoramisk_probe.py":
            continue  # points at a panoramisk source tree given on its command line, not at ours
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
                    and node.value.id == "sys":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, "import consent_gate_rig (installed by scripts/setup): " + ", ".join(offenders)

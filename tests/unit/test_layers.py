"""The layering rules of `loop` (docs/architecture.md), enforced.

Run in a fresh interpreter, like the offline test, so that this test process's own imports do not
count. Two checks, both in that subprocess:

- every ``import`` statement in every module of ``loop/`` and ``flows/`` (top level or inside a
  function) is read from the source and checked against `RULES` (for ``loop/``) and against
  the rule that ``flows/`` never imports the command line: a lazy import breaks a rule as much
  as a top-level one;
- every core module is imported, and none of the heavy or forbidden packages may be in
  ``sys.modules`` afterwards (this catches a rule broken through a third-party package too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import loop

REPO = Path(loop.__file__).resolve().parent.parent

# (imported package, where in loop/ it may be imported: a folder ending in "/" or one file).
RULES: tuple[tuple[str, str], ...] = (
    ("prefect", "loop/cli/"),
    ("prefect_dask", "loop/cli/"),
    ("flows", "loop/cli/"),
    ("loop.cli", "loop/cli/"),
    ("ultralytics", "loop/model/"),
    ("mlflow", "loop/tracking/"),
    ("matplotlib", "loop/report/plots.py"),
    ("label_studio_sdk", "loop/labelstudio/"),
)
# Importing any core module (everything in loop/ outside loop/cli/) must not load these.
NOT_LOADED_BY_CORE = ("prefect", "flows", "ultralytics", "torch", "mlflow", "matplotlib")

_CHECKER = r"""
import ast, importlib, json, sys
from pathlib import Path

repo = Path(sys.argv[1])
imports = []  # [file, line, module]
core = []
for path in sorted([*(repo / "loop").rglob("*.py"), *(repo / "flows").rglob("*.py")]):
    rel = path.relative_to(repo).as_posix()
    parts = list(path.relative_to(repo).with_suffix("").parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    name = ".".join(parts)
    if rel.startswith("loop/") and not rel.startswith("loop/cli/"):
        core.append(name)
    package = parts if is_pkg else parts[:-1]
    for node in ast.walk(ast.parse(path.read_text(), rel)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                imports.append([rel, node.lineno, alias.name])
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package[: len(package) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            imports.append([rel, node.lineno, base])
            for alias in node.names:
                imports.append([rel, node.lineno, f"{base}.{alias.name}"])
for name in core:
    importlib.import_module(name)
loaded = sorted({m.split(".")[0] for m in sys.modules})
# Where each loaded loop module came from (an installed copy elsewhere must not stand in).
files = sorted(
    {getattr(m, "__file__", None) or "" for n, m in list(sys.modules.items()) if n.split(".")[0] == "loop"}
)
print(json.dumps({"imports": imports, "core": core, "loaded": loaded, "files": files}))
"""


@pytest.fixture(scope="module")
def scan() -> dict[str, list]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "OMP_"))}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-c", _CHECKER, str(REPO)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out: dict[str, list] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _imports_of(module: str, scan: dict[str, list]) -> list[tuple[str, int, str]]:
    return [
        (f, line, name)
        for f, line, name in scan["imports"]
        if name == module or name.startswith(module + ".")
    ]


def test_the_scan_sees_the_package(scan: dict[str, list]) -> None:
    # A scan that found nothing would pass every rule below.
    assert "loop.project" in scan["core"] and "loop.cli.main" not in scan["core"]
    assert ("loop/cli/main.py", "flows.cycle") in {(f, n) for f, _, n in scan["imports"]}
    assert any(f.startswith("loop/model/") and n == "ultralytics" for f, _, n in scan["imports"])


@pytest.mark.parametrize(("module", "allowed"), RULES)
def test_import_only_where_allowed(module: str, allowed: str, scan: dict[str, list]) -> None:
    def ok(path: str) -> bool:
        return path.startswith(allowed) if allowed.endswith("/") else path == allowed

    found = _imports_of(module, scan)
    wrong = [
        f"{f}:{n} imports {name}" for f, n, name in found if f.startswith("loop/") and not ok(f)
    ]
    assert not wrong, f"only {allowed} may import {module}:\n" + "\n".join(wrong)


def test_flows_never_import_the_command_line(scan: dict[str, list]) -> None:
    assert any(f.startswith("flows/") for f, _, _ in scan["imports"])
    wrong = [
        f"{f}:{n} imports {m}"
        for f, n, m in _imports_of("loop.cli", scan)
        if f.startswith("flows/")
    ]
    assert not wrong, (
        "flows/ orchestrates the core; only the command line runs flows:\n" + "\n".join(wrong)
    )


def test_importing_the_core_loads_no_orchestrator_and_no_heavy_stack(
    scan: dict[str, list],
) -> None:
    loaded = set(scan["loaded"])
    assert not loaded & set(NOT_LOADED_BY_CORE), sorted(loaded & set(NOT_LOADED_BY_CORE))
    assert "loop" in loaded and len(scan["core"]) > 30
    elsewhere = [f for f in scan["files"] if not Path(f).resolve().is_relative_to(REPO / "loop")]
    assert not elsewhere, f"loop modules loaded from outside {REPO}: {elsewhere}"

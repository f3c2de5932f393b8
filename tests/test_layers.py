"""The package's floors: calls flow down, and the light floor imports nothing heavy.

The light floor (config, compose, validate, checks, resources, rundir, ...) is what `--help`, `--cfg job`,
`--dry-run` and every refusal of bad input run on, so it must never import torch, megatron or wandb. The rules
between rooms (docs/design.md) are read from the source, so a new import that breaks one fails here.
"""

from __future__ import annotations

import ast
import json

import pytest
from ut_helpers import REPO, run_python

PACKAGE = REPO / "unified_train"
LIGHT = [
    "config",
    "compose",
    "validate",
    "checks",
    "resources",
    "rundir",
    "datafiles",
    "slurm",
    "mcore_fields",
    "compat",
    "backends",
    "kernels",
    "results.advice",
    "results.compare",
    "results.numerics",
    "results.panels",
    "results.metrics",
    "results.wandb_runs",
    "__main__",
]
HEAVY = ("torch", "megatron", "wandb", "transformer_engine", "matplotlib")


@pytest.mark.parametrize("module", LIGHT)
def test_light_module_imports_nothing_heavy(module, tmp_path):
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module('unified_train.{module}')\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))\n"
    )
    proc = run_python(code, tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == []


def _imports() -> dict[str, set[str]]:
    """Every module of the package -> the package modules it imports (at module level or inside functions)."""
    names = {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p for p in PACKAGE.rglob("*.py")
    }
    graph = {}
    for name, path in names.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in names:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    found.add(target)
        graph[name] = found
    return graph


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_rooms_import_only_downwards():
    graph = _imports()
    for module, targets in graph.items():
        rooms = {_room(t) for t in targets}
        top = {"unified_train.__main__"} | ({"unified_train.app"} if module != "unified_train.__main__" else set())
        assert not targets & top, module  # only the CLI hands over to app; nothing imports the CLI
        if _room(module) in ("backends", "kernels"):
            assert not rooms & {"runtime", "modes", "results", "app"}, (module, targets)
        if _room(module) == "results":
            assert not rooms & {"runtime", "modes", "backends", "kernels", "app"}, (module, targets)
    assert "unified_train.results.panels" not in graph["unified_train.results.compare"]
    assert "unified_train.results.compare" not in graph["unified_train.results.panels"]


def test_no_import_circles():
    graph = _imports()
    state: dict[str, str] = {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            assert state.get(target) != "open", " -> ".join([*path, module, target])
            if target not in state:
                visit(target, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])

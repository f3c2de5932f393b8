"""Helpers shared by the CPU tests (kept out of conftest.py so tests can import them by a unique name)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
PRESETS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


def compose(overrides=()):
    """The real config, composed from conf/ against the registered schema."""
    from unified_train import sweep

    return sweep._compose(None, "config", list(overrides))


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["TORCHDYNAMO_DISABLE"] = "1"
    env.pop("PYTHONPATH", None)  # the package is installed (editable) in the venv; nothing from the cwd
    env.pop("WORLD_SIZE", None)
    return env


def run_cli(args, cwd, *, python_flags=(), timeout=300) -> subprocess.CompletedProcess:
    """`python -m unified_train ARGS` in a fresh interpreter, from `cwd`."""
    return subprocess.run([sys.executable, *python_flags, "-m", "unified_train", *args], cwd=cwd,
                          env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def run_python(code: str, cwd, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)

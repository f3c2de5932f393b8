"""One formatting and lint style for the whole tree (ruff, settings in pyproject.toml), held by the test suite so
that `.ci/run` checks it with the two README commands."""

from __future__ import annotations

import subprocess
import sys

from ut_helpers import REPO


def test_ruff_lint_is_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_ruff_format_is_applied():
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "."], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:]

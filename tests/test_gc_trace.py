"""scripts/gc_trace.py: the collections of a real child process, with and without its heap freeze."""

from __future__ import annotations

import json
import subprocess
import sys

from ut_helpers import REPO

# Builds a long-lived heap, freezes it (as runtime.job.run_job does before training), then forces a full collection.
PROGRAM = """
import gc, sys
keep = [[i] for i in range(200_000)]
before = gc.get_freeze_count()  # the interpreter freezes a few hundred objects of its own at start
gc.freeze()
gc.collect()
print(gc.get_freeze_count() - before)
sys.exit(int(sys.argv[1]))
"""


def _gc_trace(out, *argv, stdin=None):
    """scripts/gc_trace.py OUT argv...: the finished child process and the trace it wrote."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gc_trace.py"), str(out), *argv],
        input=stdin,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc, json.loads(out.read_text())


def _trace(tmp_path, *flags, status=0):
    program = tmp_path / "program.py"
    program.write_text(PROGRAM)
    return _gc_trace(tmp_path / f"gc{'-'.join(flags)}.json", *flags, str(program), str(status))


def test_records_every_collection_with_its_start_and_duration(tmp_path):
    proc, trace = _trace(tmp_path)
    assert proc.returncode == 0 and int(proc.stdout) >= 200_000
    full = [c for c in trace["collections"] if c[0] == 2]
    assert full, "the program's gc.collect() is a full collection"
    _, start, seconds, _ = full[-1]
    assert 0 < start <= trace["exit_s"] and seconds >= 0


def test_no_freeze_disables_the_programs_freeze_and_keeps_its_exit_status(tmp_path):
    proc, trace = _trace(tmp_path, "--no-freeze", status=3)
    assert proc.returncode == 3 and int(proc.stdout) == 0
    _, frozen = _trace(tmp_path)
    assert trace["frozen_at_exit"] < frozen["frozen_at_exit"]
    assert any(c[0] == 2 for c in trace["collections"])


def test_runs_a_module_as_python_dash_m_does(tmp_path):
    proc, trace = _gc_trace(tmp_path / "gc.json", "-m", "json.tool", stdin='{"a": [1, 2]}')
    assert proc.returncode == 0 and json.loads(proc.stdout) == {"a": [1, 2]}
    assert trace["exit_s"] > 0

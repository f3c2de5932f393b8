"""megatron-core 0.19.2's DistributedOptimizer with torch's Adam (no apex, no TE: the GPU node's setup) cannot resume,
and once it loads, its Adam step is wrong. Both reproduced with the real optimizer, a torch_dist checkpoint and a
gloo group on the CPU (tests/resume_optimizer_job.py), and both fixed by unified_train.compat (trap 3)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from unified_train import compat

JOB = os.path.join(os.path.dirname(__file__), "resume_optimizer_job.py")
AFFECTED = importlib.metadata.version("megatron-core") in compat.ADAM_STEP_BUG_VERSIONS and not any(
    importlib.util.find_spec(name) for name in ("transformer_engine", "apex")
)
pytestmark = pytest.mark.skipif(not AFFECTED, reason="megatron-core here uses a fused Adam or is not 0.19.2")


def save_then_resume(tmp_path, variant: str) -> dict:
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    done = subprocess.run([sys.executable, JOB, str(checkpoint), variant], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_upstream_cannot_load_a_checkpoint(tmp_path):
    # The assertion every resume on the GPU node hit, on both stacks.
    assert save_then_resume(tmp_path, "upstream") == {"load": "AssertionError at distrib_optimizer.py:839"}


def test_upstream_load_restarts_adams_step(tmp_path):
    # With only the assertion fixed, the loaded step is the template's 0, shared by all 4 parameters: one step later
    # it reads 4, and the weights differ from the run that never stopped.
    report = save_then_resume(tmp_path, "upstream_load")
    assert report["steps_after_load"] == [0.0] and report["shared_step_tensors"]
    assert report["steps_after_resumed_step"] == [4.0]
    assert not report["bitwise_equal_after_step_3"]


def test_patched_resume_equals_the_continuous_run(tmp_path):
    report = save_then_resume(tmp_path, "patched")
    assert report == {
        "load": "ok",
        "steps_after_load": [2.0],
        "shared_step_tensors": False,
        "steps_after_resumed_step": [3.0],
        "bitwise_equal_after_step_3": True,
    }

"""The verdict of a pair that is not bitwise, on a GPU (marker `gpu`): the MoE pair, whose token dispatch is not
repeatable, measured against each backend's noise floor (compare.repeats); and a pair whose jobs fail at run time,
reported in comparison.md with the multirun ending non-zero."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from gpu_helpers import REPO, job_dirs, publish

from unified_train import rundir

pytestmark = pytest.mark.gpu

# The MoE pair: DeepSeek-V2-Lite's layout at 2 layers (dense, then 64 experts top-6), MLA off.
MOE = [
    "model=deepseek_v2_lite",
    "model.num_layers=2",
    "model.multi_latent_attention=false",
    "model.num_query_groups=16",
    "train.iters=5",
    "logger=none",
    "checkpoint=none",
]


def _multirun(tmp_path, name: str, *overrides: str) -> tuple[int, str, dict]:
    sweep = tmp_path / name
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TORCHDYNAMO_DISABLE", None)
    with open(tmp_path / f"{name}.log", "w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "unified_train", "-m", "backend=mlm,bridge", f"hydra.sweep.dir={sweep}", *overrides],
            cwd=REPO,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    report = (sweep / rundir.COMPARISON_MD).read_text()
    print(report)
    publish(name, report)
    return proc.returncode, report, job_dirs(sweep)


def test_moe_pair_is_within_noise_with_repeats(tmp_path):
    code, report, dirs = _multirun(tmp_path, "moe_repeats", *MOE, "compare.repeats=2")
    assert set(dirs) == {"mlm", "bridge"}
    for job_dir in dirs.values():
        assert len(rundir.read_repeats(str(job_dir))) == 2
    assert "verdict: **within noise**" in report, report
    assert "MoE token dispatch" in report  # the advice: the part that varies, and determinism=strict
    assert code == 0


def test_a_pair_whose_jobs_fail_at_run_time_is_reported(tmp_path):
    """A learning rate that sends the loss to NaN: both stacks stop the job (their NaN check), after the up-front
    checks passed. The comparison still gets written, naming each failed job and why, and the multirun fails.
    Both failures are the NaN check's own (train.rerun_mode=disabled on both stacks), not a later error."""
    code, report, dirs = _multirun(
        tmp_path, "nan_pair", "optim.lr=1e9", "optim.min_lr=0", "logger=none", "checkpoint=none"
    )
    assert code != 0
    assert "## failed jobs" in report and "mlm failed" in report and "bridge failed" in report, report
    for job_dir in dirs.values():
        failure = rundir.read_failure(str(job_dir))
        assert failure is not None and "NaN" in failure["message"], failure


def test_moe_pair_under_strict_determinism_is_exact(tmp_path):
    code, report, _ = _multirun(tmp_path, "moe_strict", *MOE, "determinism=strict")
    assert "verdict: **exact (bitwise)**" in report and code == 0, report

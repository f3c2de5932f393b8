"""mode=preflight on CPU (gloo): every rank builds both native configs, diffs them, rendezvous, all-reduces,
reports; then one summary per job."""

from __future__ import annotations

import json
import subprocess
import sys

from ut_helpers import run_cli, subprocess_env

from unified_train.results import compare
from unified_train.runtime import env


def test_two_spawned_ranks_report_and_summarize(tmp_path):
    run_dir = tmp_path / "job"
    proc = run_cli(
        ["mode=preflight", "parallel.dp=2", f"hydra.run.dir={run_dir}"],
        tmp_path,
        timeout=400,
        env={"NCCL_NVLS_ENABLE": "1"},
    )  # a shell that would turn NVLink multicast on
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("preflight: OK: ranks [0, 1] of world 2") and proc.stdout.count("\n") == 1
    reports = [json.loads((run_dir / "preflight" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1] and all(r["world_size"] == 2 for r in reports)
    assert all(r["all_reduce_ok"] and r["parity_differences"] == [] and r["parity_fields"] > 400 for r in reports)
    # Every spawned rank runs with NVLink multicast off (NCCL, torch symmetric memory, NVSHMEM) and the rest of
    # the job environment, whatever the parent shell had.
    assert all(r["process_env"] == env.BASE_ENV for r in reports)
    assert reports[0]["process_env"]["NCCL_NVLS_ENABLE"] == "0"
    summary = json.loads((run_dir / "preflight" / "summary.json").read_text())
    assert summary["ok"] is True and summary["devices"] == ["cpu"]


def test_a_parity_difference_fails_the_preflight(tmp_path):
    run_dir = tmp_path / "job"
    proc = run_cli(
        ["mode=preflight", "backend.extra=[--adam-beta2,0.999]", f"hydra.run.dir={run_dir}"], tmp_path, timeout=400
    )
    assert proc.returncode == 1
    # The one line names the differing fields, and is all of stdout (the stacks' logs go to stderr).
    (line,) = proc.stdout.splitlines()
    assert line.startswith("preflight: FAILED:") and "parity DIFFERS in optimizer.adam_beta2" in line, line
    report = json.loads((run_dir / "preflight" / "rank_0.json").read_text())
    assert "optimizer.adam_beta2" in report["parity_differences"] and report["world_size"] == 1
    summary = json.loads((run_dir / "preflight" / "summary.json").read_text())
    assert summary["parity_differences"] == report["parity_differences"]
    text, ok = compare.report([str(run_dir)])  # the comparison's preflight table names them too
    assert not ok and "DIFFERS in optimizer.adam_beta2" in text


def test_under_torchrun_every_rank_checks_and_rank_0_sums_up(tmp_path):
    """Started by an existing launcher (torchrun sets the rank variables): no ranks are spawned, each of the two
    processes is one rank."""
    run_dir = tmp_path / "job"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=2",
            "-m",
            "unified_train",
            "mode=preflight",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("preflight: OK: ranks [0, 1] of world 2") == 1  # rank 0 only
    reports = [json.loads((run_dir / "preflight" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1] and all(r["world_size"] == 2 and r["all_reduce_ok"] for r in reports)
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == 2

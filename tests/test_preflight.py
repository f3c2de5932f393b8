"""mode=preflight on CPU (gloo): every rank builds both native configs, diffs them, rendezvous, all-reduces,
reports; then one summary per job."""

from __future__ import annotations

import json

from ut_helpers import run_cli


def test_two_spawned_ranks_report_and_summarize(tmp_path):
    run_dir = tmp_path / "job"
    proc = run_cli(["mode=preflight", "parallel.dp=2", f"hydra.run.dir={run_dir}"], tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "preflight: OK: ranks [0, 1] of world 2" in proc.stdout
    reports = [json.loads((run_dir / "preflight" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1] and all(r["world_size"] == 2 for r in reports)
    assert all(r["all_reduce_ok"] and r["parity_differences"] == [] and r["parity_fields"] > 400 for r in reports)
    summary = json.loads((run_dir / "preflight" / "summary.json").read_text())
    assert summary["ok"] is True and summary["devices"] == ["cpu"]


def test_a_parity_difference_fails_the_preflight(tmp_path):
    run_dir = tmp_path / "job"
    proc = run_cli(["mode=preflight", "backend.extra=[--adam-beta2,0.999]", f"hydra.run.dir={run_dir}"], tmp_path,
                   timeout=400)
    assert proc.returncode == 1
    assert "parity DIFFERS" in proc.stdout
    report = json.loads((run_dir / "preflight" / "rank_0.json").read_text())
    assert "optimizer.adam_beta2" in report["parity_differences"] and report["world_size"] == 1

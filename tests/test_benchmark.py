"""scripts/benchmark.py's bookkeeping (the GPU runs themselves happen on the GPU node): run order and the
medians and ratios its table reports."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys

import pytest
from ut_helpers import LOSSES, REPO, write_run_dir

from unified_train.results import metrics

spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts" / "benchmark.py")
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)


def test_repeats_alternate_their_order():
    assert benchmark.schedule(["a", "b", "c"], 3) == [
        (0, "a"),
        (0, "b"),
        (0, "c"),
        (1, "c"),
        (1, "b"),
        (1, "a"),
        (2, "a"),
        (2, "b"),
        (2, "c"),
    ]
    assert benchmark.schedule(["a", "b"], 1) == [(0, "a"), (0, "b")]


def _run(steady, first=10.0, wall=60.0, failed=False, iteration_1=4.0):
    if failed:
        return {"failed": True, "wall_s": 5.0, "iterations": 0, **dict.fromkeys(benchmark.TIMINGS)}
    return {
        "steady_iter_s": steady,
        "first_iteration_s": first,
        "iteration_1_s": iteration_1,
        "wall_s": wall,
        "iterations": 20,
    }


def test_table_reports_medians_ratios_and_failures(tmp_path):
    runs = {
        "unified mlm": [
            _run(0.12, first=12.0, wall=70.0, iteration_1=5.5),
            _run(0.10, first=11.0, wall=66.0),
            _run(0.11, wall=64.0, iteration_1=5.0),
        ],
        "native mlm": [_run(0.10, first=10.0), _run(0.10, first=10.0), _run(0.0, failed=True)],
        "unified bridge": [_run(0.09, wall=60.0)],
        "native bridge": [_run(0.09)],
        "pair in one process": [_run(0.10, wall=100.0)],
    }
    summaries = {
        b: {"tokens_per_iteration": 16384, "flops_per_iteration": 2e12, "world_size": 1} for b in ("mlm", "bridge")
    }
    text = benchmark.write_table("t", tmp_path, 800.0, runs, summaries)
    results = json.loads((tmp_path / "t.json").read_text())["results"]
    mlm = results["unified mlm"]
    assert mlm["steady_iter_s"] == pytest.approx(0.11) and mlm["steady_spread"] == [0.10, 0.12]
    assert mlm["first_iteration_s"] == 11.0 and mlm["wall_s"] == 66.0 and mlm["iteration_1_s"] == 5.0
    assert mlm["throughput_vs_native"] == pytest.approx(0.10 / 0.11)  # the failed native run is left out
    assert mlm["first_iteration_vs_native"] == pytest.approx(1.1)
    assert mlm["tflops_per_gpu"] == pytest.approx(2e12 / 0.11 / 1e12) and mlm["mfu"] == pytest.approx(
        mlm["tflops_per_gpu"] / 800
    )
    assert results["native mlm"]["failed"] == 1 and results["native mlm"]["runs"] == 3
    assert results["pair in one process"]["wall_vs_two_processes"] == pytest.approx(100.0 / (66.0 + 60.0))
    assert "| unified mlm | 3 | 0.1100 | 0.1000-0.1200 |" in text
    assert "| native mlm | 3 | 0.1000 |" in text and "1 FAILED" in text
    assert "| 11.0 | 5.00 | 66.0 | throughput" in text  # first iteration, iteration 1, wall
    assert (tmp_path / "t.md").read_text().strip() == text


def test_a_run_is_timed_from_its_own_lines(tmp_path):
    """The pretrain line (as unified_train and native_baseline.py print it) and the stack's iteration lines."""
    lines = [metrics.pretrain_called_line("unified_train", {"job_started": 3.0, "pretrain_called": 12.34})]
    lines += [
        f" [t] iteration {i:8d}/      10 | consumed samples: {32 * i} | elapsed time per iteration (ms): "
        f"{500.0 if i == 1 else 100.0 + i} | learning rate: 3.0E-04 |"
        for i in range(1, 11)
    ]
    code = f"print({chr(10).join(lines)!r})"
    result = benchmark.run([sys.executable, "-c", code], tmp_path / "run.log")
    assert result["to_pretrain_s"] == 12.34 and result["iterations"] == 10 and result["iteration_1_s"] == 0.5
    assert result["steady_iter_s"] == statistics.median([100.0 + i for i in range(4, 11)]) / 1000
    assert 0 < result["first_iteration_s"] <= result["wall_s"]
    logged = (tmp_path / "run.log").read_text().splitlines()
    assert [line.split("] ", 1)[1] for line in logged] == lines  # every line kept, each after its time
    stamps = [float(line[1:].split("]", 1)[0]) for line in logged]
    assert 0 < stamps[0] <= stamps[-1] <= result["wall_s"] and stamps == sorted(stamps)
    failed = benchmark.run([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "failed.log")
    assert failed["failed"] and failed["to_pretrain_s"] is None


def test_run_to_run_names_each_run_that_differs(tmp_path):
    write_run_dir(tmp_path / "unified_mlm_0", "mlm")
    write_run_dir(tmp_path / "pair_0" / "1_bridge", "bridge")
    assert benchmark.run_to_run(tmp_path) == (
        "Run-to-run: all 2 unified_train runs are bitwise identical to pair_0/1_bridge "
        "(lm loss, grad norm, lr at every iteration)."
    )
    write_run_dir(tmp_path / "unified_bridge_0", "bridge", losses=[*LOSSES[:2], LOSSES[2] + 2**-20, *LOSSES[3:]])
    write_run_dir(tmp_path / "unified_bridge_1", "bridge", losses=LOSSES[:3])  # stopped early
    assert benchmark.run_to_run(tmp_path) == (
        "Run-to-run: 2 of 3 unified_train runs differ from pair_0/1_bridge: unified_bridge_0 (from iteration 3), "
        "unified_bridge_1 (3 of 5 iterations)."
    )


def test_run_to_run_compares_runs_of_one_core_attention(tmp_path):
    """Runs with another kernels.attention train other numerics: they are compared among themselves only."""
    write_run_dir(tmp_path / "unified_mlm_flex_0", "mlm", attention="flex")
    write_run_dir(tmp_path / "unified_bridge_flex_0", "bridge", attention="flex")
    write_run_dir(tmp_path / "unified_mlm_sdpa_0", "mlm", attention="sdpa", losses=[x + 2**-20 for x in LOSSES])
    assert benchmark.run_to_run(tmp_path).splitlines() == [
        "Run-to-run (flex attention): all 2 unified_train runs are bitwise identical to unified_bridge_flex_0 "
        "(lm loss, grad norm, lr at every iteration).",
        "Run-to-run (sdpa attention): fewer than two unified_train runs finished, nothing to compare.",
    ]

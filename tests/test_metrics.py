"""The metrics sink: one record per iteration, eval losses attached to the iteration they evaluated."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from unified_train import rundir
from unified_train.results import metrics


def _sink(tmp_path, write=True):
    return metrics.MetricsSink(str(tmp_path), backend="mlm", tokens_per_iteration=32 * 512, world_size=1, write=write)


def test_one_record_per_iteration_with_val_loss_on_the_evaluated_iteration(tmp_path):
    sink = _sink(tmp_path)
    sink.set_flops_per_iteration(2e12)
    for it in range(1, 6):
        sink.record_train(it, loss=10.0 - it / 8, grad_norm=1.5, lr=3e-4 * it / 5, seconds=0.5)
        if it in (2, 4):
            sink.record_eval("valid", 9.0 + it / 16)
    sink.record_eval("final_valid", 8.25)
    sink.record_eval("test", 8.5)
    summary = sink.close(pair_id="abc123", world_size=1)

    records = rundir.read_metrics(str(tmp_path))
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5]
    assert {r["iteration"]: r.get("val_loss") for r in records} == {1: None, 2: 9.125, 3: None, 4: 9.25, 5: None}
    r1 = records[0]
    assert r1["lm loss"] == 10.0 - 1 / 8 and r1["grad_norm"] == 1.5 and r1["lr"] == 3e-4 / 5
    assert r1["tokens_per_s"] == 32 * 512 / 0.5
    assert r1["tflops_per_gpu"] == 2e12 / 0.5 / 1 / 1e12

    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["iterations"] == 5 and on_disk["backend"] == "mlm" and on_disk["pair_id"] == "abc123"
    assert on_disk["final_valid_loss"] == 8.25 and on_disk["test_loss"] == 8.5
    assert "time_to_first_iteration_s" in on_disk and on_disk["wall_time_s"] >= 0
    assert summary["iterations"] == 5


def test_floats_round_trip_bitwise(tmp_path):
    sink = _sink(tmp_path)
    value = 10.372841835021973  # a float32 loss as a Python float
    sink.record_train(1, loss=value, grad_norm=0.1 + 0.2, lr=None, seconds=0.0)
    sink.close()
    (record,) = rundir.read_metrics(str(tmp_path))
    assert record["lm loss"] == value and record["grad_norm"] == 0.1 + 0.2
    assert record["lr"] is None and record["tokens_per_s"] is None


def test_non_finite_values_are_kept_as_strings(tmp_path):
    sink = _sink(tmp_path)
    sink.record_train(1, loss=float("nan"), grad_norm=float("inf"), lr=1e-4, seconds=1.0)
    sink.close()
    (record,) = rundir.read_metrics(str(tmp_path))
    assert record["lm loss"] == "nan" and record["grad_norm"] == "inf"


def test_records_stream_to_disk_one_iteration_behind(tmp_path):
    """A record is written once the next iteration starts (an eval may still attach to it) or at close."""
    sink = _sink(tmp_path)
    sink.record_train(1, loss=1.0, grad_norm=1.0, lr=1.0, seconds=1.0)
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    sink.record_train(2, loss=2.0, grad_norm=1.0, lr=1.0, seconds=1.0)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    sink.close()
    assert len(rundir.read_metrics(str(tmp_path))) == 2


def test_non_writing_rank_writes_nothing(tmp_path):
    sink = _sink(tmp_path, write=False)
    sink.record_train(1, loss=1.0, grad_norm=1.0, lr=1.0, seconds=1.0)
    summary = sink.close()
    assert summary["iterations"] == 1
    assert list(tmp_path.iterdir()) == []


def test_eval_before_any_iteration_is_a_final_value(tmp_path):
    sink = _sink(tmp_path)
    sink.record_eval("valid", 5.0)  # nothing pending: kept in the summary rather than lost
    summary = sink.close()
    assert summary["valid_loss"] == 5.0 and summary["iterations"] == 0


def test_startup_phases_are_timed_from_the_process_start(tmp_path):
    sink = _sink(tmp_path)
    sink.mark("job_started", at=1.5)
    sink.mark("pretrain_called")
    sink.record_train(1, loss=10.0, grad_norm=1.0, lr=3e-4, seconds=0.5)
    sink.record_train(2, loss=9.0, grad_norm=1.0, lr=3e-4, seconds=0.5)
    sink.close()
    phases = json.loads((tmp_path / "summary.json").read_text())["startup_s"]
    assert list(phases) == ["job_started", "pretrain_called", "first_iteration"]
    assert phases["job_started"] == 1.5 and 0 < phases["pretrain_called"] <= phases["first_iteration"]

    # The clock starts when the process does (as for the benchmark that starts it), not when the module loads.
    start = time.perf_counter()
    code = (
        "import time; time.sleep(0.5)\n"
        "from unified_train.results.metrics import process_seconds; print(process_seconds())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 0.5 <= float(out) <= time.perf_counter() - start + 0.02  # /proc counts in 10 ms ticks

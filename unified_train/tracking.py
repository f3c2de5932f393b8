"""Metrics sink: one JSON record per iteration in `metrics.jsonl`, the same schema for both backends.

Values are captured in code from each stack's hooks (never parsed from stdout: MLM prints iteration 2 as the
mean of iterations 1 and 2). Floats are written with `repr` precision, so a bitwise comparison of two runs
can be made from the files alone.
"""

from __future__ import annotations

import json
import math
import os
import time


class MetricsSink:
    """Collects per-iteration train metrics and eval losses; writes only on the rank that holds the loss."""

    def __init__(self, run_dir: str, *, backend: str, tokens_per_iteration: int, world_size: int, write: bool):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.summary_path = os.path.join(run_dir, "summary.json")
        self.backend = backend
        self.tokens_per_iteration = tokens_per_iteration
        self.world_size = world_size
        self.write = write
        self.flops_per_iteration: float | None = None
        self.started = time.perf_counter()
        self.first_iteration_done: float | None = None
        self.pending: dict | None = None
        self.final: dict[str, float] = {}
        self.records: list[dict] = []
        self._file = open(self.path, "w") if write else None

    def set_flops_per_iteration(self, flops: float) -> None:
        self.flops_per_iteration = float(flops)

    def record_train(self, iteration: int, loss, grad_norm, lr, seconds: float) -> None:
        self._flush()
        if self.first_iteration_done is None:
            self.first_iteration_done = time.perf_counter()
        record = {"iteration": int(iteration), "lm loss": _num(loss), "grad_norm": _num(grad_norm),
                  "lr": _num(lr), "iter_time_s": seconds,
                  "tokens_per_s": self.tokens_per_iteration / seconds if seconds > 0 else None}
        if self.flops_per_iteration is not None and seconds > 0:
            record["tflops_per_gpu"] = self.flops_per_iteration / seconds / self.world_size / 1e12
        self.pending = record

    def record_eval(self, kind: str, loss: float) -> None:
        """kind: 'valid' (in-loop, attached to the last iteration), 'final_valid' or 'test' (end of run)."""
        if kind == "valid" and self.pending is not None:
            self.pending["val_loss"] = _num(loss)
        else:
            self.final[f"{kind}_loss"] = _num(loss)

    def _flush(self) -> None:
        if self.pending is None:
            return
        self.records.append(self.pending)
        if self._file:
            self._file.write(json.dumps(self.pending) + "\n")
            self._file.flush()
        self.pending = None

    def close(self, **summary) -> dict:
        self._flush()
        if self._file:
            self._file.close()
        out = {"backend": self.backend, "iterations": len(self.records), **self.final,
               "wall_time_s": time.perf_counter() - self.started, "world_size": self.world_size,
               "tokens_per_iteration": self.tokens_per_iteration, "flops_per_iteration": self.flops_per_iteration,
               **summary}
        if self.first_iteration_done is not None:
            out["time_to_first_iteration_s"] = self.first_iteration_done - self.started
        if self.write:
            with open(self.summary_path, "w") as f:
                json.dump(out, f, indent=2)
        return out


def _num(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else str(value)


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

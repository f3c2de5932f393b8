"""Metrics sink: one JSON record per iteration in `metrics.jsonl`, the same schema for both backends.

Values are captured in code from each stack's hooks (never parsed from stdout: MLM prints iteration 2 as the
mean of iterations 1 and 2). Floats are written with `repr` precision, so a bitwise comparison of two runs
can be made from the files alone.
"""

from __future__ import annotations

import math
import os
import time

from unified_train import rundir


class MetricsSink:
    """Collects per-iteration train metrics and eval losses; writes only on the rank that holds the loss."""

    def __init__(
        self,
        run_dir: str,
        *,
        backend: str,
        tokens_per_iteration: int,
        world_size: int,
        write: bool,
        continued: bool = False,
        unified_config: dict | None = None,
        on_training_started=None,
    ):
        self.run_dir = run_dir
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
        self.unified_config = unified_config or {}
        self.on_training_started = on_training_started
        self.startup: dict[str, float | None] = {}  # phase -> seconds since this process started
        self._file = rundir.open_metrics(run_dir, continued) if write else None

    def mark(self, phase: str, at: float | None = None) -> None:
        """Record when a start-up phase ended (now, or `at`), in seconds since this process started."""
        self.startup[phase] = process_seconds() if at is None else at

    def training_started(self) -> None:
        """Called by the backend once the stack is set up (its W&B run, if any, exists on the last rank)."""
        if self.on_training_started is not None:
            self.on_training_started(self.unified_config)

    def set_flops_per_iteration(self, flops: float) -> None:
        self.flops_per_iteration = float(flops)

    def record_train(self, iteration: int, loss, grad_norm, lr, seconds: float) -> None:
        self._flush()
        if self.first_iteration_done is None:
            self.first_iteration_done = time.perf_counter()
            self.mark("first_iteration")
        record = {
            "iteration": int(iteration),
            "lm loss": _num(loss),
            "grad_norm": _num(grad_norm),
            "lr": _num(lr),
            "iter_time_s": seconds,
            "tokens_per_s": self.tokens_per_iteration / seconds if seconds > 0 else None,
        }
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
            rundir.append_metric(self._file, self.pending)
        self.pending = None

    def close(self, **summary) -> dict:
        self._flush()
        if self._file:
            self._file.close()
        out = {
            "backend": self.backend,
            "iterations": len(self.records),
            **self.final,
            "wall_time_s": time.perf_counter() - self.started,
            "world_size": self.world_size,
            "tokens_per_iteration": self.tokens_per_iteration,
            "flops_per_iteration": self.flops_per_iteration,
            **summary,
        }
        if self.first_iteration_done is not None:
            out["time_to_first_iteration_s"] = self.first_iteration_done - self.started
        if self.startup:
            out["startup_s"] = dict(self.startup)
        if self.write:
            rundir.write_summary(self.run_dir, out)
        return out


def process_seconds() -> float | None:
    """Seconds since this process started, from Linux's /proc (None elsewhere). Start-up phases are timed from
    there, so they include the interpreter's and Hydra's start, as a benchmark that starts the process sees."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def pretrain_called_line(program: str, phases: dict[str, float | None] | None = None) -> str:
    """The line scripts/benchmark.py splits the time to the first iteration at, printed as the stack's `pretrain`
    is called (by unified_train, with its earlier start-up phases, and by scripts/native_baseline.py)."""
    earlier = dict(phases or {})
    called = earlier.pop("pretrain_called", None)
    line = (
        f"{program}: pretrain called {_seconds(process_seconds() if called is None else called)} s after process start"
    )
    if earlier:
        line += f" (seconds since start: {', '.join(f'{k} {_seconds(v)}' for k, v in earlier.items())})"
    return line


def _seconds(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def _num(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else str(value)

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

    def __init__(self, run_dir: str, *, backend: str, tokens_per_iteration: int, world_size: int, write: bool,
                 unified_config: dict | None = None):
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
        self.unified_config = unified_config or {}
        self.startup: dict[str, float | None] = {}  # phase -> seconds since this process started
        self._file = open(self.path, "w") if write else None

    def mark(self, phase: str, at: float | None = None) -> None:
        """Record when a start-up phase ended (now, or `at`), in seconds since this process started."""
        self.startup[phase] = process_seconds() if at is None else at

    def training_started(self) -> None:
        """Called by the backend once the stack is set up (its W&B run, if any, exists on the last rank)."""
        add_unified_config(self.unified_config)

    def set_flops_per_iteration(self, flops: float) -> None:
        self.flops_per_iteration = float(flops)

    def record_train(self, iteration: int, loss, grad_norm, lr, seconds: float) -> None:
        self._flush()
        if self.first_iteration_done is None:
            self.first_iteration_done = time.perf_counter()
            self.mark("first_iteration")
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
        if self.startup:
            out["startup_s"] = dict(self.startup)
        if self.write:
            with open(self.summary_path, "w") as f:
                json.dump(out, f, indent=2)
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
    line = f"{program}: pretrain called {_seconds(process_seconds() if called is None else called)} s after process start"
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


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# W&B: both stacks call wandb.init(dir, name, project, config, entity) themselves, on the last rank. Grouping
# travels in the environment that call reads, so the runs carry it without touching either stack.

_WANDB_KEYS = ("WANDB_RUN_GROUP", "WANDB_JOB_TYPE", "WANDB_TAGS", "WANDB_MODE", "WANDB_DIR", "WANDB_SILENT")


def run_name(cfg) -> str:
    p = cfg.parallel
    return f"{cfg.model.name}-tp{p.tp}-pp{p.pp}-{cfg.backend.name}"


def wandb_mode(cfg) -> str:
    if cfg.logger.wandb.mode:
        return cfg.logger.wandb.mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def wandb_env(cfg, run_dir: str, sweep_id: str) -> dict[str, str | None]:
    """group = the pair id (identical for both halves of a pair), job_type = the backend, tags, mode, dir.
    None values mean: remove from the environment (logger=none, or a previous job's settings)."""
    from unified_train import plan

    if not cfg.logger.wandb.enabled:
        return {key: None for key in _WANDB_KEYS}
    p = cfg.parallel
    tags = [cfg.model.name, f"tp{p.tp}", f"pp{p.pp}", f"sweep:{sweep_id}"]
    return {"WANDB_RUN_GROUP": plan.pair_id(cfg), "WANDB_JOB_TYPE": cfg.backend.name, "WANDB_TAGS": ",".join(tags),
            "WANDB_MODE": wandb_mode(cfg), "WANDB_DIR": os.path.join(run_dir, "wandb"), "WANDB_SILENT": "true"}


def apply_env(env: dict[str, str | None]) -> None:
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def add_unified_config(unified: dict) -> None:
    """Put the unified config next to the stack's native config in the W&B run the stack started."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.config.update({"unified": unified}, allow_val_change=True)


def end_wandb_run() -> None:
    """After a job: finish the W&B run its stack started and drop wandb's process-wide state. wandb reads
    WANDB_JOB_TYPE, WANDB_TAGS, ... once per process, so without this the next job in the same process (the other
    half of a pair) would log under this job's job_type and tags."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is None:
        return
    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()


def read_offline_run(path: str) -> dict:
    """Read an offline run back from its `run-<id>.wandb` file: identity, config and metric history."""
    import glob

    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    files = [path] if path.endswith(".wandb") else sorted(
        {os.path.realpath(f) for f in glob.glob(os.path.join(path, "**", "run-*.wandb"), recursive=True)})
    if len(files) != 1:
        raise FileNotFoundError(f"expected one run-*.wandb under {path}, found {len(files)}")
    store = datastore.DataStore()
    store.open_for_scan(files[0])
    out: dict = {"config": {}, "history": []}
    while True:
        data = store.scan_data()
        if data is None:
            break
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            out.update(run_id=r.run_id, project=r.project, group=r.run_group, job_type=r.job_type,
                       name=r.display_name, tags=list(r.tags))
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in record.history.item})
    return out

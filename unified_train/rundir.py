"""The run directory's format, written and read here only: file names, a job's identity (pair id, world size,
sweep), `run.json`, `metrics.jsonl`, `summary.json`, the preflight reports, and the guard that keeps a run from
starting in a directory that holds an earlier run's output.

A job's identity is computed once (`identity`) and handed down: the pair id, world size and sweep never get
recomputed from the config or the process environment further down.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

from omegaconf import OmegaConf

from unified_train import config as C

RUN_JSON = "run.json"
UNIFIED_CONFIG = "unified_config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
NATIVE_DIR = "native"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
WANDB_DIR = "wandb"
PREFLIGHT_DIR = "preflight"
GOLDEN_VALUES = "golden_values.json"
WANDB_PANELS = "wandb_panels.json"  # in a sweep directory
# Written into a sweep directory after a multirun.
COMPARISON_MD = "comparison.md"
COMPARISON_PNG = "comparison.png"
# Both stacks' checkpoint directories hold this tracker.
CHECKPOINT_TRACKER = "latest_checkpointed_iteration.txt"
# What Hydra itself writes into a job directory before the job runs.
HYDRA_OWN = (".hydra",)
SINGLE = "single"  # the sweep id of a run outside a multirun

# Keys that do not change what is trained: excluded from the pair id so both halves of a pair (and reruns) match.
_NOT_NUMERICS = ("backend", "logger", "launch", "mode", "run_dir", "checkpoint")


def pair_id(cfg, also_exclude: tuple[str, ...] = ()) -> str:
    """A stable hash of everything that determines the numerics: identical for both halves of a pair. The layer
    spec and core attention enter as resolved on this host (`auto` picks by what is installed)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data["kernels"].update(transformer_impl=C.transformer_impl(cfg), attention=C.attention(cfg))
    for key in _NOT_NUMERICS:
        data.pop(key, None)
    for dotted in also_exclude:
        section, _, leaf = dotted.partition(".")
        data.get(section, {}).pop(leaf, None)
    blob = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def tp_group_id(cfg) -> str:
    """Runs that differ only in how the model is split over tensor-parallel ranks (same global batch): the
    cross-TP convergence table compares these, per backend."""
    return pair_id(cfg, also_exclude=("parallel.tp", "parallel.sequence_parallel", "parallel.dp"))


@dataclass(frozen=True)
class JobIdentity:
    """Who a job is: what `run.json` records, what W&B groups by, and where the job writes."""

    backend: str
    model: str
    tp: int
    pp: int
    world_size: int
    pair_id: str
    mode: str = "train"
    tp_group: str = ""
    attention: str = ""  # the core attention the job runs (config.attention: local | flex | sdpa | te)
    sweep_id: str = SINGLE
    run_dir: str | None = field(default=None, compare=False)

    @property
    def run_name(self) -> str:
        """The readable name both stacks give their W&B run."""
        return f"{self.model}-tp{self.tp}-pp{self.pp}-{self.backend}"

    @property
    def multirun(self) -> bool:
        return self.sweep_id != SINGLE

    def record(self) -> dict:
        """The identity as `run.json` holds it (the directory is where the file is, so it is not stored)."""
        out = self.handover()
        out.pop("run_dir")
        return out

    def handover(self) -> dict:
        """The whole identity as plain data, for a spawned rank or worker: `JobIdentity(**job.handover())`."""
        return dataclasses.asdict(self)

    def subdir(self, name: str) -> str | None:
        return None if self.run_dir is None else os.path.join(self.run_dir, name)


def identity(cfg, *, world_size: int, sweep_id: str = SINGLE, run_dir: str | None = None) -> JobIdentity:
    return JobIdentity(
        backend=cfg.backend.name,
        mode=cfg.mode,
        model=cfg.model.name,
        tp=cfg.parallel.tp,
        pp=cfg.parallel.pp,
        world_size=world_size,
        pair_id=pair_id(cfg),
        tp_group=tp_group_id(cfg),
        attention=C.attention(cfg),
        sweep_id=sweep_id,
        run_dir=run_dir,
    )


def from_record(record: dict, run_dir: str | None = None) -> JobIdentity:
    known = {f.name for f in dataclasses.fields(JobIdentity)}
    return JobIdentity(**{k: v for k, v in record.items() if k in known}, run_dir=run_dir)


# --- writing ---------------------------------------------------------------------------------------------------


def write_job_record(cfg, job: JobIdentity) -> None:
    """The resolved unified config and the job's identity: what compare and panels read."""
    os.makedirs(job.run_dir, exist_ok=True)
    OmegaConf.save(cfg, os.path.join(job.run_dir, UNIFIED_CONFIG), resolve=True)
    write_identity(job)


def write_identity(job: JobIdentity) -> None:
    os.makedirs(job.run_dir, exist_ok=True)
    _write_json(os.path.join(job.run_dir, RUN_JSON), job.record())


def open_metrics(run_dir: str):
    """The per-iteration metrics file, opened for `append_metric`."""
    return open(os.path.join(run_dir, METRICS), "w")


def append_metric(file, record: dict) -> None:
    file.write(json.dumps(record) + "\n")
    file.flush()


def write_summary(run_dir: str, summary: dict) -> None:
    _write_json(os.path.join(run_dir, SUMMARY), summary)


def write_rank_report(run_dir: str, rank: int, report: dict) -> None:
    directory = os.path.join(run_dir, PREFLIGHT_DIR)
    os.makedirs(directory, exist_ok=True)
    _write_json(os.path.join(directory, f"rank_{rank}.json"), report)


def write_preflight_summary(run_dir: str, summary: dict) -> None:
    _write_json(os.path.join(run_dir, PREFLIGHT_DIR, SUMMARY), summary)


def write_golden_values(run_dir: str, values: dict) -> None:
    _write_json(os.path.join(run_dir, GOLDEN_VALUES), values)


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


# --- reading ---------------------------------------------------------------------------------------------------


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, METRICS)) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_rank_reports(run_dir: str) -> list[dict]:
    directory = os.path.join(run_dir, PREFLIGHT_DIR)
    names = os.listdir(directory) if os.path.isdir(directory) else []
    names = sorted(f for f in names if f.startswith("rank_") and f.endswith(".json"))
    return [_read_json(os.path.join(directory, name)) for name in names]


def read_unified_config(run_dir: str):
    return OmegaConf.load(os.path.join(run_dir, UNIFIED_CONFIG))


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


@dataclass
class Run:
    """A job directory as read back: its identity, per-iteration metrics and summary (if it finished)."""

    path: str
    job: JobIdentity
    metrics: list[dict] = field(default_factory=list)
    summary: dict | None = None

    @property
    def backend(self) -> str:
        return self.job.backend

    @property
    def pair_id(self) -> str:
        return self.job.pair_id

    @property
    def is_preflight(self) -> bool:
        return self.job.mode == "preflight"

    @property
    def ok(self) -> bool:
        if self.is_preflight:
            return self.summary is not None and bool(self.summary.get("ok"))
        return self.summary is not None and bool(self.metrics)

    @property
    def label(self) -> str:
        return f"{self.backend} tp={self.job.tp}"


def load_runs(sweep_dirs: list[str]) -> list[Run]:
    """Every job directory under `sweep_dirs` (any process or host may have written them)."""
    runs = []
    for sweep in sweep_dirs:
        for root, dirs, files in os.walk(sweep):
            if RUN_JSON not in files:
                continue
            dirs[:] = []  # a run directory holds no other runs
            run = Run(root, from_record(_read_json(os.path.join(root, RUN_JSON)), root))
            if os.path.exists(os.path.join(root, METRICS)):
                run.metrics = read_metrics(root)
            # A training job's summary, or a preflight job's (mode=preflight trains nothing).
            for summary in (os.path.join(root, SUMMARY), os.path.join(root, PREFLIGHT_DIR, SUMMARY)):
                if os.path.exists(summary):
                    run.summary = _read_json(summary)
            runs.append(run)
    return sorted(runs, key=lambda r: r.path)


# --- the guard -------------------------------------------------------------------------------------------------


def output_dir_key(cfg, multirun: bool) -> str:
    """The key a user changes to move a job's output directory."""
    if cfg.run_dir:
        return "run_dir"
    return "hydra.sweep.dir" if multirun else "hydra.run.dir"


def check_run_dir(run_dir: str, key: str = "run_dir", started: bool = True) -> str | None:
    """A run never starts in a directory that already holds a run's output (nothing is overwritten). Once Hydra
    has `started` the job it has written its own record (.hydra) and job log there; before, those are a run's too."""
    if not os.path.isdir(run_dir):
        return None
    leftovers = [f for f in os.listdir(run_dir) if not (started and (f in HYDRA_OWN or f.endswith(".log")))]
    if leftovers:
        return (
            f"{key}: {run_dir} already holds {', '.join(sorted(leftovers)[:4])}: "
            f"choose a new {key}; resuming is explicit via checkpoint.load"
        )
    return None


def holds_checkpoint(directory: str) -> bool:
    """A checkpoint directory (with the tracker) or one iteration's directory of it."""
    return os.path.isfile(os.path.join(directory, CHECKPOINT_TRACKER)) or os.path.basename(
        directory.rstrip("/")
    ).startswith("iter_")

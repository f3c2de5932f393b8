"""The run directory's format, written and read here only: file names, a job's identity (pair id, world size,
sweep), `run.json`, `metrics.jsonl`, `summary.json`, the preflight reports, a failed job's `failure.json`, a job's
`repeats/<k>/`, what Hydra recorded of a job's command, the sweep's `comparison.json`, and the guard that keeps a run
from starting in a directory that holds an earlier run's output.

A job's identity is computed once (`identity`) and handed down: the pair id, world size and sweep never get
recomputed from the config or the process environment further down.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import traceback
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
# mode=numerics: every module output and parameter gradient of iteration 1, one JSON record per line; rank 0's file
# (a job of one GPU writes only this one), and numerics_rank<r>.jsonl for every other rank r.
NUMERICS = "numerics.jsonl"
WANDB_PANELS = "wandb_panels.json"  # in a sweep directory
# Written into a sweep directory after a multirun.
COMPARISON_MD = "comparison.md"
COMPARISON_PNG = "comparison.png"
COMPARISON_JSON = "comparison.json"  # each pair's verdict as data (results/panels.py puts it into W&B)
# A job that failed records why here (record_failure); the comparison lists it.
FAILURE = "failure.json"
# compare.repeats: a training job's extra runs of the identical config, each a run directory repeats/<k>/ (k from 1)
# inside the job's own; load_runs does not descend into them, read_repeats reads them.
REPEATS = "repeats"
# Both stacks' checkpoint directories hold this tracker (the latest iteration saved) and one iter_%07d directory per
# saved iteration.
CHECKPOINT_TRACKER = "latest_checkpointed_iteration.txt"
ITERATION_PREFIX = "iter_"
# Only Megatron-Bridge writes this beside the tracker (its TrainState); Megatron-LM keeps the same in the checkpoint.
BRIDGE_TRAIN_STATE = "latest_train_state.pt"
# A run continued in its own directory keeps each earlier attempt's metrics and summary here (attempts/<n>/).
ATTEMPTS = "attempts"
# What Hydra itself writes into a job directory before the job runs.
HYDRA_OWN = (".hydra",)
HYDRA_SWEEP_RECORD = "multirun.yaml"  # what Hydra writes into a sweep directory
SINGLE = "single"  # the sweep id of a run outside a multirun

# Keys that do not change what is trained: excluded from the pair id so both halves of a pair (and reruns) match.
_NOT_NUMERICS = ("backend", "logger", "launch", "mode", "run_dir", "checkpoint", "compare")


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


def open_metrics(run_dir: str, continued: bool = False):
    """The per-iteration metrics file, opened for `append_metric`: new, or `continued` after `archive_attempt`."""
    return open(os.path.join(run_dir, METRICS), "a" if continued else "w")


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


def numerics_path(run_dir: str, rank: int) -> str:
    base, ext = os.path.splitext(NUMERICS)
    return os.path.join(run_dir, NUMERICS if rank == 0 else f"{base}_rank{rank}{ext}")


def write_numerics(run_dir: str, rank: int, records: list[dict]) -> str:
    """One rank's numerics records (each rank its own file: ranks write at once, on any file system)."""
    path = numerics_path(run_dir, rank)
    os.makedirs(run_dir, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    return path


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


def read_numerics(run_dir: str) -> list[dict]:
    """Every rank's numerics records (each carries its rank), rank by rank, each rank's in the order written; an
    empty list where the job recorded none."""
    base, ext = os.path.splitext(NUMERICS)
    names = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    prefix = f"{base}_rank"
    digits = (n[len(prefix) : -len(ext)] for n in names if n.startswith(prefix) and n.endswith(ext))
    ranks = sorted(int(d) for d in digits if d.isdigit())
    records = []
    for rank in [0, *ranks] if NUMERICS in names else ranks:
        with open(numerics_path(run_dir, rank)) as f:
            records += [json.loads(line) for line in f if line.strip()]
    return records


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
    failure: dict | None = None  # failure.json: the job failed (record_failure)
    repeats: list[Run] = field(default_factory=list)  # compare.repeats: its repeats/<k>/ runs, in order of k

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
        if self.failure is not None:
            return False
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
            dirs[:] = []  # a run directory holds no other runs (its repeats are its own: read_repeats)
            runs.append(read_run(root))
    return sorted(runs, key=lambda r: r.path)


def read_run(run_dir: str) -> Run:
    """One run directory (it has run.json): identity, metrics, summary, failure record and repeats."""
    run = Run(run_dir, from_record(_read_json(os.path.join(run_dir, RUN_JSON)), run_dir))
    if os.path.exists(os.path.join(run_dir, METRICS)):
        run.metrics = read_metrics(run_dir)
    # A training job's summary, or a preflight job's (mode=preflight trains nothing).
    for summary in (os.path.join(run_dir, SUMMARY), os.path.join(run_dir, PREFLIGHT_DIR, SUMMARY)):
        if os.path.exists(summary):
            run.summary = _read_json(summary)
    run.failure = read_failure(run_dir)
    run.repeats = read_repeats(run_dir)
    return run


def read_repeats(run_dir: str) -> list[Run]:
    """A run's repeats (repeats/1, repeats/2, ...), each read as a run directory; those without run.json are
    skipped (a repeat writes it before it trains, or when it fails: runtime/failures.py)."""
    root = os.path.join(run_dir, REPEATS)
    names = sorted((n for n in os.listdir(root) if n.isdigit()), key=int) if os.path.isdir(root) else []
    return [read_run(os.path.join(root, n)) for n in names if os.path.isfile(os.path.join(root, n, RUN_JSON))]


# --- the guard -------------------------------------------------------------------------------------------------


def output_dir_key(cfg, multirun: bool) -> str:
    """The key a user changes to move a job's output directory."""
    if cfg.run_dir:
        return "run_dir"
    return "hydra.sweep.dir" if multirun else "hydra.run.dir"


def check_run_dir(run_dir: str, key: str = "run_dir", started: bool = True, fix: str | None = None) -> str | None:
    """A run never starts in a directory that already holds a run's output (nothing is overwritten). Once Hydra
    has `started` the job it has written its own record (.hydra) and job log there; before, those are a run's too.
    (unified_train.resume.guard lets a run continue in its own directory.)"""
    if not os.path.isdir(run_dir):
        return None
    leftovers = [f for f in os.listdir(run_dir) if not (started and (f in HYDRA_OWN or f.endswith(".log")))]
    if leftovers:
        fix = fix or f"choose a new {key}, or continue the run there with checkpoint.resume=if_available"
        return f"{key}: {run_dir} already holds {', '.join(sorted(leftovers)[:4])}: {fix}"
    return None


def holds_checkpoint(directory: str) -> bool:
    """A checkpoint directory (with the tracker) or one iteration's directory of it."""
    return (
        os.path.isfile(os.path.join(directory, CHECKPOINT_TRACKER)) or split_checkpoint_path(directory)[1] is not None
    )


# --- checkpoints (as both stacks lay them out) ------------------------------------------------------------------


def iteration_dir(checkpoints: str, iteration: int) -> str:
    return os.path.join(checkpoints, f"{ITERATION_PREFIX}{iteration:07d}")


def split_checkpoint_path(path: str) -> tuple[str, int | None]:
    """`.../checkpoints/iter_0000005` -> (`.../checkpoints`, 5); a checkpoints directory -> (it, None)."""
    path = path.rstrip("/")
    name = os.path.basename(path)
    digits = name[len(ITERATION_PREFIX) :]
    if name.startswith(ITERATION_PREFIX) and digits.isdigit():
        return os.path.dirname(path), int(digits)
    return path, None


def saved_iterations(checkpoints: str) -> list[int]:
    """The iterations a checkpoints directory holds, ascending."""
    names = os.listdir(checkpoints) if os.path.isdir(checkpoints) else []
    found = (split_checkpoint_path(os.path.join(checkpoints, n))[1] for n in names)
    return sorted(i for i in found if i is not None)


def latest_iteration(checkpoints: str) -> int | None:
    """The iteration the tracker names (what both stacks load when no iteration is asked for)."""
    try:
        with open(os.path.join(checkpoints, CHECKPOINT_TRACKER)) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def checkpoint_writer(checkpoints: str) -> str:
    """Which stack wrote a checkpoints directory: "bridge" or "mlm" (the backend names)."""
    return "bridge" if os.path.isfile(os.path.join(checkpoints, BRIDGE_TRAIN_STATE)) else "mlm"


def archive_attempt(run_dir: str, resumed_at: int) -> str:
    """Before a run continues in its own directory from iteration `resumed_at`: the earlier attempt's metrics and
    summary move to attempts/<n>/, and metrics.jsonl keeps its iterations up to `resumed_at`, so the file stays one
    record per iteration whatever the attempts (tests/test_resume.py)."""
    root = os.path.join(run_dir, ATTEMPTS)
    os.makedirs(root, exist_ok=True)
    target = os.path.join(root, str(len(os.listdir(root)) + 1))
    os.makedirs(target)
    kept = []
    if os.path.exists(os.path.join(run_dir, METRICS)):
        kept = [r for r in read_metrics(run_dir) if r.get("iteration", 0) <= resumed_at]
        os.replace(os.path.join(run_dir, METRICS), os.path.join(target, METRICS))
    if os.path.exists(os.path.join(run_dir, SUMMARY)):
        os.replace(os.path.join(run_dir, SUMMARY), os.path.join(target, SUMMARY))
    with open(os.path.join(run_dir, METRICS), "w") as f:
        for record in kept:
            append_metric(f, record)
    return target


# --- failures, repeats, what Hydra recorded, the comparison -----------------------------------------------------

FAILURE_TAIL = 20  # traceback lines kept in a failure record


def repeat_dir(run_dir: str, k: int) -> str:
    """Where repeat `k` (from 1) of a run trains: a run directory of its own inside the run's."""
    return os.path.join(run_dir, REPEATS, str(k))


def failure_record(exc: BaseException, *, rank: int = 0, exit_code: int | None = None) -> dict:
    """What failure.json holds: the exception's type and message, the exit code (a SystemExit's, or `exit_code`),
    the rank, and the last lines of the traceback."""
    message = str(exc)
    if isinstance(exc, SystemExit):
        if exit_code is None:
            exit_code = exc.code if isinstance(exc.code, int) else 1  # sys.exit("text") exits 1 and prints the text
        if isinstance(exc.code, int):
            message = ""  # the exit code says it all
    raised = exc.__traceback__ is not None  # a job that ends itself (runtime/failures.fail) has only its message
    lines = "".join(traceback.format_exception(exc)).rstrip("\n").splitlines() if raised else []
    return {
        "error": type(exc).__name__,
        "message": message,
        "exit_code": exit_code,
        "rank": rank,
        "traceback": lines[-FAILURE_TAIL:],
    }


def record_failure(run_dir: str, record: dict) -> bool:
    """Write failure.json unless the run already has one: the first failure is the cause (a rank's own, before the
    parent's "a child failed"; a repeat's, before the job's), so later ones do not replace it. False if one was
    there."""
    os.makedirs(run_dir, exist_ok=True)
    try:
        with open(os.path.join(run_dir, FAILURE), "x") as f:
            json.dump(record, f, indent=2)
    except FileExistsError:
        return False
    return True


def clear_failure(run_dir: str) -> None:
    """A new attempt in the directory (a restart, a requeue): an earlier attempt's failure no longer describes it."""
    try:
        os.remove(os.path.join(run_dir, FAILURE))
    except FileNotFoundError:
        pass


def read_failure(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, FAILURE)
    return _read_json(path) if os.path.exists(path) else None


def read_summary(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, SUMMARY)
    return _read_json(path) if os.path.exists(path) else None


def read_hydra_command(run_dir: str) -> dict | None:
    """What Hydra recorded of the command that ran a job (None outside Hydra): its overrides, and the primary
    config's name and directory (the directory only when given on the command line, -cd)."""
    hydra_dir = os.path.join(run_dir, HYDRA_OWN[0])
    overrides = os.path.join(hydra_dir, "overrides.yaml")
    if not os.path.isfile(overrides):
        return None
    out = {"overrides": [str(o) for o in OmegaConf.load(overrides)], "config_name": "config", "config_dir": None}
    hydra_yaml = os.path.join(hydra_dir, "hydra.yaml")
    if os.path.isfile(hydra_yaml):
        hydra = OmegaConf.load(hydra_yaml).hydra
        out["config_name"] = hydra.job.config_name
        for source in hydra.runtime.config_sources:
            if source.provider == "command-line" and source.schema == "file":
                out["config_dir"] = source.path
    return out


def write_comparison(sweep_dir: str, data: dict) -> None:
    _write_json(os.path.join(sweep_dir, COMPARISON_JSON), data)


def read_comparison(sweep_dir: str) -> dict | None:
    path = os.path.join(sweep_dir, COMPARISON_JSON)
    return _read_json(path) if os.path.exists(path) else None

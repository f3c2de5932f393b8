"""Validate every point of a run or sweep before anything starts, and report all problems at once.

Hydra's own composition errors are multi-line tracebacks with exit code 1; here each becomes one line naming
the key and the fix, and the process exits with 2 before Hydra creates an output directory.
"""

from __future__ import annotations

import copy
import itertools
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from unified_train import checks, resources, resume, slurm
from unified_train import config as C
from unified_train.compose import compose


@dataclass
class Point:
    overrides: list[str]
    cfg: object | None = None
    errors: list[str] | None = None
    launcher: dict | None = None  # hydra.launcher, resolved (multirun only)


def sweep_choices(overrides: list[str], sweeper_params: dict) -> list[list[str]]:
    """Expand `a=1,2` style overrides (CLI and hydra.sweeper.params) into one override list per job."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    params = {k: str(v) for k, v in (sweeper_params or {}).items()}
    axes: list[list[str]] = []
    for ov in parser.parse_overrides(overrides):
        key = ov.get_key_element()
        params.pop(key.lstrip("+~"), None)  # the command line wins over the sweep config
        if ov.is_sweep_override():
            axes.append([f"{key}={v}" for v in ov.sweep_string_iterator()])
        else:
            axes.append([ov.input_line])
    for key, value in params.items():
        ov = parser.parse_override(f"{key}={value}")
        axes.append([f"{key}={v}" for v in ov.sweep_string_iterator()] if ov.is_sweep_override() else [ov.input_line])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def _one_line(exc: Exception) -> str:
    """Hydra/OmegaConf errors, reduced to one actionable line."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError

    if isinstance(exc, OverrideParseException):  # the command line's grammar: name the override, not the parser
        lines = [line for line in exc.message.splitlines() if line.strip() and not line.startswith(("See ", "Error "))]
        why = lines[0].strip() if lines else "not Hydra's override grammar"
        return (
            f"{exc.override}: cannot be parsed ({why}): quote a value or list element that holds '=', ',', spaces "
            """or brackets, e.g. 'backend.extra=["model.seq_length=4096"]'"""
        )
    while exc.__cause__ is not None and not isinstance(exc, (ConfigKeyError, ValidationError)):
        if isinstance(exc, MissingConfigException):
            break
        exc = exc.__cause__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, MissingConfigException) or "Could not find" in text:
        group = getattr(exc, "config_name", None) or text
        options = getattr(exc, "options", None)
        hint = f": choose one of {', '.join(sorted(options))}" if options else ""
        return f"{group}{hint}".replace("In 'config': ", "").replace("Could not find ", "unknown option ")
    full_key = getattr(exc, "full_key", None)
    if isinstance(exc, ConfigKeyError) or "not in struct" in text or (text.startswith("Key '") and " not in " in text):
        return checks.unknown_line(full_key or text)
    if isinstance(exc, ValidationError):
        return f"{full_key}: {text.split('full_key')[0].strip()}; give a value of the declared type"
    missing = re.search(r"Missing mandatory value: ?(\S+)", str(exc))  # also inside an interpolation's error
    if isinstance(exc, MissingMandatoryValue) or missing:
        key = missing.group(1) if missing else full_key
        return f"{key}: required but not set; give {key}=..."
    return text


def validate(argv: list[str]) -> tuple[list[Point], list[str]]:
    """Compose and check every job the command line describes. Returns the points and one line per problem."""
    from hydra._internal.utils import get_args_parser

    resources.query_gpu_memory()  # nvidia-smi answers while the jobs are composed (the memory check needs it)
    args = get_args_parser().parse_args(argv)
    config_name = args.config_name or "config"
    config_dir = str(Path(args.config_dir).resolve()) if args.config_dir else None
    base = list(args.overrides)
    try:
        plain = [o for o in base if "," not in o.split("=", 1)[-1] or o.split("=", 1)[-1].startswith("[")]
        sweeper_params, launcher = {}, None
        if args.multirun:
            hcfg = compose(plain, config_dir=config_dir, config_name=config_name, with_hydra=True)
            params = OmegaConf.select(hcfg, "hydra.sweeper.params")
            sweeper_params = OmegaConf.to_container(params) if params is not None else {}
            launcher = OmegaConf.to_container(hcfg.hydra.launcher)
            if slurm.is_slurm(launcher) and hcfg.parallel.gpus_per_node is None:  # its task count derives from it
                return [], [slurm.NEEDS_GPUS_PER_NODE]
            launcher = OmegaConf.to_container(hcfg.hydra.launcher, resolve=True)
        else:
            hcfg = compose(base, config_dir=config_dir, config_name=config_name, with_hydra=True)
        combos = sweep_choices(base, sweeper_params) if args.multirun else [base]
    except Exception as exc:  # noqa: BLE001 -- any composition problem is a user error here
        return [], [_one_line(exc)]
    single = None if args.multirun else _without_hydra(hcfg)  # a single run's job config: no second compose

    # On Slurm the GPUs are the job's, not this (login) host's.
    available = (lambda cfg: slurm.check(cfg, launcher)) if slurm.is_slurm(launcher) else resources.check
    points, errors = [], []
    for combo in combos:
        point = Point(overrides=combo, launcher=launcher)
        try:
            point.cfg = single if single is not None else compose(combo, config_dir=config_dir, config_name=config_name)
            point.errors = checks.check(point.cfg) or available(point.cfg)
        except Exception as exc:  # noqa: BLE001
            point.errors = [_one_line(exc)]
        points.append(point)
        label = f"[{' '.join(combo)}] " if args.multirun and len(combos) > 1 else ""
        errors += [label + e for e in point.errors]
    if write_nothing(points):
        return points, errors  # no output directory to check (its probe would write one)
    try:
        return points, errors + _output_dir_problems(hcfg, args.multirun)
    except Exception as exc:  # noqa: BLE001 -- as the composition above: a user error
        return [], [_one_line(exc)]


def write_nothing(points: list[Point]) -> bool:
    """Every job only builds native configs and prints, in this process (not through a Slurm launcher): __main__
    runs them without Hydra, so there is no output directory to check or write (app.build_natives)."""
    return all(p.cfg is not None and p.cfg.mode in C.BUILDS_ONLY_MODES for p in points) and not any(
        slurm.is_slurm(p.launcher) for p in points
    )


def _without_hydra(hcfg):
    """The job's config from a compose that returned the Hydra node too, as Hydra's compose strips it (a copy: the
    output-directory checks read the Hydra node afterwards)."""
    job = copy.deepcopy(hcfg)
    with open_dict(job):
        del job["hydra"]
    return job


def _output_dir_problems(hcfg, multirun: bool) -> list[str]:
    """Hydra writes its record of a run (.hydra/, and multirun.yaml for a sweep) into the output directory before
    the job starts, so an earlier run there would lose its record before app.run could refuse: check first.

    The ranks of one torchrun job (or srun step) each run this command: they need one directory, which a
    per-process timestamp does not give them, and they write their .hydra/ into it at the same moment, so a rank
    judges only the outputs a run writes once all its ranks have started."""
    several = one_of_several_ranks()
    key, node = ("hydra.sweep.dir", hcfg.hydra.sweep) if multirun else ("hydra.run.dir", hcfg.hydra.run)
    dirs = {key: node.dir}  # where Hydra writes its record
    if hcfg.run_dir:
        dirs["run_dir"] = hcfg.run_dir
    pattern = OmegaConf.to_container(node, resolve=False)["dir"]
    if several and not hcfg.run_dir and "${now:" in pattern:
        return [
            (
                f"{key}: the ranks of this job need one output directory, and {pattern} is timestamped per "
                f"process: give {key}=DIR (the same on every rank)"
            )
        ]
    unwritable = [p for p in (unwritable_dir(d, k) for k, d in dirs.items()) if p]
    if unwritable:
        return unwritable
    problems = [resume.guard(hcfg, d, k, started=several) for k, d in dirs.items()]
    return [p for p in problems if p]


def unwritable_dir(path: str, key: str) -> str | None:
    """An output directory that could not be created or written (else a PermissionError or NotADirectoryError
    traceback once Hydra starts): judged at the nearest part of the path that exists, where it would be made.
    os.access also answers a read-only file system for root, who passes every permission check; a file system that
    refuses new directories all the same (/proc, /sys) is found by making one there and removing it at once."""
    path = os.path.abspath(path)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        why = f"{existing} is a file, not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        why = f"{existing} is not writable"
    elif existing == path:
        return None
    else:
        try:
            os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".unified_train_probe_"))
            return None
        except OSError as exc:
            why = f"{existing} takes no new directory ({exc.strerror})"
    return f"{key}={path}: cannot be created or written, {why}: choose a writable {key}"


def dry_run_table(points: list[Point]) -> str:
    """`--dry-run`: the jobs a command would start, with their world sizes, without starting them (and, with
    hydra/launcher=slurm, the sbatch script that would be submitted)."""
    lines = [
        "| # | overrides | world size | params | GiB/GPU (weights+optimizer) | status |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for i, p in enumerate(points):
        if p.cfg is None:
            lines.append(f"| {i} | {' '.join(p.overrides)} | | | | {'; '.join(p.errors)} |")
            continue
        status = "; ".join(p.errors) if p.errors else "ok"
        lines.append(
            f"| {i} | {' '.join(p.overrides)} | {resources.world_size(p.cfg)} "
            f"| {resources.param_count(p.cfg) / 1e6:,.0f}M | {resources.memory_gib_per_gpu(p.cfg):.1f} | {status} |"
        )
    if points and slurm.is_slurm(points[0].launcher):
        lines += [
            "",
            f"sbatch script for the {len(points)} job(s) (one array element each):",
            "",
            slurm.sbatch_preview(points[0].launcher, len(points)),
        ]
    return "\n".join(lines)


def one_of_several_ranks() -> bool:
    """This process is one rank of a job whose other ranks run the same command at the same moment: under
    torchrun, or in a Slurm job step of several tasks (srun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1

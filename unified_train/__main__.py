"""`python -m unified_train [overrides]`: one Hydra config, either Megatron stack, in-process.

Every job of the command line is composed and checked first (no torch, no megatron, nothing written); problems
are printed one per line and the exit code is 2. Then Hydra runs the job(s) through `app.run`; the modes that only
build native configs and print (parity, export) run here, with nothing written.
"""

from __future__ import annotations

import logging
import sys
import warnings

import hydra

from unified_train.config import register_configs

# Hydra flags that only print or inspect; they never run a job, so they skip the up-front validation.
_INSPECT_FLAGS = (
    "-h",
    "--help",
    "--hydra-help",
    "-c",
    "--cfg",
    "-i",
    "--info",
    "-sc",
    "--shell-completion",
    "-p",
    "--package",
)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _hydra_main(cfg) -> None:
    from unified_train import app

    app.run(cfg)


def _stack_problems(points) -> list[str]:
    """The stacks' own rules, once the cheap checks all pass (this imports the stacks the jobs then use)."""
    from unified_train import app

    problems = []
    for point in points:
        problem = app.stack_problem(point.cfg)
        if problem:
            point.errors = [problem]
            problems.append((f"[{' '.join(point.overrides)}] " if len(points) > 1 else "") + problem)
    return problems


def main() -> None:
    # multistorageclient's Hydra plugin logs a traceback whenever its msc:// config source is unconfigured.
    logging.getLogger("multistorageclient.contrib.hydra").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message="provider=msc-universal")
    register_configs()
    argv = sys.argv[1:]
    dry_run = "--dry-run" in argv
    if dry_run:
        argv = [a for a in argv if a != "--dry-run"]
        sys.argv = sys.argv[:1] + argv
    if not any(a.split("=")[0] in _INSPECT_FLAGS for a in argv):
        from unified_train import validate

        points, errors = validate.validate(argv)
        if not errors:
            errors = _stack_problems(points)
        if dry_run:
            print(validate.dry_run_table(points))
        if errors:
            for line in errors:
                print(f"unified_train: {line}", file=sys.stderr)
            sys.exit(2)
        if dry_run:
            return
        if validate.write_nothing(points):
            from unified_train import app

            sys.exit(app.build_natives(points))
    _hydra_main()


if __name__ == "__main__":
    main()

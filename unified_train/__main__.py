"""`python -m unified_train [overrides]`: one Hydra config, either Megatron stack, in-process.

Every job of the command line is composed and checked first (no torch, no megatron, nothing written); problems
are printed one per line and the exit code is 2. Then Hydra runs the job(s) through `launch.run`.
"""

from __future__ import annotations

import sys

import hydra

from unified_train.config import register_configs

# Hydra flags that only print or inspect; they never run a job, so they skip the up-front validation.
_INSPECT_FLAGS = ("-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "-sc", "--shell-completion", "-p",
                  "--package")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _hydra_main(cfg) -> None:
    from unified_train import launch

    launch.run(cfg)


def main() -> None:
    register_configs()
    argv = sys.argv[1:]
    if not any(a.split("=")[0] in _INSPECT_FLAGS for a in argv):
        from unified_train import sweep

        _, errors = sweep.validate(argv)
        if errors:
            for line in errors:
                print(f"unified_train: {line}", file=sys.stderr)
            sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()

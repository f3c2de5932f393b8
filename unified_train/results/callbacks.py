"""The Hydra callback at the end of every multirun: the comparison, then the W&B panels and each run's verdict in
W&B. The only module that sees both compare and panels.

A multirun with a failed job gets its comparison too. Hydra ends such a multirun before `on_multirun_end`: its
BasicSweeper re-raises the first failed job's exception once the batch has run, and the submitit launcher raises for
a job that died. So `on_multirun_start` registers the comparison to run when the process exits, and
`on_multirun_end`, when it is reached, runs it there instead. Either way a sweep with a failed job ends with a
non-zero exit status after comparison.md is written: Hydra's own, or ours (tests/test_failures.py).
"""

from __future__ import annotations

import atexit
import os
import sys

from hydra.experimental.callback import Callback

from unified_train import rundir
from unified_train.results import compare, panels


class CompareCallback(Callback):
    """Compare whatever the jobs wrote into the sweep directory (read from files: jobs may have run elsewhere)."""

    def __init__(self) -> None:
        self._sweep_dir: str | None = None

    def on_multirun_start(self, config, **kwargs) -> None:
        self._sweep_dir = str(config.hydra.sweep.dir)
        atexit.register(self._after_failed_sweep)

    def on_multirun_end(self, config, **kwargs) -> None:
        atexit.unregister(self._after_failed_sweep)
        if self._compare(str(config.hydra.sweep.dir)):
            sys.exit(1)  # after comparison.md: a sweep with a job that failed or did not finish fails

    def _after_failed_sweep(self) -> None:
        """Hydra ended the multirun on a job's failure (and exits non-zero itself): compare what the jobs wrote."""
        if self._sweep_dir is not None and os.path.isdir(self._sweep_dir):
            self._compare(self._sweep_dir)

    @staticmethod
    def _compare(sweep_dir: str) -> bool:
        """Write and print the comparison, then the W&B panels; True when a job failed or did not finish."""
        result = compare.comparison([sweep_dir], out_dir=sweep_dir)
        print(result.text)
        print(f"comparison written to {os.path.join(sweep_dir, rundir.COMPARISON_MD)}", flush=True)
        panels.after_sweep(sweep_dir)
        return bool(result.failed)

"""The Hydra callback at the end of every multirun: the comparison, then the W&B panels. The only module that
sees both compare and panels."""

from __future__ import annotations

import os

from hydra.experimental.callback import Callback

from unified_train import rundir
from unified_train.results import compare, panels


class CompareCallback(Callback):
    """Compare whatever the jobs wrote into the sweep directory (read from files: jobs may have run elsewhere)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = config.hydra.sweep.dir
        text, _ = compare.report([sweep_dir], out_dir=sweep_dir)
        print(text)
        print(f"comparison written to {os.path.join(sweep_dir, rundir.COMPARISON_MD)}")
        panels.after_sweep(sweep_dir)

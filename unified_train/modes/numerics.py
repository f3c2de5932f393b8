"""mode=numerics: where a pair's numerics part. A training job of one iteration of the user's config, in which both
stacks record every module's forward output and every parameter's gradient through hooks on their real models
(backends/numerics.py, into the run directory's numerics.jsonl); after a multirun, compare names the first module
and the first gradient that differ between the backends (results/numerics.py).

    python -m unified_train -m backend=mlm,bridge mode=numerics [the pair's overrides]

It runs like `mode=train` (a GPU, a run directory, app.run's dispatch) on the config `job_config` returns.
"""

from __future__ import annotations

import copy

from unified_train import config as C


def job_config(cfg):
    """The user's config as a numerics job runs it: one iteration (the first batch) and no checkpoint. The
    learning-rate schedule and the evaluation interval stay the whole run's: the iteration gets the lr the full
    run's first one does, and an explicit warm-up stays shorter than the decay (MLM asserts it); the stacks' own
    validation and test at the end of training run after the recording is done. Both halves of a pair get the
    same, so their pair id still matches. (The batch is the full run's first unless the full run would take
    several epochs of an indexed dataset: megatron-core shuffles documents by the number of epochs.)"""
    out = copy.deepcopy(cfg)
    out.sched.lr_warmup_iters = C.warmup_iters(cfg)
    out.sched.lr_decay_iters = C.decay_iters(cfg)
    out.validation.eval_interval = C.eval_interval(cfg)
    out.train.iters = 1
    out.checkpoint.save = False
    return out

"""Helpers shared by the CPU tests (kept out of conftest.py so tests can import them by a unique name)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from unified_train.runtime.ranks import RANK_VARIABLES

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
PRESETS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
LOSSES = [10.375, 10.25, 9.9921875, 9.75, 9.5]


def write_run_dir(directory, backend, pair_id="p123", losses=LOSSES, complete=True, attention="", grad_norms=None):
    """A run directory as a finished training job leaves it (run.json, metrics.jsonl, summary.json), written by
    the real metrics sink. Grad norms are 2/iteration unless given."""
    from unified_train import rundir
    from unified_train.results import metrics

    directory.mkdir(parents=True)
    rundir.write_identity(
        rundir.JobIdentity(
            backend=backend,
            model="vanilla_gpt",
            tp=1,
            pp=1,
            world_size=1,
            pair_id=pair_id,
            attention=attention,
            run_dir=str(directory),
        )
    )
    sink = metrics.MetricsSink(str(directory), backend=backend, tokens_per_iteration=16384, world_size=1, write=True)
    for it, loss in enumerate(losses, start=1):
        grad_norm = 2.0 / it if grad_norms is None else grad_norms[it - 1]
        sink.record_train(it, loss=loss, grad_norm=grad_norm, lr=3e-4 * min(1, it) / it, seconds=0.1)
        if it == len(losses):
            sink.record_eval("valid", loss + 0.5)
    if complete:
        sink.close(pair_id=pair_id, world_size=1)
    return directory


def compose(overrides=()):
    """The real config, composed from conf/ against the registered schema."""
    from unified_train.compose import compose as compose_config

    return compose_config(overrides)


def job_for(cfg, run_dir=None, sweep_id="single"):
    """The job identity app.run computes for `cfg` (world size from the config and this process)."""
    from unified_train import resources, rundir

    return rundir.identity(
        cfg, world_size=resources.world_size(cfg), sweep_id=sweep_id, run_dir=None if run_dir is None else str(run_dir)
    )


def native(backend: str, cfg, run_dir=None):
    """One stack's native config of `cfg`, as a job would build it."""
    from unified_train import backends

    return backends.get(backend).native_config(cfg, job_for(cfg, run_dir))


def describe_both(cfg) -> dict[str, dict]:
    """Both stacks' comparable descriptions of `cfg` (what mode=parity diffs)."""
    from unified_train.modes import parity

    return parity.describe_both(cfg, job_for(cfg))


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["TORCHDYNAMO_DISABLE"] = "1"
    env.pop("PYTHONPATH", None)  # the package is installed (editable) in the venv; nothing from the cwd
    for key in RANK_VARIABLES:  # a child is never a rank of the test process's world
        env.pop(key, None)
    return env


def run_cli(args, cwd, *, python_flags=(), timeout=300, env=None) -> subprocess.CompletedProcess:
    """`python -m unified_train ARGS` in a fresh interpreter, from `cwd` (with `env` added to the environment)."""
    return subprocess.run(
        [sys.executable, *python_flags, "-m", "unified_train", *args],
        cwd=cwd,
        env={**subprocess_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_python(code: str, cwd, timeout=300, args=(), env=None) -> subprocess.CompletedProcess:
    """`python -c CODE` in a fresh interpreter; `env` entries are added, or removed where their value is None."""
    full_env = {**subprocess_env(), **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={k: v for k, v in full_env.items() if v is not None},
    )


def offline_wandb_run(cfg, run_dir, sweep_id: str, losses=(9.0, 8.0, 7.0), unified=None) -> None:
    """A real offline wandb run in `run_dir/wandb`, started the way both stacks start theirs (their own
    `wandb.init`, with our grouping in the environment) and logging `lm loss` / `grad-norm` per step."""
    from unified_train.results import wandb_runs

    env = {k: v for k, v in wandb_runs.wandb_env(cfg, job_for(cfg, run_dir, sweep_id)).items() if v is not None}
    os.makedirs(env["WANDB_DIR"], exist_ok=True)
    code = (
        "import sys, wandb\n"
        "from unified_train.results import wandb_runs\n"
        "run = wandb.init(dir=sys.argv[1], name='n', project='unified_train', config={'native': 1})\n"
        "for i, loss in enumerate(eval(sys.argv[2]), 1): wandb.log({'lm loss': loss, 'grad-norm': 1.0 / i}, step=i)\n"
        "wandb_runs.add_unified_config(eval(sys.argv[3]))\n"
        "wandb.finish()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, env["WANDB_DIR"], repr(list(losses)), repr(unified or {})],
        env={**subprocess_env(), **env},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def write_indexed_prefix(prefix, documents: int, seed: int, vocab: int = 1000) -> None:
    """A .bin/.idx pair written by MCore's own builder: `documents` documents of 50-900 random tokens below
    `vocab` (the size of write_hf_tokenizer's vocabulary, so the data also trains with it)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for _ in range(documents):
        doc = rng.integers(0, vocab, size=int(rng.integers(50, 900)), dtype=np.int32)
        builder.add_document(doc, [len(doc)])
    builder.finalize(f"{prefix}.idx")


def write_hf_tokenizer(path) -> Path:
    """A real Hugging Face tokenizer directory (a byte-level BPE of 1000 tokens), as a user keeps one offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(
        [f"the quick brown fox jumps over the lazy dog {i}" for i in range(2000)],
        trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<|endoftext|>"]),
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>").save_pretrained(path)
    return Path(path)


def fake_gpu_env(tmp_path, mib: int = 81559, calls=None) -> dict:
    """The environment of a command that finds one GPU on this CPU machine: an `nvidia-smi` stand-in on PATH that
    answers the memory query (an H100's 81559 MiB; its arguments appended to `calls` when given). The GPU count is
    read from the hardware (resources.hardware_gpus): no environment variable makes one up."""
    bin_dir = Path(tmp_path) / "fake_gpu_bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + (f'echo "$@" >> {calls}\n' if calls else "") + f"echo {mib}\n")
    smi.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}

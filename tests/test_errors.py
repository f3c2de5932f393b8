"""Bad input gets one line naming the key, exit code 2, nothing written; fast paths import nothing heavy."""

from __future__ import annotations

import os
import re

import pytest
from ut_helpers import run_cli, run_python

# (overrides, a key the one line must name)
BAD_INPUTS = {
    "unknown backend": (["backend=foo"], "backend"),
    "unknown model": (["model=no_such_model"], "model"),
    "unknown key": (["train.foo=1"], "train.foo"),
    "wrong type": (["train.iters=abc"], "train.iters"),
    "heads % tp": (["parallel.tp=3"], "parallel.tp"),
    "layers % pp": (["model.num_layers=3", "parallel.pp=2"], "parallel.pp"),
    "gbs % (mbs*dp)": (["train.global_batch_size=30"], "train.global_batch_size"),
    "gbs % (mbs*dp), dp=2": (["parallel.dp=2", "train.global_batch_size=36"], "train.global_batch_size"),
    "sequence parallel with tp=1": (["parallel.sequence_parallel=true"], "parallel.sequence_parallel"),
    "seq_length above position table": (
        ["train.seq_length=1024", "model.max_position_embeddings=512"],
        "train.seq_length",
    ),
    "bad choice": (["precision.dtype=fp8"], "precision.dtype"),
    "missing tokenizer directory": (
        ["data.tokenizer_type=HuggingFaceTokenizer", "data.tokenizer_model=/no/such/dir"],
        "data.tokenizer_model=/no/such/dir",
    ),
    # Sizes the checks and stacks divide by: refused before anything divides ("integer modulo by zero" otherwise).
    "micro batch 0": (["train.micro_batch_size=0"], "train.micro_batch_size=0: must be > 0"),
    "negative micro batch": (["train.micro_batch_size=-4"], "train.micro_batch_size=-4: must be > 0"),
    "global batch 0": (["train.global_batch_size=0"], "train.global_batch_size=0: must be > 0"),
    "no layers": (["model.num_layers=0"], "model.num_layers=0: must be > 0"),
    "no query groups": (["model.num_query_groups=0"], "model.num_query_groups=0: must be > 0"),
    "dp 0": (["parallel.dp=0"], "parallel.dp=0: must be > 0"),
    "tp 0": (["parallel.tp=0"], "parallel.tp=0: must be > 0"),
    "seq length 0": (["train.seq_length=0"], "train.seq_length=0: must be > 0"),
    "no nodes": (["parallel.nnodes=0"], "parallel.nnodes=0: must be > 0"),
    "negative lr": (["optim.lr=-1e-4"], "optim.lr=-0.0001: must be >= 0"),
    "lr below min_lr": (["optim.lr=1e-5"], "optim.lr=1e-05 is below optim.min_lr=3e-05"),
    "beta2 of 1": (["optim.adam_beta2=1.0"], "optim.adam_beta2=1.0: must be in [0, 1)"),
    "dropout above 1": (["model.hidden_dropout=1.5"], "model.hidden_dropout=1.5: must be in [0, 1)"),
    "vpp without pp": (["parallel.vpp=2"], "parallel.vpp=2 interleaves pipeline stages and needs parallel.pp > 1"),
    "topk above experts": (
        ["model=deepseek_v2_lite", "model.moe_router_topk=65"],
        "model.moe_router_topk=65 is above model.num_experts=64",
    ),
    # Hydra lets `+` add keys past the schema's struct flag; the checks do not.
    "+ key in a group": (["+train.iter=5"], "train.iter: unknown key"),
    "+ key at the top": (["+foo=1"], "foo: unknown key"),
}


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("unified_train:")]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_exit_2_nothing_written(case, tmp_path):
    overrides, key = BAD_INPUTS[case]
    proc = run_cli([*overrides, "mode=parity"], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert key in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_unknown_model_lists_the_choices(tmp_path):
    proc = run_cli(["model=no_such_model", "mode=parity"], tmp_path, timeout=120)
    (line,) = _error_lines(proc.stderr)
    assert "vanilla_gpt" in line and "llama32_1b" in line


def test_divisibility_errors_propose_a_fix(tmp_path):
    proc = run_cli(["parallel.tp=3", "mode=parity"], tmp_path, timeout=120)
    (line,) = _error_lines(proc.stderr)
    assert "{1,2,4}" in line  # the valid tp values for 4 heads


def test_multirun_reports_every_bad_point_at_once(tmp_path):
    proc = run_cli(["-m", "parallel.tp=3,5", "mode=parity"], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 2, proc.stderr
    assert any("parallel.tp=3" in line for line in lines) and any("parallel.tp=5" in line for line in lines)
    assert list(tmp_path.iterdir()) == []


def test_multirun_reports_only_the_bad_points(tmp_path):
    proc = run_cli(["-m", "parallel.tp=1,3,2", "mode=parity"], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "parallel.tp=3" in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []


def _heavy_imports(importtime_stderr: str) -> list[str]:
    """Module names from `-X importtime` that are torch or megatron code (the empty `megatron` namespace package
    itself is reported separately)."""
    names = []
    for line in importtime_stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", line)
        if m and (m.group(1) == "torch" or m.group(1).startswith(("torch.", "megatron."))):
            names.append(m.group(1))
    return names


@pytest.mark.parametrize("flags", [["--help"], ["--cfg", "job"]], ids=["help", "cfg-job"])
def test_inspect_flags_import_neither_torch_nor_megatron(flags, tmp_path):
    proc = run_cli(flags, tmp_path, python_flags=("-X", "importtime"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "import time:" in proc.stderr  # the probe itself worked
    assert _heavy_imports(proc.stderr) == []
    if flags[0] == "--cfg":
        assert "model:" in proc.stdout and "vanilla_gpt" in proc.stdout
    else:
        assert "model" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_bad_input_imports_neither_torch_nor_megatron(tmp_path):
    proc = run_cli(["parallel.tp=3", "mode=parity"], tmp_path, python_flags=("-X", "importtime"), timeout=120)
    assert proc.returncode == 2
    assert _heavy_imports(proc.stderr) == []


def test_mlm_backend_never_imports_bridge(tmp_path):
    code = (
        "import sys\n"
        "from unified_train import backends, rundir\n"
        "from unified_train.compose import compose\n"
        "cfg = compose(['backend=mlm', 'parallel.dp=1'])\n"
        "mlm = backends.get('mlm')\n"
        "native = mlm.native_config(cfg, rundir.identity(cfg, world_size=1))\n"
        "mlm.describe(native)\n"
        "mlm.export(native)\n"
        "assert 'megatron.training' in sys.modules and 'megatron.core' in sys.modules\n"
        "bridge = sorted(m for m in sys.modules if m.startswith('megatron.bridge'))\n"
        "print('BRIDGE_MODULES', len(bridge), bridge[:5])\n"
    )
    proc = run_python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BRIDGE_MODULES 0 []" in proc.stdout, proc.stdout


def test_cfg_job_does_not_even_import_the_megatron_namespace(tmp_path):
    proc = run_cli(["--cfg", "job"], tmp_path, python_flags=("-X", "importtime"), timeout=120)
    assert proc.returncode == 0
    assert not re.search(r"\|\s*megatron$", proc.stderr, re.MULTILINE)


def test_training_without_a_gpu_is_refused_before_anything_is_written(tmp_path):
    proc = run_cli([], tmp_path, timeout=120)  # mode=train, default config
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("unified_train:")]
    assert len(lines) == 1 and "no GPU is visible" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_dry_run_lists_every_sweep_job_with_its_world_size(tmp_path):
    from ut_helpers import REPO

    proc = run_cli(
        ["--dry-run", "-m", "-cd", str(REPO / "sweeps"), "-cn", "tp_size", "mode=parity"], tmp_path, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "overrides" not in line]
    assert len(rows) == 12  # tp {1,2,4} x two sizes x two backends
    assert all(row.rstrip().endswith("| ok |") for row in rows)
    assert any("parallel.tp=4 model=gpt_350m backend=bridge | 4 |" in row for row in rows)
    assert list(tmp_path.iterdir()) == []


def _earlier_run(run_dir):
    """What a finished run leaves in its directory: Hydra's record of it and its metrics."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("earlier run's config\n")
    (run_dir / "metrics.jsonl").write_text('{"iteration": 1, "lm loss": 10.0}\n')
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "args, key",
    [
        (["mode=preflight", "hydra.run.dir={d}"], "hydra.run.dir"),
        (["mode=preflight", "run_dir={d}", "hydra.run.dir={d}_hydra"], "run_dir"),
        (["-m", "backend=mlm,bridge", "mode=parity", "hydra.sweep.dir={d}"], "hydra.sweep.dir"),
    ],
    ids=["run", "run_dir", "sweep"],
)
def test_an_earlier_run_is_never_overwritten(args, key, tmp_path):
    """Refused before Hydra starts: Hydra would otherwise rewrite .hydra/ (and multirun.yaml) first."""
    earlier = tmp_path / "earlier"
    before = _earlier_run(earlier)
    proc = run_cli([a.format(d=earlier) for a in args], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    (line,) = _error_lines(proc.stderr)
    assert line.startswith(f"unified_train: {key}: {earlier} already holds") and f"choose a new {key}" in line, line
    assert {p: p.read_bytes() for p in earlier.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier"]


def test_a_torchrun_rank_refuses_an_earlier_run_before_hydra_starts(tmp_path):
    """The ranks of one torchrun job create the directory together, so a rank does not take the .hydra/ its peers
    write for an earlier run; the earlier run's outputs still stop every rank before Hydra writes anything."""
    earlier = tmp_path / "earlier"
    before = _earlier_run(earlier)
    proc = run_cli(
        ["mode=preflight", f"hydra.run.dir={earlier}"],
        tmp_path,
        timeout=120,
        env={"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = _error_lines(proc.stderr)
    assert line.startswith(f"unified_train: hydra.run.dir: {earlier} already holds metrics.jsonl:"), line
    assert {p: p.read_bytes() for p in earlier.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "env",
    [{"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, {"SLURM_STEP_NUM_TASKS": "2"}],
    ids=["torchrun", "srun"],
)
def test_the_ranks_of_one_job_need_one_explicit_directory(env, tmp_path):
    """Every rank composes its own timestamped default directory; the ranks would write into different ones."""
    proc = run_cli(["mode=preflight"], tmp_path, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    (line,) = _error_lines(proc.stderr)
    assert line.startswith("unified_train: hydra.run.dir:") and "give hydra.run.dir=DIR" in line, line
    assert list(tmp_path.iterdir()) == []


def test_resume_is_explicit_and_reaches_both_stacks(tmp_path):
    from ut_helpers import compose, native

    from unified_train import checks

    default = compose()
    assert native("mlm", default).args.load is None
    assert native("bridge", default).container.checkpoint.load is None
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "latest_checkpointed_iteration.txt").write_text("10\n")
    resume = compose([f"checkpoint.load={checkpoints}"])
    assert checks.check(resume) == []
    assert native("mlm", resume).args.load == str(checkpoints)
    assert native("bridge", resume).container.checkpoint.load == str(checkpoints)


def test_a_resume_that_would_not_happen_is_refused(tmp_path):
    """Both stacks quietly start from scratch when the directory holds no checkpoint."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("10\n")
    proc = run_cli([f"checkpoint.load={run}", "mode=parity"], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    (line,) = _error_lines(proc.stderr)
    assert line == (
        f"unified_train: checkpoint.load={run} holds no checkpoint (no latest_checkpointed_iteration.txt), "
        f"so neither stack would resume: give checkpoint.load={run}/checkpoints"
    )


def test_a_model_too_big_for_the_gpu_is_refused_and_the_gpu_is_asked_once(tmp_path):
    """This machine has no GPU, so an `nvidia-smi` stand-in on PATH reports one 80 GiB GPU (an H100's 81559 MiB)
    and counts its calls: the memory check runs for every point of a sweep, nvidia-smi once per command."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho 81559\n')
    smi.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    proc = run_cli(
        ["-m", "model=vanilla_gpt,llama3_8b", "backend=mlm,bridge"],
        work,
        timeout=120,
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": "0"},
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("unified_train:")]
    assert len(lines) == 2, lines
    assert all(
        "model.name=llama3_8b: weights + optimizer state need ~" in line and "the GPU has 80 GiB" in line
        for line in lines
    ), lines
    assert {line.split("] ")[0] for line in lines} == {
        "unified_train: [model=llama3_8b backend=mlm",
        "unified_train: [model=llama3_8b backend=bridge",
    }
    assert calls.read_text().splitlines() == ["--query-gpu=memory.total --format=csv,noheader,nounits"]
    assert list(work.iterdir()) == []

"""Bad input gets one line naming the key, exit code 2, nothing written; fast paths import nothing heavy."""

from __future__ import annotations

import os
import re

import pytest
from ut_helpers import fake_gpu_env, run_cli, run_python

# (overrides, what the one line must say, naming the key[, the environment: added variables, or "gpu" for a host
# with one GPU (ut_helpers.fake_gpu_env)]). Overrides get mode=parity unless they set a mode; {file} is a regular
# file and {read_only} a directory that cannot be written, both outside the working directory.
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
    "bf16 gradients reduced in bf16": (
        ["precision.grad_reduce_in_fp32=false"],
        "precision.grad_reduce_in_fp32=false: both stacks reduce bf16 gradients in fp32",
    ),
    "expert split above a stage": (
        ["model=deepseek_v2_lite", "parallel.ep=8", "parallel.etp=2", "parallel.gpus_per_node=8"],
        "parallel.ep*etp=16 does not divide the 8 ranks of a pipeline stage",
    ),
    "etp without experts": (["parallel.etp=2"], "parallel.etp=2 needs a mixture-of-experts model"),
    # Hydra lets `+` add keys past the schema's struct flag; the checks do not.
    "+ key in a group": (["+train.iter=5"], "train.iter: unknown key"),
    "negative repeats": (["compare.repeats=-1"], "compare.repeats=-1: must be >= 0"),
    "+ key at the top": (["+foo=1"], "foo: unknown key"),
    # Issue 19's list: expert parallelism above the world, a pass-through string, an unquoted Bridge extra.
    "ep above the world": (["model=deepseek_v2_lite", "parallel.ep=8"], "parallel.ep*etp=8 does not divide the 1"),
    "bogus checkpoint format": (["checkpoint.format=bogus"], "checkpoint.format=bogus: not one of torch_dist"),
    "unquoted Bridge extra": (
        ["backend=bridge", "backend.extra=[model.seq_length=4096]"],
        "backend.extra=[model.seq_length=4096]: cannot be parsed",
    ),
    # No GPU is read from the hardware: none of these make one up (this machine has none).
    "no GPU, gpus_per_node given": (["mode=train", "parallel.gpus_per_node=1"], "mode=train: no GPU is visible"),
    "no GPU, CUDA_VISIBLE_DEVICES": (["mode=train"], "mode=train: no GPU is visible", {"CUDA_VISIBLE_DEVICES": "0"}),
    "no GPU, WORLD_SIZE=1": (["mode=train"], "mode=train: no GPU is visible", {"WORLD_SIZE": "1"}),
    "no GPU for numerics": (["mode=numerics"], "mode=numerics: no GPU is visible"),
    # With one GPU (an nvidia-smi stand-in): what this host cannot start.
    "several nodes without a launcher": (["mode=train", "parallel.nnodes=2"], "parallel.nnodes=2: a job of", "gpu"),
    "more GPUs per node than the host": (["mode=train", "parallel.gpus_per_node=8"], "parallel.gpus_per_node=8", "gpu"),
    "world above the GPUs": (["mode=train", "parallel.dp=2"], "parallel.tp*pp*cp*dp = 2 GPUs but 1", "gpu"),
    "model above the GPU's memory": (["mode=train", "model=llama3_8b"], "model.name=llama3_8b: weights", "gpu"),
    # Output directories that cannot be made (parity and export write none): under a regular file, read-only.
    "run dir under a file": (
        ["mode=preflight", "hydra.run.dir={file}/run"],
        "hydra.run.dir={file}/run: cannot be created",
    ),
    "sweep dir under a file": (
        ["-m", "backend=mlm,bridge", "mode=preflight", "hydra.sweep.dir={file}/sweep"],
        "hydra.sweep.dir={file}/sweep: cannot be created",
    ),
    "run_dir is a file": (["mode=preflight", "run_dir={file}"], "run_dir={file}: cannot be created"),
    "run dir where no directory can be made": (
        ["mode=preflight", "hydra.run.dir=/proc/unified_train/run"],
        "hydra.run.dir=/proc/unified_train/run: cannot be created",
    ),
    "run dir read-only": (
        ["mode=preflight", "hydra.run.dir={read_only}/run"],
        "hydra.run.dir={read_only}/run: cannot be created",
    ),
    # Sizes, rates and fractions out of range.
    "pp 0": (["parallel.pp=0"], "parallel.pp=0: must be > 0"),
    "cp 0": (["parallel.cp=0"], "parallel.cp=0: must be > 0"),
    "ep 0": (["parallel.ep=0"], "parallel.ep=0: must be > 0"),
    "no hidden size": (["model.hidden_size=0"], "model.hidden_size=0: must be > 0"),
    "no heads": (["model.num_attention_heads=0"], "model.num_attention_heads=0: must be > 0"),
    "negative ffn size": (["model.ffn_hidden_size=-1"], "model.ffn_hidden_size=-1: must be > 0"),
    "no vocabulary": (["model.vocab_size=0"], "model.vocab_size=0: must be > 0"),
    "no iterations": (["train.iters=0"], "train.iters=0: must be > 0"),
    "no decay": (["sched.lr_decay_iters=0"], "sched.lr_decay_iters=0: must be > 0"),
    "negative warm-up": (["sched.lr_warmup_iters=-1"], "sched.lr_warmup_iters=-1: must be >= 0"),
    "eval interval 0": (["validation.eval_interval=0"], "validation.eval_interval=0: must be > 0"),
    "save interval 0": (["checkpoint.save_interval=0"], "checkpoint.save_interval=0: must be > 0"),
    "log interval 0": (["logger.log_interval=0"], "logger.log_interval=0: must be > 0"),
    "negative weight decay": (["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1: must be >= 0"),
    "negative clip": (["optim.clip_grad=-1"], "optim.clip_grad=-1.0: must be >= 0"),
    "beta1 of 1": (["optim.adam_beta1=1.0"], "optim.adam_beta1=1.0: must be in [0, 1)"),
    "adam eps 0": (["optim.adam_eps=0"], "optim.adam_eps=0.0: must be > 0"),
    "negative workers": (["data.num_workers=-1"], "data.num_workers=-1: must be >= 0"),
    # Types, choices, keys and the command line's grammar.
    "tp not a number": (["parallel.tp=two"], "parallel.tp: Value 'two'"),
    "fractional micro batch": (["train.micro_batch_size=1.5"], "train.micro_batch_size: Value '1.5'"),
    "bogus attention": (["kernels.attention=bogus"], "kernels.attention=bogus: not one of"),
    "bogus decay style": (["sched.lr_decay_style=bogus"], "sched.lr_decay_style=bogus: not one of"),
    "bogus mode": (["mode=bogus"], "mode=bogus: not one of train, parity"),
    "bogus exit signal": (["checkpoint.exit_signal=SIGFOO"], "checkpoint.exit_signal=SIGFOO: not one of"),
    "unknown determinism option": (["determinism=bogus"], "determinism/bogus"),
    "misspelt key": (["model.num_layer=4"], "model.num_layer: unknown key"),
    "unparsable override": (["train.iters=1)"], "train.iters=1): cannot be parsed"),
    "a group removed": (["~backend"], "backend.name: required but not set"),
    # Relations between values.
    "cp vs sequence length": (["parallel.cp=3"], "train.seq_length=512 is not divisible by 2*parallel.cp=6"),
    "warm-up not below decay": (["sched.lr_warmup_iters=10"], "sched.lr_warmup_iters=10 must be below"),
    "experts % ep": (
        ["model=deepseek_v2_lite", "parallel.ep=3", "parallel.dp=3", "train.global_batch_size=48"],
        "model.num_experts=64 is not divisible by parallel.ep=3",
    ),
    "ep without experts": (["parallel.ep=2"], "parallel.ep=2 needs a mixture-of-experts model"),
    "query groups % heads": (["model.num_query_groups=3"], "model.num_query_groups=3 does not divide"),
    "query groups % tp": (["model=llama32_1b", "parallel.tp=16"], "model.num_query_groups=8 is not divisible"),
    "dense layers >= layers": (["model=deepseek_v2_lite", "model.num_layers=1"], "model.moe_first_dense_layers=1"),
    "position table vs sequence": (["model.max_position_embeddings=1024"], "model.max_position_embeddings=1024"),
    "flex with attention dropout": (["kernels.attention=flex"], "kernels.attention=flex with model.attention_dropout"),
    "local attention with MLA": (["model=deepseek_v2_lite", "kernels.attention=local"], "kernels.attention=local"),
    "Transformer Engine missing": (["kernels.transformer_impl=transformer_engine"], "kernels.transformer_impl="),
    "deterministic with fused CE": (
        ["determinism.deterministic_mode=true", "kernels.cross_entropy_loss_fusion=true"],
        "determinism.deterministic_mode=true needs kernels.cross_entropy_loss_fusion=false",
    ),
    # Data, checkpoints, resume.
    "indexed data without a path": (["data=indexed", "data.tokenizer_type=NullTokenizer"], "data.data_path is empty"),
    "indexed data missing": (
        ["data=indexed", "data.tokenizer_type=NullTokenizer", "data.data_path=[/no/such/prefix]"],
        "data.data_path: /no/such/prefix.bin not found",
    ),
    "mock data with a path": (["data.data_path=[/data/a]"], "data.data_path is set but data.type=mock"),
    "tokenizer without a directory": (["data.tokenizer_type=HuggingFaceTokenizer"], "data.tokenizer_model is unset"),
    "checkpoint directory missing": (["checkpoint.load=/no/such/dir"], "checkpoint.load=/no/such/dir: no such"),
    "iteration without a checkpoint": (["checkpoint.load_iteration=5"], "checkpoint.load_iteration is set but"),
    "rerun without saving": (
        ["train.rerun_mode=validate_results", "checkpoint=none"],
        "train.rerun_mode=validate_results saves a checkpoint",
    ),
    "resume always from nothing": (
        ["mode=preflight", "checkpoint.resume=always"],
        "checkpoint.resume=always: no checkpoint",
    ),
    "numerics continuing a run": (["mode=numerics", "checkpoint.resume=if_available"], "checkpoint.resume=if_avail"),
    # hydra/launcher=slurm: checked on the submitting host, which needs no GPU.
    "Slurm without GPUs per node": (["-m", "hydra/launcher=slurm"], "parallel.gpus_per_node is unset"),
    "Slurm world vs tasks": (
        ["-m", "hydra/launcher=slurm", "parallel.gpus_per_node=4", "parallel.dp=8"],
        "parallel.tp*pp*cp*dp = 8 ranks but the Slurm job has 1 node(s) x 4 tasks",
    ),
}


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("unified_train:")]


def _read_only_dir(tmp_path) -> str:
    """A directory this process cannot write into: mode 0o500, or (root passes permission checks) a read-only
    mount."""
    directory = tmp_path / "read_only"
    directory.mkdir()
    directory.chmod(0o500)
    if not os.access(directory, os.W_OK):
        return str(directory)
    if os.path.isdir("/proc/sys") and not os.access("/proc/sys", os.W_OK):
        return "/proc/sys"
    pytest.skip("running as root with no read-only mount to write into")


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_exit_2_nothing_written(case, tmp_path):
    """Exit code 2, one `unified_train:` line saying what is wrong with which key, nothing on stdout, nothing written,
    and neither torch nor megatron imported (-X importtime lists every module the process imported)."""
    overrides, says, *environment = BAD_INPUTS[case]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    places = {"file": tmp_path / "a_file", "read_only": None}
    places["file"].write_text("not a directory\n")
    if any("{read_only}" in o for o in overrides):
        places["read_only"] = _read_only_dir(tmp_path)
    overrides, says = [o.format(**places) for o in overrides], says.format(**places)
    env = fake_gpu_env(tmp_path) if environment == ["gpu"] else (environment or [{}])[0]
    mode = [] if any(o.startswith("mode=") for o in overrides) else ["mode=parity"]
    proc = run_cli([*overrides, *mode], cwd, python_flags=("-X", "importtime"), timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1, lines
    assert says in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert "import time:" in proc.stderr and _heavy_imports(proc.stderr) == []
    assert list(cwd.iterdir()) == []
    assert places["file"].read_text() == "not a directory\n"


def test_the_bad_input_table_covers_issue_19():
    assert len(BAD_INPUTS) >= 60


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
        (["-m", "backend=mlm,bridge", "mode=preflight", "hydra.sweep.dir={d}"], "hydra.sweep.dir"),
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

"""W&B grouping on CPU: everything short of training, with the real wandb in offline mode."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ut_helpers import compose, job_for, offline_wandb_run, subprocess_env

from unified_train import mcore_fields, rundir
from unified_train.backends.mlm.argv import build_argv
from unified_train.results import wandb_runs


def _env(cfg, run_dir, sweep_id):
    return wandb_runs.wandb_env(cfg, job_for(cfg, run_dir, sweep_id))


def test_pair_halves_share_the_group_and_differ_in_job_type(tmp_path):
    envs = {b: _env(compose([f"backend={b}", "model=llama32_1b"]), tmp_path, "s1") for b in ("mlm", "bridge")}
    assert envs["mlm"]["WANDB_RUN_GROUP"] == envs["bridge"]["WANDB_RUN_GROUP"]
    assert envs["mlm"]["WANDB_RUN_GROUP"] == rundir.pair_id(compose(["model=llama32_1b"]))
    assert (envs["mlm"]["WANDB_JOB_TYPE"], envs["bridge"]["WANDB_JOB_TYPE"]) == ("mlm", "bridge")
    assert envs["mlm"]["WANDB_TAGS"] == "llama32_1b,tp1,pp1,sweep:s1"
    other = _env(compose(["backend=mlm", "model=llama32_1b", "optim.lr=1e-4"]), tmp_path, "s1")
    assert other["WANDB_RUN_GROUP"] != envs["mlm"]["WANDB_RUN_GROUP"]  # a different pair


def test_mode_follows_the_api_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert _env(compose(), tmp_path, "x")["WANDB_MODE"] == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert _env(compose(), tmp_path, "x")["WANDB_MODE"] == "online"
    assert _env(compose(["logger.wandb.mode=disabled"]), tmp_path, "x")["WANDB_MODE"] == "disabled"


def test_logger_none_disables_wandb_in_both_stacks(tmp_path):
    cfg = compose(["logger=none"])
    assert all(v is None for v in wandb_runs.wandb_env(cfg, job_for(cfg, tmp_path, "x")).values())
    assert mcore_fields.logger(cfg, job_for(cfg, tmp_path))["wandb_project"] is None
    assert "--wandb-project" not in build_argv(cfg, job_for(cfg, tmp_path))


def test_both_stacks_get_project_name_and_save_dir(tmp_path):
    cfg = compose(["logger.wandb.project=proj", "logger.wandb.entity=team"])
    argv = build_argv(cfg, job_for(cfg, tmp_path))
    for flag, value in (
        ("--wandb-project", "proj"),
        ("--wandb-entity", "team"),
        ("--wandb-exp-name", "vanilla_gpt-tp1-pp1-mlm"),
        ("--wandb-save-dir", str(tmp_path / "wandb")),
        ("--tensorboard-dir", str(tmp_path / "tensorboard")),
    ):
        assert argv[argv.index(flag) + 1] == value  # MLM sends metrics to W&B only with a TensorBoard dir


def test_offline_run_carries_group_job_type_tags_and_history(tmp_path):
    """A real offline wandb run started the way the stacks start theirs, read back from its .wandb file."""
    cfg = compose(["backend=bridge", "model=qwen3_8b"])
    offline_wandb_run(cfg, tmp_path, "sweep7", unified={"model": {"name": "qwen3_8b"}})
    run = wandb_runs.read_offline_run(str(tmp_path / "wandb"))
    assert run["group"] == rundir.pair_id(cfg) and run["job_type"] == "bridge"
    assert run["tags"] == ["qwen3_8b", "tp1", "pp1", "sweep:sweep7"]
    assert [h["lm loss"] for h in run["history"] if "lm loss" in h] == [9.0, 8.0, 7.0]
    assert run["config"]["unified"] == {"model": {"name": "qwen3_8b"}} and run["config"]["native"] == 1


def test_the_two_halves_of_an_in_process_pair_get_their_own_job_type(tmp_path):
    """wandb reads its WANDB_* settings once per process: the second job of a paired multirun in one process
    must still be logged as its own backend, in its own directory (runtime.job.run_job ends each job's run)."""
    code = (
        "import os, sys, wandb\n"
        "from ut_helpers import compose\n"
        "from ut_helpers import job_for\n"
        "from unified_train.results import wandb_runs\n"
        "for backend in ('mlm', 'bridge'):\n"
        "    cfg = compose([f'backend={backend}'])\n"
        "    env = wandb_runs.wandb_env(cfg, job_for(cfg, os.path.join(sys.argv[1], backend), 'pair_sweep'))\n"
        "    wandb_runs.apply_env(env)  # creates WANDB_DIR\n"
        "    wandb.init(dir=env['WANDB_DIR'], name=backend, project='unified_train')  # as the stack calls it\n"
        "    wandb.log({'lm loss': 10.0}, step=1)\n"
        "    wandb_runs.end_run()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=Path(__file__).parent,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = {b: wandb_runs.read_offline_run(str(tmp_path / b / "wandb")) for b in ("mlm", "bridge")}
    assert {b: r["job_type"] for b, r in runs.items()} == {"mlm": "mlm", "bridge": "bridge"}
    assert runs["mlm"]["group"] == runs["bridge"]["group"] == rundir.pair_id(compose())

"""Real training runs on a GPU (marker `gpu`; skipped without CUDA). Run on the GPU node:

    python -m pytest tests/gpu -m gpu -s

Each test starts `python -m unified_train` as a user would and judges only the files the runs wrote. Pairs are
bitwise only while inductor's deterministic mode holds for every compile (runtime.env.pin_compiler_determinism);
otherwise it picks reduction kernels by timing them, and one half's iteration-1 loss can come out an ulp off.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gpu_helpers import (
    GOLDEN_LOSSES,
    QUIET,
    UPSTREAM_LOSSES,
    UPSTREAM_RTOL,
    assert_bitwise,
    job_dirs,
    pair,
    publish,
    read_metrics,
    run_unified,
    series,
)

from unified_train.results import compare

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def default_sweep(tmp_path_factory) -> Path:
    """The user's command, `-m backend=mlm,bridge`, with every default: W&B (offline here) and checkpoints on."""
    root = tmp_path_factory.mktemp("pair")
    pair(root, "default_pair", quiet=False)
    return root / "default_pair"


@pytest.fixture(scope="module")
def default_pair(default_sweep) -> dict[str, list[dict]]:
    return {b: read_metrics(d) for b, d in job_dirs(default_sweep).items()}


def _assert_default_trajectory(metrics: list[dict]) -> None:
    """Upstream's losses to within UPSTREAM_RTOL, and this GPU model's golden losses bit for bit."""
    import torch

    losses = series(metrics, "lm loss")
    assert losses == pytest.approx(UPSTREAM_LOSSES, rel=UPSTREAM_RTOL), losses
    golden = GOLDEN_LOSSES.get(torch.cuda.get_device_name())
    assert golden is None or losses == golden, f"{losses} vs the {torch.cuda.get_device_name()} golden {golden}"


def test_default_pair_is_bitwise_and_matches_upstream(default_pair):
    assert_bitwise(default_pair["mlm"], default_pair["bridge"])
    _assert_default_trajectory(default_pair["mlm"])


def test_inprocess_pair_equals_separate_processes(default_pair, tmp_path):
    for backend in ("mlm", "bridge"):
        run_dir = tmp_path / backend
        run_unified([f"backend={backend}", f"hydra.run.dir={run_dir}", *QUIET], tmp_path / f"{backend}.log")
        assert_bitwise(read_metrics(run_dir), default_pair[backend])


def test_bridge_first_in_one_process_changes_nothing(default_pair, tmp_path):
    """A sweep runs MLM after Bridge in one process too (`backend=mlm,bridge rng.seed=1,2`): what Bridge leaves
    behind must not reach MLM's numerics either."""
    runs = pair(tmp_path, "bridge_first", order="bridge,mlm")
    for backend in ("mlm", "bridge"):
        assert_bitwise(runs[backend], default_pair[backend])


def test_both_stacks_log_the_pair_to_wandb(default_sweep, default_pair):
    """The offline W&B runs the stacks wrote, read back: grouping, tags, and every iteration's lm loss."""
    from unified_train.results import wandb_runs

    lines = []
    for backend, job_dir in job_dirs(default_sweep).items():
        info = json.loads((job_dir / "run.json").read_text())
        run = wandb_runs.read_offline_run(str(job_dir / "wandb"))
        assert (run["group"], run["job_type"]) == (info["pair_id"], backend)
        assert run["tags"] == ["vanilla_gpt", "tp1", "pp1", f"sweep:{default_sweep.name}"]
        assert run["config"]["unified"]["backend"]["name"] == backend
        logged = [h["lm loss"] for h in run["history"] if "lm loss" in h]
        assert logged == pytest.approx(series(default_pair[backend], "lm loss"), rel=1e-6)
        assert any("grad-norm" in h for h in run["history"])
        lines.append(
            f"- {backend}: group {run['group']}, job_type {run['job_type']}, tags {run['tags']}, "
            f"{len(logged)} lm loss values, equal to metrics.jsonl: "
            f"{logged == series(default_pair[backend], 'lm loss')}"
        )
    assert (default_sweep / "wandb_panels.json").exists()
    publish("W&B runs read back", "\n".join(lines))


def test_checkpoints_are_saved_at_the_end(default_sweep):
    for backend, job_dir in job_dirs(default_sweep).items():
        tracker = job_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
        assert tracker.read_text().strip() == "10", backend
        assert (job_dir / "checkpoints" / "iter_0000010").is_dir(), backend


def test_100_iterations_with_dropout_stay_bitwise(tmp_path):
    runs = pair(tmp_path, "vanilla_100", "train.iters=100")
    assert runs["mlm"][0]["iteration"] == 1 and len(runs["mlm"]) == 100
    assert_bitwise(runs["mlm"], runs["bridge"])


@pytest.fixture(scope="module")
def isolated_pair(tmp_path_factory) -> dict[str, list[dict]]:
    """launch.isolation=process: each job of the pair in a fresh worker process."""
    return pair(tmp_path_factory.mktemp("isolated"), "isolated_pair", "launch.isolation=process")


def test_process_isolation_is_bitwise_and_matches_upstream(isolated_pair):
    assert_bitwise(isolated_pair["mlm"], isolated_pair["bridge"])
    _assert_default_trajectory(isolated_pair["mlm"])


def test_under_torchrun_equals_the_pair(isolated_pair, tmp_path):
    run_dir = tmp_path / "torchrun"
    run_unified(
        ["backend=bridge", f"hydra.run.dir={run_dir}", *QUIET],
        tmp_path / "torchrun.log",
        launcher=("-m", "torch.distributed.run", "--nproc-per-node=1", "-m"),
    )
    assert_bitwise(read_metrics(run_dir), isolated_pair["bridge"])


def test_llama_style_preset_is_bitwise(tmp_path):
    """On megatron-core's own DotProductAttention (auto would pick flex for llama: see the flex test below)."""
    runs = pair(tmp_path, "llama32_1b_2layers", "model=llama32_1b", "model.num_layers=2", "kernels.attention=local")
    assert_bitwise(runs["mlm"], runs["bridge"])


def test_indexed_data_with_a_tokenizer_of_its_own_is_bitwise(tmp_path):
    """Megatron .bin/.idx data (two prefixes blended 30/70) and a Hugging Face tokenizer directory, both written
    here on disk: the pair trains bitwise on them too (the CPU suite shows both stacks draw the same samples)."""
    from ut_helpers import write_hf_tokenizer, write_indexed_prefix

    for name, documents, seed in (("a", 300, 0), ("b", 500, 1)):
        write_indexed_prefix(tmp_path / name, documents, seed)
    tokenizer = write_hf_tokenizer(tmp_path / "tokenizer")
    runs = pair(
        tmp_path,
        "indexed_pair",
        "data=indexed",
        f"data.tokenizer_model={tokenizer}",
        "data.split='90,5,5'",
        f"data.data_path=['0.3 {tmp_path}/a','0.7 {tmp_path}/b']",
    )
    assert_bitwise(runs["mlm"], runs["bridge"])


def test_cyclic_sampler_aligns_validation_and_test_losses(tmp_path):
    """With data.dataloader_type=cyclic both stacks draw validation (and training) samples with the same random
    sampler, so the validation and test losses are bitwise equal too, not only the training losses."""
    runs = pair(tmp_path, "cyclic_pair", "data.dataloader_type=cyclic")
    assert_bitwise(runs["mlm"], runs["bridge"])
    assert runs["mlm"][-1]["val_loss"] == runs["bridge"][-1]["val_loss"]
    summaries = {b: json.loads((d / "summary.json").read_text()) for b, d in job_dirs(tmp_path / "cyclic_pair").items()}
    for key in ("final_valid_loss", "test_loss"):
        assert summaries["mlm"][key] == summaries["bridge"][key], (key, summaries)
    publish(
        "cyclic sampler: validation",
        f"val_loss@{len(runs['mlm'])} {runs['mlm'][-1]['val_loss']!r} (both); "
        + ", ".join(
            f"{k} {summaries['mlm'][k]!r} / {summaries['bridge'][k]!r}" for k in ("final_valid_loss", "test_loss")
        ),
    )


def _attention(sweep: Path) -> dict[str, str]:
    return {b: json.loads((d / "run.json").read_text())["attention"] for b, d in job_dirs(sweep).items()}


def test_llama_pair_on_flex_attention_is_bitwise(tmp_path):
    """kernels.attention resolves to flex for llama (no attention dropout): both stacks build our FlexAttention
    and the pair stays bitwise."""
    runs = pair(tmp_path, "llama_flex", "model=llama32_1b", "model.num_layers=2", "kernels.attention=flex")
    assert _attention(tmp_path / "llama_flex") == {"mlm": "flex", "bridge": "flex"}
    assert_bitwise(runs["mlm"], runs["bridge"])


def test_deepseek_v2_lite_pair_trains_and_is_bitwise_under_strict_determinism(tmp_path):
    """Multi-latent attention (on flex: megatron-core's local attention cannot build it) and MoE (a dense first
    layer, 64 experts after it): both stacks train it, bitwise once MoE dispatch is deterministic."""
    runs = pair(tmp_path, "deepseek_strict", "model=deepseek_v2_lite", "model.num_layers=4", "determinism=strict")
    assert _attention(tmp_path / "deepseek_strict") == {"mlm": "flex", "bridge": "flex"}
    assert_bitwise(runs["mlm"], runs["bridge"])
    losses = series(runs["mlm"], "lm loss")
    assert losses[-1] < losses[0]  # it learns


def test_flex_agrees_with_local_attention_over_50_iterations(tmp_path):
    """The kernel is right, not only self-consistent: 50 iterations of a llama-style model on flex and on
    megatron-core's own DotProductAttention pass the statistical gate against each other."""
    sweep = tmp_path / "flex_vs_local"
    run_unified(
        [
            "-m",
            "backend=mlm",
            "kernels.attention=flex,local",
            "model=llama32_1b",
            "model.num_layers=2",
            "train.iters=50",
            f"hydra.sweep.dir={sweep}",
            *QUIET,
        ],
        tmp_path / "flex_vs_local.log",
    )
    runs = {json.loads(p.read_text())["attention"]: read_metrics(p.parent) for p in sweep.rglob("run.json")}
    local, flex = (
        dict(zip(series(runs[k], "iteration"), series(runs[k], "lm loss"), strict=True)) for k in ("local", "flex")
    )
    ok, detail = compare.statistical(local, flex)
    golden_ok, golden_detail = compare.golden(local, flex)
    publish(
        "flex vs local, 50 iterations",
        f"statistical: {detail}; golden: {golden_detail}; final lm loss local {local[50]!r}, flex {flex[50]!r}",
    )
    assert ok, detail
    assert golden_ok, golden_detail

"""mode=numerics: the recorder on a real megatron-core GPTModel (tests/numerics_job.py, CPU, one gloo rank), the
localisation compare makes from two recorded runs, and the mode's config, checks and dispatch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from ut_helpers import compose, describe_both, fake_gpu_env, run_cli, subprocess_env, write_run_dir

from unified_train import checks, rundir
from unified_train import config as C
from unified_train.modes import numerics as numerics_mode
from unified_train.modes import parity
from unified_train.results import compare
from unified_train.results import numerics as localisation

JOB = os.path.join(os.path.dirname(__file__), "numerics_job.py")
LAYER_1_ATTENTION = "decoder.layers.0.self_attention.core_attention"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Every variant of tests/numerics_job.py recorded once: (output directory, the job's report)."""
    out = tmp_path_factory.mktemp("numerics")
    done = subprocess.run(
        [sys.executable, JOB, str(out)], capture_output=True, text=True, timeout=600, env=subprocess_env()
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads(done.stdout.strip().splitlines()[-1])


def _records(recorded, variant, kind):
    out, _ = recorded
    return [r for r in rundir.read_numerics(str(out / variant)) if r["kind"] == kind]


# --- the recorder, on a real GPTModel ------------------------------------------------------------------------------


def test_every_module_output_is_recorded_in_the_order_modules_finish(recorded):
    _, report = recorded
    outputs = _records(recorded, "plain", "output")
    assert {r["microbatch"] for r in outputs} == {0, 1}
    first = [r["name"] for r in outputs if r["microbatch"] == 0]
    assert first == [r["name"] for r in outputs if r["microbatch"] == 1]
    assert len(first) == len(set(first))  # each module once per micro-batch
    modules = report["plain"]["modules"]  # every named module of the model -> its class
    # All of them but the two that produce no tensor: bias-dropout-add placeholders (they return a function) and
    # the ModuleList that holds the layers (never called).
    assert set(modules) - set(first) == {n for n, kind in modules.items() if kind in ("IdentityFuncOp", "ModuleList")}
    assert set(first) <= set(modules)
    order = [
        "embedding.word_embeddings",
        "embedding",
        "decoder.layers.0.input_layernorm",
        "decoder.layers.0.self_attention.linear_qkv",
        f"{LAYER_1_ATTENTION}.scale_mask_softmax",
        LAYER_1_ATTENTION,
        "decoder.layers.0.self_attention.linear_proj",
        "decoder.layers.0.self_attention",
        "decoder.layers.0.mlp.linear_fc1",
        "decoder.layers.0.mlp.linear_fc2",
        "decoder.layers.0.mlp",
        "decoder.layers.0",
        "decoder.layers.1.input_layernorm",
        "decoder.layers.1",
        "decoder.final_layernorm",
        "decoder",
        "output_layer",
        "(model)",
    ]
    assert [n for n in first if n in order] == order
    for r in outputs:
        assert len(r["sha256"]) == 64 and isinstance(r["norm"], float) and r["dtype"] == "float32", r
        assert (r["rank"], r["pp_rank"], r["chunk"], r["call"]) == (0, 0, 0, 0)
    assert next(r for r in outputs if r["name"] == "output_layer")["shape"] == [16, 2, 128]  # (s, b, vocab) logits


def test_recorded_hashes_and_norms_are_those_of_the_tensors(recorded):
    """The model's own output (the loss per token) as the test saw it, against its record."""
    _, report = recorded
    losses = [r for r in _records(recorded, "plain", "output") if r["name"] == "(model)"]
    assert [r["sha256"] for r in losses] == report["plain"]["loss_sha256"]
    assert [r["norm"] for r in losses] == pytest.approx(report["plain"]["loss_norm"], rel=1e-12)
    assert len(set(report["plain"]["loss_sha256"])) == 2  # two micro-batches, two different losses


def test_every_gradient_is_recorded_in_backward_order(recorded):
    _, report = recorded
    grads = _records(recorded, "plain", "grad")
    names = [r["name"] for r in grads]
    assert {r["name"]: r["sha256"] for r in grads} == report["plain"]["grad_sha256"]  # every parameter's .grad
    assert len(names) == len(report["plain"]["grad_sha256"]) and {r["source"] for r in grads} == {"grad"}
    assert names[0] == "output_layer.weight" and names[-1] == "embedding.word_embeddings.weight"
    assert max(names.index(n) for n in names if n.startswith("decoder.layers.1.")) < min(
        names.index(n) for n in names if n.startswith("decoder.layers.0.")
    )
    # Backward reaches the output projection before the QKV projection, though the attention block registers
    # the output projection first.
    proj, qkv = (names.index(f"decoder.layers.0.self_attention.{m}.weight") for m in ("linear_proj", "linear_qkv"))
    assert proj < qkv


def test_recording_stops_at_finish(recorded):
    out, report = recorded
    assert report["plain"]["path"] == str(out / "plain" / rundir.NUMERICS)
    # A second iteration ran after finish(): nothing more was recorded, and the file holds what was recorded.
    assert report["plain"]["records_after_finish"] == len(rundir.read_numerics(str(out / "plain")))


def test_through_ddp_gradients_come_from_main_grad_at_the_optimizer_step(recorded):
    """bf16 megatron-core DDP around Float16Module, as both stacks wrap the model: the records are written when
    megatron's optimizer steps, under the unwrapped names, with the gradient buffer's contents."""
    out, report = recorded
    ddp = report["ddp"]
    assert ddp["path"] == str(out / "ddp" / rundir.NUMERICS)
    assert ddp["wrapped_names"] == ["", "module", "module.module"]  # the wrappers were there
    assert ddp["step_restored"]  # the optimizer's own step is back after the first
    outputs, grads = _records(recorded, "ddp", "output"), _records(recorded, "ddp", "grad")
    assert {r["name"] for r in outputs} == {r["name"] for r in _records(recorded, "plain", "output")}
    assert next(r for r in outputs if r["name"] == "decoder.layers.0")["dtype"] == "bfloat16"
    assert {r["name"]: r["sha256"] for r in grads} == ddp["main_grad_sha256"]
    assert {r["source"] for r in grads} == {"main_grad"} and {r["dtype"] for r in grads} == {"float32"}


def test_layers_are_named_by_their_global_number():
    """On a later pipeline stage the local layer index restarts at 0; the name uses layer_number, as both stacks
    number layers."""
    import torch

    from unified_train.backends import numerics

    class Layer(torch.nn.Module):
        def __init__(self, number):
            super().__init__()
            self.layer_number = number
            self.mlp = torch.nn.Linear(2, 2)

    stage = torch.nn.Module()
    stage.decoder = torch.nn.Module()
    stage.decoder.layers = torch.nn.ModuleList([Layer(3), Layer(4)])  # layers 3 and 4 of 4 (the second stage)
    names = set(numerics.module_names(stage).values())
    assert {"decoder.layers.2", "decoder.layers.3.mlp", "(model)"} <= names
    assert not any(n.startswith(("decoder.layers.0", "decoder.layers.1")) for n in names)


# --- localisation ----------------------------------------------------------------------------------------------


def _localise(recorded, a, b):
    out, _ = recorded
    return localisation.localise(rundir.read_numerics(str(out / a)), rundir.read_numerics(str(out / b)))


def test_two_identical_runs_are_bitwise_equal_everywhere(recorded):
    found = _localise(recorded, "plain", "again")
    assert found.equal and found.outputs == 2 * 36 and found.grads == 29


def test_a_changed_softmax_scale_is_found_in_layer_1_attention(recorded):
    found = _localise(recorded, "plain", "softmax")
    first = found.first_output
    assert first.name == f"{LAYER_1_ATTENTION}.scale_mask_softmax"  # inside the core attention, its innermost
    assert first.ref["microbatch"] == 0 and 0 < first.relative < 1
    assert found.last_equal_output == "decoder.layers.0.self_attention.linear_qkv"
    differing = {d.name for d in found.output_differences}
    assert LAYER_1_ATTENTION in differing and "decoder.layers.0.input_layernorm" not in differing
    # Backward starts at the loss, which the changed forward already reached.
    assert found.first_grad.name == "output_layer.weight"
    assert not found.only_ref and not found.only_cand


def test_a_gradient_only_change_is_found_at_that_parameter(recorded):
    found = _localise(recorded, "plain", "grad_hook")
    assert found.first_output is None and found.outputs == 72
    assert [d.name for d in found.grad_differences] == ["decoder.layers.0.mlp.linear_fc1.weight"]
    assert found.first_grad.relative == pytest.approx(0.5)


def _numerics_pair(root, recorded, cand_variant: str, mode: str = "numerics"):
    out, _ = recorded
    for backend, variant in (("mlm", "plain"), ("bridge", cand_variant)):
        run_dir = write_run_dir(root / backend, backend, losses=[10.5])
        record = json.loads((run_dir / rundir.RUN_JSON).read_text())
        (run_dir / rundir.RUN_JSON).write_text(json.dumps({**record, "mode": mode}))
        rundir.write_numerics(str(run_dir), 0, rundir.read_numerics(str(out / variant)))
    return root


def test_compare_names_where_a_numerics_pair_parts(recorded, tmp_path):
    text, _ = compare.report([str(_numerics_pair(tmp_path / "sweep", recorded, "softmax"))])
    assert f"first differing module output `{LAYER_1_ATTENTION}.scale_mask_softmax` (micro-batch 0, rank 0)" in text
    assert "first differing gradient, in the order backward produces them, `output_layer.weight`" in text
    assert f"| 1 | `{LAYER_1_ATTENTION}.scale_mask_softmax` |" in text


def test_compare_says_when_a_numerics_pair_is_equal_and_skips_training_pairs(recorded, tmp_path):
    text, _ = compare.report([str(_numerics_pair(tmp_path / "equal", recorded, "again"))])
    assert "every module output (72) and every gradient (29) of iteration 1 is bitwise equal" in text
    text, _ = compare.report([str(_numerics_pair(tmp_path / "train", recorded, "softmax", mode="train"))])
    assert "where the numerics part" not in text


def test_a_numerics_job_without_records_is_reported(tmp_path):
    for backend in ("mlm", "bridge"):
        run_dir = write_run_dir(tmp_path / "s" / backend, backend, losses=[10.5])
        record = json.loads((run_dir / rundir.RUN_JSON).read_text())
        (run_dir / rundir.RUN_JSON).write_text(json.dumps({**record, "mode": "numerics"}))
    text, _ = compare.report([str(tmp_path / "s")])
    assert f"no {rundir.NUMERICS} from mlm, bridge: nothing to localise" in text


# --- the mode ------------------------------------------------------------------------------------------------------


def test_job_config_is_the_first_iteration_of_the_users_run():
    cfg = compose(["mode=numerics", "train.iters=20"])
    job = numerics_mode.job_config(cfg)
    assert (job.train.iters, job.checkpoint.save) == (1, False)
    # The whole run's schedule and evaluation interval: iteration 1 trains at the full run's lr, without evaluation.
    assert (job.sched.lr_warmup_iters, job.sched.lr_decay_iters) == (C.warmup_iters(cfg), C.decay_iters(cfg)) == (2, 20)
    assert job.validation.eval_interval == 20
    assert cfg.train.iters == 20 and cfg.checkpoint.save  # the user's config is left as it was
    assert checks.check(job) == []


def test_both_stacks_build_the_numerics_job_parity_clean(tmp_path):
    """Both native configs of the job config: one training iteration, recording into the run directory, and no
    field differs between the stacks."""
    from ut_helpers import job_for

    cfg = numerics_mode.job_config(compose(["mode=numerics", "parallel.dp=1"]))
    job = job_for(cfg, run_dir=tmp_path)
    natives = parity.natives(cfg, job)
    mlm, bridge = natives["mlm"][1], natives["bridge"][1]
    assert mlm.args.train_iters == bridge.container.train.train_iters == 1
    assert mlm.args.save is None and bridge.container.checkpoint.save is None
    assert mlm.numerics_dir == bridge.numerics_dir == str(tmp_path)
    both = {name: backend.describe(native) for name, (backend, native) in natives.items()}
    assert parity.diff(both["mlm"], both["bridge"]) == []


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (["backend=bridge", "backend.extra=['model.softmax_scale=0.1']"], "transformer.softmax_scale"),
        (["backend=mlm", "backend.extra=[--squared-relu]"], "transformer.activation_func"),
    ],
    ids=["bridge-softmax-scale", "mlm-squared-relu"],
)
def test_the_gpu_tests_one_sided_knobs_change_only_their_field(extra, field):
    """tests/gpu/test_numerics.py mismatches a pair on one side: each knob must change that one field only."""
    both = describe_both(compose(["parallel.dp=1", *extra]))
    assert [row[0] for row in parity.diff(both["mlm"], both["bridge"])] == [field]


BAD_COMBOS = {
    "resume policy": (["checkpoint.resume=if_available"], "checkpoint.resume=if_available: mode=numerics saves no"),
    "checkpoint to load": (["checkpoint.load={ckpt}"], "mode=numerics records iteration 1 of a run from scratch"),
}


@pytest.mark.parametrize("case", list(BAD_COMBOS))
def test_bad_combos_are_refused_in_one_line(case, tmp_path, tmp_path_factory):
    checkpoints = tmp_path_factory.mktemp("ckpt")
    (checkpoints / rundir.CHECKPOINT_TRACKER).write_text("5")
    (checkpoints / "iter_0000005").mkdir()
    overrides, message = BAD_COMBOS[case]
    proc = run_cli(["mode=numerics", *(o.format(ckpt=checkpoints) for o in overrides)], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("unified_train:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_pair_validates_and_a_numerics_job_needs_a_gpu(tmp_path):
    gpu = fake_gpu_env(tmp_path)  # the up-front check counts GPUs from the hardware (nvidia-smi here)
    proc = run_cli(["-m", "backend=mlm,bridge", "mode=numerics", "--dry-run"], tmp_path, timeout=120, env=gpu)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("| ok |") == 2 and "mode=numerics" in proc.stdout
    proc = run_cli(["mode=numerics"], tmp_path, timeout=120)  # this machine has no GPU
    assert proc.returncode == 2 and "no GPU is visible: training needs 1" in proc.stderr, proc.stderr
    # Past the up-front checks (nvidia-smi's stand-in answers), app dispatches it as a training job, which needs CUDA.
    run_dir = tmp_path / "run"
    proc = run_cli(["mode=numerics", f"hydra.run.dir={run_dir}"], tmp_path, timeout=300, env=gpu)
    assert proc.returncode == 2 and "no CUDA GPU is visible: training needs one" in proc.stderr, proc.stderr

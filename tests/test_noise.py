"""The noise floor end to end on the CPU: real paired multiruns (Hydra, app.run, runtime/job.py, the repeats, the
failure records, the comparison callback, offline W&B) whose stacks are tests/pair_standin.py's stand-in with a chosen
run-to-run noise and a chosen difference between the backends; and the advice table on real configs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf
from ut_helpers import REPO, compose, subprocess_env

from unified_train import rundir
from unified_train.results import advice, compare, panels, wandb_runs
from unified_train.runtime import failures, repeats

STANDIN = REPO / "tests" / "pair_standin.py"
# rng.seed -> the stand-in's behaviour for that pair (tests/pair_standin.py): 1 bitwise; 2 mlm noisy (floor 2e-3 after
# two repeats) and bridge 5e-4 off; 3 both noisy (floor 2e-4) and bridge 1e-2 off from iteration 3; 4 mlm's stack
# exits (SystemExit 3) and bridge's raises.
BEHAVIOUR = {
    "1": {},
    "2": {"noise": {"mlm": 1e-3}, "offset": {"bridge": [1, 5e-4]}},
    "3": {"noise": {"mlm": 1e-4, "bridge": 1e-4}, "offset": {"bridge": [3, 1e-2]}},
    "4": {"exit": ["mlm"], "fail": ["bridge"]},
}


def _standin(args, cwd, behaviour) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(STANDIN), "-m", *args],
        cwd=cwd,
        env={**subprocess_env(), "STANDIN": json.dumps(behaviour)},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Four MoE pairs (model=deepseek_v2_lite), each job with two repeats, W&B offline; pair 4's jobs fail."""
    root = tmp_path_factory.mktemp("noise")
    sweep = root / "sweep"
    proc = _standin(
        [
            "backend=mlm,bridge",
            "rng.seed=1,2,3,4",
            "compare.repeats=2",
            "train.iters=5",
            "model=deepseek_v2_lite",
            f"hydra.sweep.dir={sweep}",
        ],
        root,
        BEHAVIOUR,
    )
    return sweep, proc


def _verdicts(sweep) -> dict[str, dict]:
    """rng.seed -> its pair's entry in comparison.json."""
    pairs = json.loads((sweep / rundir.COMPARISON_JSON).read_text())["pairs"]
    seeds = {}
    for run_json in sweep.glob("*_mlm/run.json"):
        seed = rundir.read_unified_config(str(run_json.parent)).rng.seed
        seeds[str(seed)] = pairs[json.loads(run_json.read_text())["pair_id"]]
    return seeds


def test_a_sweep_with_a_failed_job_is_compared_then_exits_non_zero(sweep):
    sweep, proc = sweep
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = (sweep / rundir.COMPARISON_MD).read_text()
    assert report.splitlines()[2] == (
        "summary: 4 pairs: 1 exact, 1 within noise, 1 diverges, 1 incomplete; 2 failed jobs: 3_mlm (SystemExit, exit "
        "code 3); 7_bridge (RuntimeError: stand-in stack of bridge failed after iteration 2)"
    )
    assert report.splitlines()[2] in proc.stdout  # the comparison is printed too
    section = report.split("## failed jobs")[1]
    assert "- `7_bridge` (bridge, pair " in section
    assert 'pair_standin.py", line' in section and "RuntimeError: stand-in stack of bridge failed" in section
    failure = json.loads((sweep / "7_bridge" / rundir.FAILURE).read_text())
    assert failure["error"] == "RuntimeError" and failure["exit_code"] is None and len(failure["traceback"]) <= 20
    assert not (sweep / "7_bridge" / rundir.REPEATS).exists()  # a failed main run is not repeated
    # A stack's SystemExit in the sweep's own process fails that job only: every later point ran (4_ ... 7_).
    exited = json.loads((sweep / "3_mlm" / rundir.FAILURE).read_text())
    assert (exited["error"], exited["exit_code"], exited["message"]) == ("SystemExit", 3, "")
    assert sorted(p.parent.name for p in sweep.glob("*/run.json"))[4:] == [
        "4_bridge",
        "5_bridge",
        "6_bridge",
        "7_bridge",
    ]


def test_verdicts_of_the_pairs(sweep):
    sweep, _ = sweep
    verdicts = _verdicts(sweep)
    assert {seed: v["verdict"] for seed, v in verdicts.items()} == {
        "1": "exact",
        "2": "within noise",
        "3": "diverges",
        "4": "incomplete",
    }
    assert "lm loss at most 0.25x the floor" in verdicts["2"]["detail"]  # 5e-4 against mlm's 2e-3
    assert verdicts["3"]["detail"].startswith("at iteration 3: lm loss differs by 1.000e-02")
    assert "49.9x the noise floor 2.00" in verdicts["3"]["detail"]
    assert verdicts["4"]["detail"] == (
        "mlm failed (SystemExit, exit code 3); bridge failed (RuntimeError: stand-in stack of bridge failed after "
        "iteration 2)"
    )
    report = (sweep / rundir.COMPARISON_MD).read_text()
    diverging = next(s for s in report.split("## pair ")[1:] if "**diverges**" in s)
    # Both backends' repeats differ: the advice names the MoE dispatch of this config and its fix.
    assert "mlm and bridge differ from themselves run to run" in diverging
    assert "- MoE token dispatch (model.num_experts=64): determinism=strict" in diverging
    assert "| 3 | 9.699999809265137 | 9.710000038146973 | 1.000e-02 | 1.031e-03 | 10486 | 49.93 |" in diverging


def test_repeats_are_run_directories_read_back_with_their_run(sweep):
    sweep, _ = sweep
    runs = rundir.load_runs([str(sweep)])
    assert len(runs) == 8  # the repeats are not runs of the sweep
    assert {r.path.rsplit("/", 1)[1]: len(r.repeats) for r in runs} == {
        **{f"{i}_mlm": 2 for i in range(3)},
        "3_mlm": 0,
        **{f"{i}_bridge": 2 for i in range(4, 7)},
        "7_bridge": 0,
    }
    main = next(r for r in runs if r.path.endswith("/1_mlm"))  # seed 2: mlm adds k * 1e-3 in repeat k
    assert [r.path for r in main.repeats] == [str(sweep / "1_mlm" / "repeats" / str(k)) for k in (1, 2)]
    for k, repeat in enumerate(main.repeats, start=1):
        assert repeat.ok and repeat.job == main.job  # the same identity: backend, pair id, world size, sweep
        assert [r["iteration"] for r in repeat.metrics] == [1, 2, 3, 4, 5]
        gaps = [b["lm loss"] - a["lm loss"] for a, b in zip(main.metrics, repeat.metrics, strict=True)]
        assert all(abs(gap - k * 1e-3) < 1e-6 for gap in gaps), gaps
        cfg = rundir.read_unified_config(repeat.path)
        assert cfg.checkpoint.save is False and cfg.logger.wandb.enabled is False and cfg.compare.repeats == 0
        assert cfg.run_dir == repeat.path
        native = json.loads((sweep / "1_mlm" / "repeats" / str(k) / "native" / "standin.json").read_text())
        assert native["checkpoint_save"] is None and native["wandb_project"] is None
        assert not (sweep / "1_mlm" / "repeats" / str(k) / rundir.WANDB_DIR).exists()
    assert json.loads((sweep / "1_mlm" / "native" / "standin.json").read_text())["checkpoint_save"].endswith(
        "1_mlm/checkpoints"
    )
    floor = compare.noise_floor(main)
    assert floor.repeats == 2 and all(abs(v - 2e-3) < 1e-6 for v in floor.values["lm loss"].values())


def test_each_w_and_b_run_carries_its_pairs_verdict(sweep, monkeypatch):
    """Offline, the spec carries every group's verdict and its runs; the spec's command (once the runs are uploaded)
    writes the verdict into each run's summary: here up to W&B's public API, which needs the network."""
    import wandb
    import wandb_workspaces.reports.v2 as wr

    sweep, proc = sweep
    spec = json.loads((sweep / panels.SPEC_FILE).read_text())
    verdicts = json.loads((sweep / rundir.COMPARISON_JSON).read_text())["pairs"]
    assert {s["group"]: s["verdict"]["verdict"] for s in spec["sections"]} == {
        pid: v["verdict"] for pid, v in verdicts.items()
    }
    assert all(s["name"].endswith(f": {s['verdict']['verdict']}") for s in spec["sections"])
    expected = {}
    for run_json in sweep.glob("*/run.json"):  # the stacks' own offline runs, read back from their .wandb files
        run = wandb_runs.read_offline_run(str(run_json.parent / rundir.WANDB_DIR))
        verdict = verdicts[run["group"]]
        expected[f"team/unified_train/{run['run_id']}"] = {
            panels.VERDICT: verdict["verdict"],
            panels.VERDICT_DETAIL: verdict["detail"],
        }
    assert len(expected) == 8

    written = {}

    class PublicApi:  # wandb.Api's run(path).summary.update(values): the network call
        default_entity = "team"

        def run(self, path):
            return type(
                "Run", (), {"summary": type("Summary", (), {"update": lambda s, v: written.update({path: v})})()}
            )

    saved = []
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setattr(wandb, "Api", PublicApi)
    monkeypatch.setattr(wr.Report, "save", lambda self, **kw: saved.append(self))
    monkeypatch.setattr(wr.Report, "url", property(lambda self: "https://wandb.ai/r"))
    assert panels.main(["--spec", str(sweep / panels.SPEC_FILE)]) == 0
    assert written == expected
    paragraphs = [str(b.text) for b in saved[0].blocks if isinstance(b, wr.P)]
    assert sum("verdict: diverges: at iteration 3" in p for p in paragraphs) == 1  # shown at the group level


def test_without_repeats_a_pair_that_is_not_bitwise_prints_the_command(tmp_path):
    """The sweep config of the README (-cd sweeps -cn correlation), no failure: exit 0, and the command that measures
    the noise floor is the pair's own."""
    sweep = tmp_path / "sweep"
    proc = _standin(
        ["-cd", str(REPO / "sweeps"), "-cn", "correlation", "rng.seed=3", "train.iters=3", "logger=none"]
        + [f"hydra.sweep.dir={sweep}"],
        tmp_path,
        {"3": {"offset": {"bridge": [2, 1e-5]}}},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (sweep / rundir.COMPARISON_MD).read_text()
    assert "verdict: **NOT bitwise**; the noise floor was not measured (no repeats)" in report
    assert report.split("```\n")[1].strip() == (
        f"python -m unified_train -m -cd {REPO / 'sweeps'} -cn correlation backend=mlm,bridge rng.seed=3 "
        "train.iters=3 logger=none compare.repeats=2"
    )


# --- the repeats loop ---------------------------------------------------------------------------------------------


def test_a_failed_repeat_is_recorded_in_its_directory_and_fails_the_job(tmp_path):
    cfg = compose(["compare.repeats=3"])
    job = rundir.identity(cfg, world_size=1, sweep_id="s", run_dir=str(tmp_path / "job"))
    ran = []

    def run_one(repeat_cfg, repeat_job):
        ran.append((repeat_job.run_dir, repeat_cfg.run_dir, repeat_cfg.compare.repeats, repeat_cfg.checkpoint.save))
        rundir.write_identity(repeat_job)
        if len(ran) == 2:
            raise MemoryError("out of memory in repeat 2")

    with pytest.raises(failures.JobFailed, match=r"repeat 2 of 3 failed \(MemoryError: out of memory in repeat 2\)"):
        repeats.run(cfg, job, run_one)
    assert ran == [(str(tmp_path / "job" / "repeats" / str(k)),) * 2 + (0, False) for k in (1, 2)]
    record = rundir.read_failure(str(tmp_path / "job" / "repeats" / "2"))
    assert record["error"] == "MemoryError" and record["traceback"][-1] == "MemoryError: out of memory in repeat 2"
    assert rundir.read_failure(str(tmp_path / "job" / "repeats" / "1")) is None


def test_a_run_stopped_by_its_exit_signal_is_not_repeated(tmp_path):
    cfg = compose(["compare.repeats=2"])
    job = rundir.identity(cfg, world_size=1, run_dir=str(tmp_path))
    rundir.write_summary(str(tmp_path), {"stopped_by": "SIGTERM"})
    repeats.run(cfg, job, lambda *args: pytest.fail("repeated"))
    assert not (tmp_path / rundir.REPEATS).exists()


def test_repeats_in_a_sweep_config(tmp_path):
    """A sweep config under sweeps/ can ask for the noise floor: correlation.yaml with compare.repeats set."""
    from unified_train import checks
    from unified_train.compose import compose as compose_from

    (tmp_path / "noise.yaml").write_text(
        (REPO / "sweeps" / "correlation.yaml").read_text() + "compare:\n  repeats: 2\n"
    )
    cfg = compose_from(["backend=bridge"], config_dir=str(tmp_path), config_name="noise")
    assert cfg.compare.repeats == 2 and checks.check(cfg) == []
    assert rundir.pair_id(cfg) == rundir.pair_id(compose())


def test_repeats_do_not_change_the_pair_id():
    assert rundir.pair_id(compose(["compare.repeats=2"])) == rundir.pair_id(compose())
    cfg = repeats.repeat_config(compose(["compare.repeats=2", "logger.wandb.mode=offline"]), "/x/repeats/1")
    assert rundir.pair_id(cfg) == rundir.pair_id(compose())


# --- advice: the nondeterministic parts of a config and their fixes ---------------------------------------------


def _advice(overrides, world_size=1):
    cfg = compose(overrides)
    from unified_train import config as C

    return advice.lines(OmegaConf.to_container(cfg, resolve=True), C.attention(cfg), world_size)


def test_advice_for_an_moe_config():
    lines = _advice(["model=deepseek_v2_lite"])
    assert lines == [
        "- MoE token dispatch (model.num_experts=64): determinism=strict (bitwise on an H200 for both stacks; it also "
        "turns the fused cross entropy off)",
        "- fused cross entropy (kernels.cross_entropy_loss_fusion=true): determinism=strict (turns it off: both stacks "
        "refuse it under deterministic mode)",
    ]
    # determinism=strict removes both; what is left is said.
    assert _advice(["model=deepseek_v2_lite", "determinism=strict"]) == [
        "- none of the known nondeterministic parts is in this config"
    ]


def test_advice_for_an_sdpa_config():
    lines = _advice(
        ["model=llama32_1b", "kernels.attention=sdpa", "parallel.tp=2", "kernels.cross_entropy_loss_fusion=false"]
    )
    assert lines == [
        "- SDPA attention backward (cuDNN, flash) (kernels.attention=sdpa): kernels.attention=flex (bitwise-repeatable "
        "backward, measured on an H200) or kernels.attention=local",
        "- tensor-parallel all-reduce order (parallel.tp=2): determinism=strict (NCCL_ALGO=Ring)",
    ]


def test_advice_for_data_parallel_reductions_reads_the_jobs_world_size():
    lines = _advice(
        ["model=llama32_1b", "determinism=default", "kernels.cross_entropy_loss_fusion=false"], world_size=8
    )
    assert lines == [
        "- data-parallel gradient reduction order (data-parallel size 8): determinism=strict (NCCL_ALGO=Ring)"
    ]
    assert "data-parallel" not in "".join(_advice(["model=llama32_1b"], world_size=1))

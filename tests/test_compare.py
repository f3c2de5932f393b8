"""Pair verdicts over sweep directories, from the files runs leave behind."""

from __future__ import annotations

import json

import pytest
from ut_helpers import LOSSES
from ut_helpers import write_run_dir as _write_run

from unified_train import rundir
from unified_train.results import compare


def test_equal_runs_are_bitwise_exact(tmp_path):
    _write_run(tmp_path / "0_mlm", "mlm")
    _write_run(tmp_path / "0_bridge", "bridge")
    text, ok = compare.report([str(tmp_path)])
    assert ok is True
    assert "exact (bitwise)" in text and "NOT bitwise" not in text
    assert "## pair p123 (vanilla_gpt, tp=1, pp=1)" in text
    assert text.count("| 0.000e+00 |") == len(LOSSES)


def test_one_differing_value_is_not_bitwise(tmp_path):
    _write_run(tmp_path / "0_mlm", "mlm")
    other = list(LOSSES)
    other[3] = 9.75 + 3 * 2**-20  # three fp32 steps above 9.75 (spacing 2**-20 in [8, 16)); bf16 would say 0
    _write_run(tmp_path / "0_bridge", "bridge", losses=other)
    text, ok = compare.report([str(tmp_path)])
    assert ok is False
    assert "NOT bitwise" in text
    row = next(line for line in text.splitlines() if line.startswith("| 4 |"))
    assert row.rstrip().endswith("| 3 |")  # fp32 ULP column
    assert "diff / noise" not in text  # no noise floor measured


def test_missing_half_is_incomplete(tmp_path):
    _write_run(tmp_path / "0_mlm", "mlm")
    text, ok = compare.report([str(tmp_path)])
    assert ok is False and "**incomplete**" in text and "bridge" in text.split("**incomplete**")[1]


def test_failed_half_without_summary_is_incomplete(tmp_path):
    _write_run(tmp_path / "0_mlm", "mlm")
    _write_run(tmp_path / "0_bridge", "bridge", complete=False)  # crashed: no summary.json
    text, ok = compare.report([str(tmp_path)])
    assert ok is False and "**incomplete**" in text


def test_pairs_are_matched_by_pair_id_across_sweep_dirs(tmp_path):
    _write_run(tmp_path / "a" / "0_mlm", "mlm", pair_id="aaa")
    _write_run(tmp_path / "b" / "0_bridge", "bridge", pair_id="aaa")
    _write_run(tmp_path / "a" / "1_mlm", "mlm", pair_id="bbb")
    _write_run(tmp_path / "b" / "1_bridge", "bridge", pair_id="bbb", losses=[x + 1 for x in LOSSES])
    text, ok = compare.report([str(tmp_path / "a"), str(tmp_path / "b")])
    assert ok is False
    sections = text.split("## pair ")[1:]
    assert [s.split()[0] for s in sections] == ["aaa", "bbb"]
    assert "exact (bitwise)" in sections[0] and "NOT bitwise" in sections[1]


def test_compare_main_exit_codes(tmp_path, capsys):
    _write_run(tmp_path / "0_mlm", "mlm")
    _write_run(tmp_path / "0_bridge", "bridge")
    assert compare.main([str(tmp_path)]) == 0
    assert "exact (bitwise)" in capsys.readouterr().out
    assert compare.main([]) == 2
    assert compare.main([str(tmp_path / "nowhere")]) == 2  # a typo is not an empty, passing comparison
    (tmp_path / "empty").mkdir()
    assert compare.main([str(tmp_path / "empty")]) == 2
    assert "no run.json under" in capsys.readouterr().err


@pytest.mark.parametrize(
    "a, b, ulps",
    [
        (1.0, 1.0 + 2**-23, 1),  # fp32 has 23 explicit mantissa bits: 1 + 2**-23 is the next value
        (1.0, 1.0, 0),
        (1.0, 1.0 + 2**-22, 2),
        (-1.0, -(1.0 + 2**-23), 1),
        (2.0, 2.0 - 2**-23, 1),  # across an exponent boundary (the spacing below 2 is 2**-23)
        (0.0, -0.0, 0),
        (-1.0, 1.0, 0x3F800000 * 2),
        (10.0, 10.0 + 105 * 2**-20, 105),  # a 1e-4 difference of two losses near 10: 0 bf16 steps, 105 fp32 steps
    ],
)
def test_fp32_ulps(a, b, ulps):
    assert compare.fp32_ulps(a, b) == ulps
    assert compare.fp32_ulps(b, a) == ulps


def _tp_run(directory, backend, tp, losses):
    _write_run(directory, backend, pair_id=f"p-tp{tp}", losses=losses)
    info = json.loads((directory / "run.json").read_text())
    (directory / "run.json").write_text(json.dumps({**info, "tp": tp, "tp_group": "g1"}))


def test_gates_tell_bitwise_from_close_from_diverged():
    ref = dict(enumerate(LOSSES, start=1))
    close = {k: v * 1.001 for k, v in ref.items()}
    far = {k: v * 1.2 for k, v in ref.items()}
    assert compare.golden(ref, close)[0] and compare.statistical(ref, close)[0]
    assert not compare.golden(ref, far)[0]
    assert not compare.statistical(ref, far)[0]  # 20 % off: outside the pointwise and final-loss tolerances
    flipped = {k: LOSSES[-k] for k in ref}  # same values, anti-correlated curve
    assert not compare.statistical(ref, flipped)[0]


def test_writes_report_plot_and_golden_values(tmp_path):
    mlm = _write_run(tmp_path / "0_mlm", "mlm")
    _write_run(tmp_path / "0_bridge", "bridge")
    text, ok = compare.report([str(tmp_path)], out_dir=str(tmp_path))
    assert ok and (tmp_path / "comparison.md").read_text().strip() == text.strip()
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gv = json.loads((mlm / "golden_values.json").read_text())
    assert gv["lm loss"]["start_step"] == 1 and gv["lm loss"]["end_step"] == len(LOSSES)
    assert gv["lm loss"]["values"]["3"] == round(LOSSES[2], 5)
    assert "- statistical: **pass**" in text and "- golden: **pass**" in text


def test_cross_tp_convergence_table(tmp_path):
    _tp_run(tmp_path / "0_mlm", "mlm", 1, LOSSES)
    _tp_run(tmp_path / "1_mlm", "mlm", 2, [x * 1.002 for x in LOSSES])
    _tp_run(tmp_path / "2_mlm", "mlm", 4, [x * 1.3 for x in LOSSES])
    text, _ = compare.report([str(tmp_path)])
    assert "## convergence across TP: mlm, vanilla_gpt (reference tp=1)" in text
    rows = {
        line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "pearson" in line
    }
    assert "| pass |" in rows["2"] and "| FAIL |" in rows["4"]


# --- the noise floor and the verdict (recorded metrics: run directories with repeats/<k>/) ----------------------


def _pair_with_repeats(root, mlm=LOSSES, bridge=LOSSES, mlm_repeats=(), bridge_repeats=(), grad_norms=None):
    """A pair of run directories, each with its repeats as compare.repeats leaves them (repeats/1, repeats/2, ...);
    `grad_norms`: {backend: a main run's grad norms}."""
    for backend, main, repeats in (("mlm", mlm, mlm_repeats), ("bridge", bridge, bridge_repeats)):
        run = _write_run(root / f"0_{backend}", backend, losses=main, grad_norms=(grad_norms or {}).get(backend))
        for k, losses in enumerate(repeats, start=1):
            _write_run(run / "repeats" / str(k), backend, losses=losses)
    return root


def _shifted(losses, by, at=None):
    """`losses` + `by` at every iteration, or only at iteration `at`."""
    return [x + by if at in (None, it) else x for it, x in enumerate(losses, start=1)]


def test_within_noise_when_every_difference_is_inside_the_larger_floor(tmp_path):
    # mlm's floor is 2e-3 at every iteration (its worse repeat); bridge has no repeats: max(floors) = 2e-3.
    _pair_with_repeats(
        tmp_path, bridge=_shifted(LOSSES, 1e-3), mlm_repeats=[_shifted(LOSSES, -5e-4), _shifted(LOSSES, 2e-3)]
    )
    result = compare.comparison([str(tmp_path)], gate="noise")
    assert result.ok is True and result.verdicts["p123"].kind == "within noise"
    text = result.text
    assert "verdict: **within noise**: every iteration within the noise floor (lm loss at most 0.50x" in text
    assert (
        "- noise floor: mlm from 2 repeats (lm loss up to 2.000e-03, grad norm up to 0.000e+00); bridge: not " in text
    )
    assert (
        "- rule: within noise when, at every iteration, |mlm - bridge| <= 3 x max(noise floor of mlm, noise floor "
        "of bridge)" in text
    )
    rows = [line for line in text.splitlines() if line.startswith("| ") and "lm loss" not in line]
    assert [row.rstrip().rsplit("|", 2)[1].strip() for row in rows] == ["0.50"] * len(LOSSES)  # diff / noise
    assert "mlm differs from itself run to run" in text  # advice follows a floor above 0
    assert compare.comparison([str(tmp_path)], gate="exact").ok is False  # not bitwise


def test_diverges_names_the_first_iteration_beyond_the_noise_and_by_how_much(tmp_path):
    bridge = _shifted(LOSSES, 1e-2, at=4)
    _pair_with_repeats(
        tmp_path,
        bridge=bridge,
        mlm_repeats=[_shifted(LOSSES, 1e-3), _shifted(LOSSES, -2e-3)],  # floor 2e-3
        bridge_repeats=[_shifted(bridge, 1e-3)],  # floor 1e-3
    )
    result = compare.comparison([str(tmp_path)], gate="noise")
    verdict = result.verdicts["p123"]
    # 1e-2 is 5x the larger floor, beyond the margin of 3 (compare.NOISE_MARGIN); 5e-3 would be within it.
    assert result.ok is False and verdict.kind == "diverges"
    assert verdict.detail.startswith("at iteration 4: lm loss differs by 1.000e-02 (1.03e-03 relative), 5.0x the noise")
    assert "verdict: **diverges**: at iteration 4:" in result.text
    assert "mlm and bridge differ from themselves run to run" in result.text


def test_the_floor_is_the_running_spread_and_the_margin_is_three(tmp_path):
    """A spread seen at iteration 2 still bounds iteration 5 (noise only spreads); 2.75x it is within, 3.25x not."""
    repeat = [x + (4e-3 if it == 2 else 0.0) for it, x in enumerate(LOSSES, start=1)]  # spread 4e-3 at 2 only
    within = [x + (1.1e-2 if it == 5 else 0.0) for it, x in enumerate(LOSSES, start=1)]
    _pair_with_repeats(tmp_path / "a", bridge=within, mlm_repeats=[repeat])
    assert compare.comparison([str(tmp_path / "a")]).verdicts["p123"].kind == "within noise"
    beyond = [x + (1.3e-2 if it == 5 else 0.0) for it, x in enumerate(LOSSES, start=1)]
    _pair_with_repeats(tmp_path / "b", bridge=beyond, mlm_repeats=[repeat])
    verdict = compare.comparison([str(tmp_path / "b")]).verdicts["p123"]
    assert verdict.kind == "diverges" and verdict.detail.startswith("at iteration 5: lm loss differs by 1.300e-02")


def test_where_neither_backend_varies_any_difference_diverges(tmp_path):
    bridge = _shifted(LOSSES, 2**-20, at=2)
    _pair_with_repeats(tmp_path, bridge=bridge, mlm_repeats=[LOSSES], bridge_repeats=[bridge])  # each repeats itself
    verdict = compare.comparison([str(tmp_path)]).verdicts["p123"]
    assert verdict.kind == "diverges"
    assert verdict.detail.startswith("at iteration 2: lm loss differs by 9.537e-07")
    assert verdict.detail.endswith("where neither backend varies between its repeats (floor 0)")
    assert not any("differs from itself" in line for line in verdict.lines)  # repeats equal: no advice


def test_grad_norm_beyond_the_noise_diverges_though_the_loss_is_within(tmp_path):
    grad_norms = [2.0 / it for it in range(1, len(LOSSES) + 1)]
    grad_norms[2] += 0.5
    repeats = [_shifted(LOSSES, 1e-3)]  # grad norms as the main run's: that floor is 0
    _pair_with_repeats(tmp_path, bridge=_shifted(LOSSES, 1e-4), mlm_repeats=repeats, grad_norms={"bridge": grad_norms})
    verdict = compare.comparison([str(tmp_path)]).verdicts["p123"]
    assert verdict.kind == "diverges"
    assert verdict.detail.startswith("at iteration 3: grad_norm differs by 5.000e-01")


def test_gate_noise_on_the_command_line(tmp_path, capsys):
    within = _pair_with_repeats(
        tmp_path / "within", bridge=_shifted(LOSSES, 1e-4), mlm_repeats=[_shifted(LOSSES, 1e-3)]
    )
    beyond = _pair_with_repeats(
        tmp_path / "beyond", bridge=_shifted(LOSSES, 1e-2), mlm_repeats=[_shifted(LOSSES, 1e-3)]
    )
    assert compare.main([str(within), "--gate", "noise"]) == 0
    assert compare.main([str(within), "--gate", "exact"]) == 1
    assert compare.main([str(beyond), "--gate", "noise"]) == 1
    assert "verdict: **diverges**: at iteration 1:" in capsys.readouterr().out


def _hydra_record(run_dir, overrides, config_name="config", config_dir=None):
    """What Hydra writes into a job directory's .hydra/ (overrides.yaml, and the primary config in hydra.yaml)."""
    from omegaconf import OmegaConf

    (run_dir / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    sources = [{"path": "/repo/conf", "schema": "file", "provider": "main"}]
    if config_dir:
        sources.append({"path": config_dir, "schema": "file", "provider": "command-line"})
    hydra = {"hydra": {"job": {"config_name": config_name}, "runtime": {"config_sources": sources}}}
    OmegaConf.save(OmegaConf.create(hydra), run_dir / ".hydra" / "hydra.yaml")


def test_without_repeats_the_verdict_says_so_and_gives_the_command(tmp_path):
    _pair_with_repeats(tmp_path, bridge=_shifted(LOSSES, 1e-4))
    _hydra_record(
        tmp_path / "0_mlm",
        ["backend=mlm", "model=deepseek_v2_lite", "backend.extra=[--adam-beta2,0.999]", "compare.repeats=0"],
    )
    result = compare.comparison([str(tmp_path)])
    assert result.verdicts["p123"].kind == "not bitwise"
    text = result.text
    assert "verdict: **NOT bitwise**; the noise floor was not measured (no repeats)" in text
    command = text.split("```\n")[1].strip()
    assert command == (
        "python -m unified_train -m backend=mlm,bridge model=deepseek_v2_lite 'backend.extra=[--adam-beta2,0.999]' "
        "compare.repeats=2"
    )
    assert "summary: 1 pair: 1 not bitwise (noise floor not measured)" in text


def test_the_command_keeps_a_sweep_config_given_with_cd_and_cn(tmp_path):
    _pair_with_repeats(tmp_path, bridge=_shifted(LOSSES, 1e-4))
    _hydra_record(tmp_path / "0_mlm", ["rng.seed=5", "backend=mlm"], "correlation", "/repo/sweeps")
    run = next(r for r in rundir.load_runs([str(tmp_path)]) if r.backend == "mlm")
    assert compare.measure_command(run) == (
        "python -m unified_train -m -cd /repo/sweeps -cn correlation backend=mlm,bridge rng.seed=5 compare.repeats=2"
    )


def _failed(run_dir, exc_type=RuntimeError, message="boom"):
    """A failure record as runtime/failures.py writes it: from a real raised exception."""
    try:
        raise exc_type(message)
    except BaseException as exc:  # noqa: BLE001
        assert rundir.record_failure(str(run_dir), rundir.failure_record(exc))


def test_failed_jobs_and_repeats_are_listed_with_their_reason_and_tail(tmp_path):
    _pair_with_repeats(tmp_path / "a", mlm_repeats=[LOSSES, LOSSES])
    _failed(tmp_path / "a" / "0_mlm" / "repeats" / "2", ValueError, "repeat exploded")
    _write_run(tmp_path / "a" / "1_mlm", "mlm", pair_id="p456", complete=False)
    _failed(tmp_path / "a" / "1_mlm", SystemExit, "stack exited")
    _write_run(tmp_path / "a" / "1_bridge", "bridge", pair_id="p456", complete=False)  # killed: nothing recorded
    result = compare.comparison([str(tmp_path / "a")], out_dir=str(tmp_path / "a"))
    assert result.ok is False
    assert result.failed == [
        "0_mlm/repeats/2 (ValueError: repeat exploded)",
        "1_bridge (no summary and no failure record: it was killed, or is still running)",
        "1_mlm (SystemExit, exit code 1: stack exited)",
    ]
    text = result.text
    assert text.splitlines()[2] == (
        "summary: 2 pairs: 1 exact, 1 incomplete; 3 failed jobs: " + "; ".join(result.failed)
    )
    assert (
        "**incomplete**: mlm failed (SystemExit, exit code 1: stack exited); bridge did not finish (no summary and no "
        "failure record" in text
    )
    section = text.split("## failed jobs")[1]
    assert "- `1_mlm` (mlm, pair p456): SystemExit, exit code 1: stack exited\n  ```\n  Traceback" in section
    assert "  ValueError: repeat exploded\n  ```" in section
    data = json.loads((tmp_path / "a" / "comparison.json").read_text())
    assert data["pairs"]["p123"]["verdict"] == "exact" and data["pairs"]["p456"]["verdict"] == "incomplete"
    assert [f["job"] for f in data["failed"]] == ["0_mlm/repeats/2", "1_bridge", "1_mlm"]
    # The floor comes from the repeats that finished: the failed one is not read as a run of the pair.
    mlm = next(r for r in rundir.load_runs([str(tmp_path / "a")]) if r.path.endswith("0_mlm"))
    assert compare.noise_floor(mlm).repeats == 1

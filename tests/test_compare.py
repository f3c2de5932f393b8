"""Pair verdicts over sweep directories, from the files runs leave behind."""

from __future__ import annotations

import json

import pytest
from ut_helpers import LOSSES
from ut_helpers import write_run_dir as _write_run

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
    other[3] = 9.8125  # one bf16 ULP above 9.75 (spacing 2**-4 in [8, 16))
    _write_run(tmp_path / "0_bridge", "bridge", losses=other)
    text, ok = compare.report([str(tmp_path)])
    assert ok is False
    assert "NOT bitwise" in text
    row = next(line for line in text.splitlines() if line.startswith("| 4 |"))
    assert row.rstrip().endswith("| 1 |")  # bf16 ULP column


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
        (1.0, 1.0078125, 1),  # bf16 has 7 explicit mantissa bits: 1 + 2**-7 is the next value
        (1.0, 1.0, 0),
        (1.0, 1.015625, 2),
        (-1.0, -1.0078125, 1),
        (2.0, 1.9921875, 1),  # across an exponent boundary
        (0.0, -0.0, 0),
        (-1.0, 1.0, 0x3F80 * 2),
    ],
)
def test_bf16_ulps(a, b, ulps):
    assert compare.bf16_ulps(a, b) == ulps
    assert compare.bf16_ulps(b, a) == ulps


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

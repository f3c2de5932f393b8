"""Correlation verdicts over sweep directories: pair runs by pair id and judge their per-iteration losses.

Reads only the job directories (rundir.load_runs), so it works whatever process or host ran the jobs. Runs at the
end of every multirun (results/callbacks.py), and as a command:

    python -m unified_train.results.compare SWEEP_DIR [SWEEP_DIR ...] [--gate exact|golden|statistical|noise] [--write]
    python -m unified_train.results.compare --resume CONTINUOUS_DIR RESUMED_DIR

Gates (MLM = reference, Bridge = candidate):
- exact: every lm loss, grad norm and lr bitwise equal;
- golden: Megatron-LM's functional-test check, |a-b| <= 0.05*|a| per step (a few failing steps allowed as there);
- statistical: Megatron-Bridge's convergence check: Pearson >= 0.95, pointwise tolerance 10/5/2 % for losses
  above 2 / 0.5-2 / below 0.5, at most 10 % of points outside it, final loss within 3 %;
- noise: the verdict is `exact` or `within noise`.
The statistical gate is also applied across tensor-parallel sizes of one backend and model (the TP table).

The verdict of a pair is `exact` (bitwise), `within noise` or `diverges`, against each backend's noise floor measured
from the jobs' repeats (compare.repeats, runtime/repeats.py); without repeats, a pair that is not bitwise says so and
prints the command that measures the floor (RULE below states the rule). When a backend's repeats differ, the
nondeterministic parts of the config and their fixes follow (results/advice.py). A job that failed or did not finish
is listed with its exit reason and the end of its traceback (failure.json, runtime/failures.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import struct
import sys
from dataclasses import dataclass, field

from unified_train import rundir
from unified_train.config import BACKEND_NAMES
from unified_train.results import advice, numerics
from unified_train.rundir import Run

REFERENCE, CANDIDATE = BACKEND_NAMES  # the gates read MLM as the reference

GATES = ("exact", "golden", "statistical", "noise")


def fp32_ulps(a: float, b: float) -> int:
    """How many fp32 steps apart two losses are (both stacks compute the loss in fp32: 1 is the smallest difference
    there can be)."""

    def ordered(x: float) -> int:
        bits = struct.unpack("<I", struct.pack("<f", x))[0]
        return bits if bits < 0x80000000 else 0x80000000 - bits

    return abs(ordered(a) - ordered(b))


def series(run: Run, key: str = "lm loss") -> dict[int, float]:
    return {r["iteration"]: r[key] for r in run.metrics if isinstance(r.get(key), float)}


# --- gates ------------------------------------------------------------------------------------------------------


# What "bitwise" covers: every iteration's values of these metrics.
EXACT_KEYS = ("lm loss", "grad_norm", "lr")


def exact(a: Run, b: Run) -> tuple[bool, str]:
    differing = [k for k in EXACT_KEYS if series(a, k) != series(b, k)]
    if not series(a):
        return False, "no losses"
    return not differing, "bitwise equal" if not differing else f"differs in {', '.join(differing)}"


def golden(ref: dict[int, float], cand: dict[int, float], rtol: float = 0.05) -> tuple[bool, str]:
    steps = sorted(set(ref) & set(cand))
    if not steps:
        return False, "no common steps"
    bad = [s for s in steps if abs(ref[s] - cand[s]) > rtol * abs(ref[s])]
    allowed = min(max(len(steps) // 100, 1), 50) if len(steps) > 1 else 0
    return len(bad) <= allowed, f"{len(bad)} of {len(steps)} steps beyond rtol {rtol} (allowed {allowed})"


def _tolerance(loss: float) -> float:
    return 0.10 if loss > 2.0 else 0.05 if loss >= 0.5 else 0.02


def statistical(ref: dict[int, float], cand: dict[int, float]) -> tuple[bool, str]:
    steps = sorted(set(ref) & set(cand))
    if len(steps) < 2:
        return False, "fewer than 2 common steps"
    x, y = [ref[s] for s in steps], [cand[s] for s in steps]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sx = math.sqrt(sum((v - mx) ** 2 for v in x))
    sy = math.sqrt(sum((v - my) ** 2 for v in y))
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    if sx == 0 or sy == 0:  # a flat curve: correlated only with itself
        pearson = 1.0 if x == y else 0.0
    else:
        pearson = cov / (sx * sy)
    outside = sum(abs(a - b) > _tolerance(a) * abs(a) for a, b in zip(x, y, strict=True)) / len(steps)
    final = abs(x[-1] - y[-1]) / abs(x[-1])
    ok = pearson >= 0.95 and outside <= 0.10 and final <= 0.03
    return ok, f"pearson {pearson:.4f}, {outside:.0%} outside tolerance, final loss within {final:.2%}"


def verdicts(a: Run, b: Run) -> dict[str, tuple[bool, str]]:
    ref, cand = series(a), series(b)
    return {"exact": exact(a, b), "golden": golden(ref, cand), "statistical": statistical(ref, cand)}


# --- the noise floor and the verdict ------------------------------------------------------------------------------

# Run to run, lm loss and grad norm vary; lr follows the schedule alone, so a pair within noise has equal lr.
NOISE_KEYS = ("lm loss", "grad_norm")
MEASURE_REPEATS = 2  # what the printed command asks for
# The floor is the largest of a few samples of the run-to-run difference, so a difference from the same noise often
# exceeds it: over 5 iterations of Gaussian noise growing 1.5x per iteration, with 2 repeats per backend, the bare
# per-iteration maximum calls 67 % of such pairs `diverges`; the running maximum (noise only spreads as runs go on)
# and a margin of 3 bring that to 2 % (4 repeats: 0.1 %), while a real mismatch is orders of magnitude beyond it.
NOISE_MARGIN = 3
RULE = (
    "within noise when, at every iteration, |{a} - {b}| <= 3 x max(noise floor of {a}, noise floor of {b}) for lm "
    "loss and for grad norm, and lr is equal; a backend's noise floor at an iteration is the largest |main run - "
    "repeat| over its repeats at that or any earlier iteration; where both floors are 0 and the pair differs, the "
    "iteration diverges"
)


@dataclass
class Floor:
    """One backend's noise floor: per metric and iteration, the largest |main run - repeat| over its repeats, there
    or at an earlier iteration."""

    repeats: int  # the repeats it was measured from (those that finished)
    values: dict[str, dict[int, float]]

    def peak(self, key: str) -> float:
        return max(self.values[key].values(), default=0.0)


def noise_floor(run: Run) -> Floor | None:
    """None where the run has no finished repeat."""
    done = [r for r in run.repeats if r.ok]
    if not done:
        return None
    values = {}
    for key in NOISE_KEYS:
        main, others = series(run, key), [series(r, key) for r in done]
        spread, values[key] = 0.0, {}
        for it in sorted(main):
            if any(it in o for o in others):
                spread = max(spread, *(abs(main[it] - o[it]) for o in others if it in o))
                values[key][it] = spread
    return Floor(len(done), values)


@dataclass
class Verdict:
    kind: str  # exact | within noise | diverges | not bitwise (no noise floor measured)
    detail: str  # one line
    lines: list[str] = field(default_factory=list)  # the report's lines after the verdict line
    floors: dict[str, Floor] = field(default_factory=dict)  # backend -> its floor, where measured

    @property
    def passes(self) -> bool:
        """The noise gate."""
        return self.kind in ("exact", "within noise")

    def line(self) -> str:
        if self.kind == "exact":
            return "verdict: **exact (bitwise)**"  # the line tests/test_resume.py and the GPU tests look for
        if self.kind == "not bitwise":
            return f"verdict: **NOT bitwise**; {self.detail}"
        return f"verdict: **{self.kind}**: {self.detail}"


def _ratio(diff: float, floor: float) -> str:
    if floor > 0:
        return f"{diff / floor:.2f}"
    return "0" if diff == 0 else "inf"


def _beyond(key: str, diff: float, value: float, floor: float) -> str:
    relative = f"{diff / abs(value):.2e} relative" if value else "relative: inf"
    if floor == 0:
        return f"{key} differs by {diff:.3e} ({relative}) where neither backend varies between its repeats (floor 0)"
    return f"{key} differs by {diff:.3e} ({relative}), {diff / floor:.1f}x the noise floor {floor:.3e}"


def first_divergence(a: Run, b: Run, floors: dict[str, Floor]) -> str | None:
    """The first iteration beyond the noise (RULE), and by how much; None when there is none."""
    for it in sorted(set(series(a)) | set(series(b))):
        found = []
        for key in NOISE_KEYS:
            x, y = series(a, key).get(it), series(b, key).get(it)
            if x is None or y is None:
                if x is not None or y is not None:
                    found.append(f"{key} only from {a.backend if y is None else b.backend}")
                continue
            floor = max((f.values[key].get(it, 0.0) for f in floors.values()), default=0.0)
            if abs(x - y) > NOISE_MARGIN * floor:
                found.append(_beyond(key, abs(x - y), x, floor))
        lr_a, lr_b = series(a, "lr").get(it), series(b, "lr").get(it)
        if lr_a != lr_b:
            found.append(f"lr {lr_a!r} vs {lr_b!r} (the schedule has no noise)")
        if found:
            return f"iteration {it}: {'; '.join(found)}"
    return None


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def measure_command(run: Run) -> str:
    """The pair's own command (Hydra's record of its overrides and primary config), both backends, with repeats."""
    recorded = rundir.read_hydra_command(run.path)
    args = ["python", "-m", "unified_train", "-m"]
    if recorded and (recorded["config_dir"] or recorded["config_name"] != "config"):
        args += ["-cd", recorded["config_dir"]] if recorded["config_dir"] else []
        args += ["-cn", recorded["config_name"]]
    kept = [o for o in (recorded or {}).get("overrides", []) if _override_key(o) not in ("backend", "compare.repeats")]
    args += [f"backend={','.join(BACKEND_NAMES)}", *kept, f"compare.repeats={MEASURE_REPEATS}"]
    command = shlex.join(args)
    if recorded is None:
        command += "  # and this pair's overrides (no .hydra/overrides.yaml in its run directory)"
    return command


def _advice(a: Run, floors: dict[str, Floor]) -> list[str]:
    """Which backend does not repeat itself, and the parts of the pair's config that can make it so."""
    noisy = [b for b, f in floors.items() if any(f.peak(k) > 0 for k in NOISE_KEYS)]
    if not noisy:
        return []
    who = f"{noisy[0]} differs from itself" if len(noisy) == 1 else f"{' and '.join(noisy)} differ from themselves"
    out = [f"{who} run to run. Nondeterministic parts of this config, and the setting that removes each:"]
    if not os.path.isfile(os.path.join(a.path, rundir.UNIFIED_CONFIG)):
        return [*out, f"- (no {rundir.UNIFIED_CONFIG} in {a.path} to read the config from)"]
    return out + advice.lines(rundir.read_unified_config(a.path), a.job.attention, a.job.world_size)


def _floor_text(backend: str, floor: Floor | None) -> str:
    if floor is None:
        return f"{backend}: not measured (no finished repeat)"
    peaks = ", ".join(f"{k.replace('_', ' ')} up to {floor.peak(k):.3e}" for k in NOISE_KEYS)
    return f"{backend} from {floor.repeats} repeat{'s' if floor.repeats != 1 else ''} ({peaks})"


def noise_verdict(a: Run, b: Run) -> Verdict:
    """exact, within noise or diverges (RULE); without repeats, `not bitwise` and the command that measures them."""
    if exact(a, b)[0]:
        return Verdict("exact", "bitwise equal lm loss, grad norm and lr at every iteration")
    floors = {r.backend: f for r in (a, b) if (f := noise_floor(r)) is not None}
    if not floors:
        return Verdict(
            "not bitwise",
            "the noise floor was not measured (no repeats)",
            [
                "",
                "Whether the difference is larger than either stack differs from itself is not known: measure each "
                f"backend's noise floor by running each job {MEASURE_REPEATS} more times:",
                "",
                "```",
                measure_command(a),
                "```",
            ],
        )
    lines = [
        "",
        f"- noise floor: {'; '.join(_floor_text(r.backend, floors.get(r.backend)) for r in (a, b))}",
        f"- rule: {RULE.format(a=a.backend, b=b.backend)}",
    ]
    where = first_divergence(a, b, floors)
    if where is None:
        la, lb = series(a), series(b)
        ratios = [
            (abs(la[it] - lb[it]) / f, it)
            for it in la
            if it in lb and (f := max(fl.values["lm loss"].get(it, 0.0) for fl in floors.values())) > 0
        ]
        closest = max(ratios, default=None)
        near = f" (lm loss at most {closest[0]:.2f}x the floor, iteration {closest[1]})" if closest else ""
        verdict = Verdict("within noise", f"every iteration within the noise floor{near}", floors=floors)
    else:
        verdict = Verdict("diverges", f"at {where}", floors=floors)
    more = _advice(a, floors)
    verdict.lines = lines + ([""] + more if more else [])
    return verdict


# --- report ----------------------------------------------------------------------------------------------------


def pair_table(a: Run, b: Run, floors: dict[str, Floor] | None = None) -> str:
    """Both losses per iteration, their difference (absolute, relative, in fp32 steps) and, where a noise floor was
    measured, the difference as a multiple of it (the larger backend's floor: above 1 is beyond the noise)."""
    la, lb = series(a), series(b)
    head = f"| iter | {a.backend} lm loss | {b.backend} lm loss | abs diff | rel diff | fp32 ULPs |"
    rule = "|---:|---:|---:|---:|---:|---:|"
    if floors:
        head, rule = head + " diff / noise |", rule + "---:|"
    lines = [head, rule]
    for it in sorted(set(la) | set(lb)):
        x, y = la.get(it), lb.get(it)
        if x is None or y is None:
            lines.append(f"| {it} | {x} | {y} | missing | | |" + (" |" if floors else ""))
            continue
        d = abs(x - y)
        row = f"| {it} | {x!r} | {y!r} | {d:.3e} | {d / abs(x) if x else 0:.3e} | {fp32_ulps(x, y)} |"
        if floors:
            row += f" {_ratio(d, max(f.values['lm loss'].get(it, 0.0) for f in floors.values()))} |"
        lines.append(row)
    return "\n".join(lines)


def golden_values(run: Run) -> dict:
    """Megatron-LM functional-test format (values rounded to 5 decimals, as its harness records them)."""
    values = series(run)
    steps = sorted(values)
    return {
        "lm loss": {
            "start_step": steps[0] if steps else 0,
            "end_step": steps[-1] if steps else 0,
            "step_interval": 1,
            "values": {str(s): round(values[s], 5) for s in steps},
        }
    }


def tp_table(runs: list[Run]) -> list[str]:
    """Statistical gate across tensor-parallel sizes of the same backend and model (reference: smallest tp)."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        if run.ok and run.job.tp_group:
            groups.setdefault((run.backend, run.job.tp_group), []).append(run)
    out = []
    for (backend, _), members in sorted(groups.items()):
        tps = sorted({m.job.tp for m in members})
        if len(tps) < 2:
            continue
        members.sort(key=lambda r: r.job.tp)
        ref = members[0]
        out += [
            f"## convergence across TP: {backend}, {ref.job.model} (reference tp={ref.job.tp})",
            "",
            "| tp | final lm loss | statistical gate | detail |",
            "|---:|---:|---|---|",
        ]
        for m in members:
            ok, detail = statistical(series(ref), series(m))
            final = series(m)[max(series(m))]
            out.append(f"| {m.job.tp} | {final:.5f} | {'pass' if ok else 'FAIL'} | {detail} |")
        out.append("")
    return out


def plot(pairs: list[tuple[Run, Run]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, max(1, len(pairs)), figsize=(6 * max(1, len(pairs)), 7), squeeze=False)
    for col, (a, b) in enumerate(pairs):
        la, lb = series(a), series(b)
        steps = sorted(set(la) & set(lb))
        axes[0][col].plot(sorted(la), [la[s] for s in sorted(la)], label=a.backend)
        axes[0][col].plot(sorted(lb), [lb[s] for s in sorted(lb)], "--", label=b.backend)
        axes[0][col].set(title=f"{a.job.model} tp={a.job.tp} pp={a.job.pp} ({a.pair_id})", ylabel="lm loss")
        axes[0][col].legend()
        axes[1][col].plot(steps, [lb[s] - la[s] for s in steps])
        axes[1][col].set(xlabel="iteration", ylabel=f"{b.backend} - {a.backend}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def preflight_table(checks: list[Run]) -> tuple[list[str], bool]:
    """mode=preflight jobs: one row per job (from its preflight/summary.json), and any pair that lacks a half."""
    out = [
        "## preflight",
        "",
        "| job | backend | pair | world size | ranks reported | hosts | all-reduce | parity | ok |",
        "|---|---|---|---:|---|---|---|---|---|",
    ]
    all_ok = True
    for run in checks:
        s = run.summary or {}
        all_ok &= run.ok
        out.append(
            f"| {os.path.basename(run.path)} | {run.backend} | {run.pair_id} | {s.get('world_size', '')} | "
            f"{s.get('ranks_reported', 'no summary')} | {','.join(s.get('hosts', []))} | "
            f"{'ok' if s.get('all_reduce_ok') else 'FAILED'} | {'clean' if s.get('parity_clean') else _differs(s)} "
            f"| {'yes' if run.ok else '**NO**'} |"
        )
    by_pair: dict[str, set[str]] = {}
    for run in checks:
        by_pair.setdefault(run.pair_id, set()).add(run.backend)
    for pid, backends in sorted(by_pair.items()):
        missing = sorted(set(BACKEND_NAMES) - backends)
        if missing:
            all_ok = False
            out.append(f"\npair {pid}: **incomplete**, no {', '.join(missing)} job")
    passed = sum(r.ok for r in checks)
    out += [
        "",
        f"preflight verdict: **{'pass' if all_ok else 'FAIL'}** ({passed} of {len(checks)} jobs ok, "
        f"{len(by_pair)} pairs)",
        "",
    ]
    return out, all_ok


def _differs(summary: dict) -> str:
    """A preflight's parity cell: the fields that differ (summaries written before they were listed: none)."""
    fields = summary.get("parity_differences")
    return f"DIFFERS in {', '.join(fields)}" if fields else "DIFFERS"


def failure_reason(run: Run) -> str:
    """One line: why a job did not finish (its failure record's type, exit code and message)."""
    f = run.failure
    if f is None:
        return "no summary and no failure record: it was killed, or is still running"
    code = f", exit code {f['exit_code']}" if f.get("exit_code") is not None else ""
    message = (f.get("message") or "").strip().splitlines()
    return f"{f['error']}{code}" + (f": {message[0]}" if message else "")


def failed_jobs(every: list[Run]) -> list[Run]:
    """Every job, and every repeat of one, that failed or left no summary."""
    return [r for run in every for r in (run, *run.repeats) if r.failure is not None or r.summary is None]


def _label(path: str, sweep_dirs: list[str]) -> str:
    for sweep in sweep_dirs:
        relative = os.path.relpath(path, sweep)
        if not relative.startswith(".."):
            return path if relative == "." else relative
    return path


def failures_section(failed: list[Run], sweep_dirs: list[str]) -> list[str]:
    out = ["## failed jobs", ""]
    for run in failed:
        out.append(f"- `{_label(run.path, sweep_dirs)}` ({run.backend}, pair {run.pair_id}): {failure_reason(run)}")
        tail = (run.failure or {}).get("traceback") or []
        if tail:
            out += ["  ```", *(f"  {line}" for line in tail), "  ```"]
    return [*out, ""]


def _missing(backend: str, run: Run | None) -> str:
    if run is None:
        return f"no {backend} job"
    return f"{backend} {'failed' if run.failure else 'did not finish'} ({failure_reason(run)})"


@dataclass
class Comparison:
    text: str  # comparison.md
    ok: bool  # every pair passed the gate, the preflight checks passed, and no job failed
    failed: list[str]  # one line per job (or repeat) that failed or did not finish
    verdicts: dict[str, Verdict]  # pair id -> its verdict, for the pairs with both halves


def _summary_line(kinds: list[str], incomplete: int, failed: list[str], preflight: bool | None) -> str:
    parts = []
    if preflight is not None:
        parts.append(f"preflight {'pass' if preflight else 'FAIL'}")
    pairs = len(kinds) + incomplete
    if pairs:
        names = {"exact": "exact", "within noise": "within noise", "diverges": "diverges"}
        names["not bitwise"] = "not bitwise (noise floor not measured)"
        counts = [f"{kinds.count(k)} {name}" for k, name in names.items() if kinds.count(k)]
        counts += [f"{incomplete} incomplete"] if incomplete else []
        parts.append(f"{pairs} pair{'s' if pairs != 1 else ''}: {', '.join(counts)}")
    if failed:
        parts.append(f"{len(failed)} failed job{'s' if len(failed) != 1 else ''}: {'; '.join(failed)}")
    return "summary: " + ("; ".join(parts) if parts else "no runs")


def comparison(sweep_dirs: list[str], gate: str = "exact", out_dir: str | None = None) -> Comparison:
    """The comparison report (markdown): a summary line, the preflight table, one section per pair (table, gates,
    verdict), the failed jobs, the TP table. With `out_dir`, also writes comparison.md, comparison.json (the
    verdicts as data), comparison.png and a golden-values JSON into every finished run directory."""
    every = rundir.load_runs(sweep_dirs)
    checks = [r for r in every if r.is_preflight]
    runs = [r for r in every if not r.is_preflight]
    by_pair: dict[str, list[Run]] = {}
    for run in runs:
        by_pair.setdefault(run.pair_id, []).append(run)
    out, all_ok, complete_pairs, preflight_ok = [], True, [], None
    found: dict[str, Verdict] = {}
    data: dict[str, dict] = {}
    if checks:
        lines, preflight_ok = preflight_table(checks)
        all_ok = preflight_ok
        out += lines
    for pid, members in sorted(by_pair.items()):
        backends = {r.backend: r for r in members}
        first = members[0].job
        out.append(f"## pair {pid} ({first.model}, tp={first.tp}, pp={first.pp})")
        missing = [b for b in BACKEND_NAMES if b not in backends or not backends[b].ok]
        if missing:
            all_ok = False
            reasons = "; ".join(_missing(b, backends.get(b)) for b in missing)
            out.append(f"**incomplete**: {reasons}\n")
            data[pid] = {"model": first.model, "verdict": "incomplete", "detail": reasons}
            continue
        a, b = backends[REFERENCE], backends[CANDIDATE]
        complete_pairs.append((a, b))
        result = verdicts(a, b)
        verdict = found[pid] = noise_verdict(a, b)
        all_ok &= verdict.passes if gate == "noise" else result[gate][0]
        out += [pair_table(a, b, verdict.floors), ""]
        out += [f"- {name}: **{'pass' if ok else 'FAIL'}** ({detail})" for name, (ok, detail) in result.items()]
        out += ["", verdict.line(), *verdict.lines, ""]
        data[pid] = {
            "model": first.model,
            "verdict": verdict.kind,
            "detail": verdict.detail,
            "gates": {name: ok for name, (ok, _) in result.items()},
        }
        if a.job.mode == "numerics":  # where the pair parts, module by module (results/numerics.py)
            out += numerics.section(a.path, b.path, a.backend, b.backend)
    failed = failed_jobs(every)
    if failed:
        all_ok = False
        out += failures_section(failed, sweep_dirs)
    out += tp_table(runs)
    failed_lines = [f"{_label(r.path, sweep_dirs)} ({failure_reason(r)})" for r in failed]
    incomplete = sum(1 for v in data.values() if v["verdict"] == "incomplete")
    summary = _summary_line([v.kind for v in found.values()], incomplete, failed_lines, preflight_ok)
    text = "\n".join(["# unified_train comparison", "", summary, "", *out])
    if out_dir is not None:
        with open(os.path.join(out_dir, rundir.COMPARISON_MD), "w") as f:
            f.write(text + "\n")
        rundir.write_comparison(
            out_dir,
            {
                "summary": summary,
                "pairs": data,
                "failed": [
                    {"job": _label(r.path, sweep_dirs), "backend": r.backend, "pair_id": r.pair_id, "reason": why}
                    for r, why in zip(failed, map(failure_reason, failed), strict=True)
                ],
            },
        )
        if complete_pairs:
            plot(complete_pairs, os.path.join(out_dir, rundir.COMPARISON_PNG))
        for run in runs:
            if run.ok:
                rundir.write_golden_values(run.path, golden_values(run))
    return Comparison(text, all_ok, failed_lines, found)


def report(sweep_dirs: list[str], gate: str = "exact", out_dir: str | None = None) -> tuple[str, bool]:
    """The comparison report (markdown) and whether every pair passed `gate` with no job failed (`comparison`)."""
    result = comparison(sweep_dirs, gate, out_dir)
    return result.text, result.ok


def resume_report(continuous_dir: str, resumed_dir: str) -> tuple[str, bool]:
    """A resumed run against the run that never stopped, over the iterations the resumed one trained: the pair
    table and gates, and `exact` when every lm loss, grad norm and lr is bitwise equal there."""
    (continuous,), (resumed,) = rundir.load_runs([continuous_dir]), rundir.load_runs([resumed_dir])
    steps = {r["iteration"] for r in resumed.metrics}
    continuous = dataclasses.replace(continuous, metrics=[r for r in continuous.metrics if r["iteration"] in steps])
    missing = sorted(steps - {r["iteration"] for r in continuous.metrics})
    result = verdicts(continuous, resumed)
    first, last = (min(steps), max(steps)) if steps else (0, 0)
    out = [f"## resume: {resumed_dir} (iterations {first}..{last}) against {continuous_dir}", ""]
    out += [pair_table(continuous, resumed), ""]
    out += [f"- {name}: **{'pass' if ok else 'FAIL'}** ({detail})" for name, (ok, detail) in result.items()]
    if missing:
        out.append(f"- the continuous run lacks iterations {','.join(map(str, missing))}")
    exact_ok = result["exact"][0] and not missing
    out += ["", f"verdict: **{'exact (bitwise)' if exact_ok else 'NOT bitwise'}**", ""]
    return "\n".join(out), exact_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unified_train.results.compare", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dirs", nargs="*")
    parser.add_argument(
        "--gate", choices=GATES, default="exact", help="the gate the exit status reports (noise: exact or within noise)"
    )
    parser.add_argument("--write", action="store_true", help="write comparison.md/.png into the first directory")
    parser.add_argument(
        "--resume",
        nargs=2,
        metavar=("CONTINUOUS_DIR", "RESUMED_DIR"),
        help="a resumed run against the run that never stopped (exit 0 only when bitwise equal)",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.resume:
        bad = [d for d in args.resume if not os.path.isfile(os.path.join(d, rundir.RUN_JSON))]
        if bad:
            print(f"unified_train.results.compare: {bad[0]}: no run.json: give two run directories", file=sys.stderr)
            return 2
        text, ok = resume_report(*args.resume)
        print(text)
        return 0 if ok else 1
    if not args.sweep_dirs:
        print("usage: python -m unified_train.results.compare SWEEP_DIR [SWEEP_DIR ...]", file=sys.stderr)
        return 2
    missing = [d for d in args.sweep_dirs if not os.path.isdir(d)]
    if missing or not rundir.load_runs(args.sweep_dirs):
        what = f"{missing[0]}: no such directory" if missing else f"no run.json under {', '.join(args.sweep_dirs)}"
        print(f"unified_train.results.compare: {what}: give a sweep or run directory", file=sys.stderr)
        return 2
    text, ok = report(args.sweep_dirs, gate=args.gate, out_dir=args.sweep_dirs[0] if args.write else None)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Correlation verdicts over sweep directories: pair runs by pair id and judge their per-iteration losses.

Reads only the job directories (rundir.load_runs), so it works whatever process or host ran the jobs. Runs at the
end of every multirun (results/callbacks.py), and as a command:

    python -m unified_train.results.compare SWEEP_DIR [SWEEP_DIR ...] [--gate exact|golden|statistical] [--write]

Gates (MLM = reference, Bridge = candidate):
- exact: every lm loss, grad norm and lr bitwise equal;
- golden: Megatron-LM's functional-test check, |a-b| <= 0.05*|a| per step (a few failing steps allowed as there);
- statistical: Megatron-Bridge's convergence check: Pearson >= 0.95, pointwise tolerance 10/5/2 % for losses
  above 2 / 0.5-2 / below 0.5, at most 10 % of points outside it, final loss within 3 %.
The statistical gate is also applied across tensor-parallel sizes of one backend and model (the TP table).
"""

from __future__ import annotations

import argparse
import math
import os
import struct
import sys

from unified_train import rundir
from unified_train.config import BACKEND_NAMES
from unified_train.rundir import Run

REFERENCE, CANDIDATE = BACKEND_NAMES  # the gates read MLM as the reference

GATES = ("exact", "golden", "statistical")


def bf16_ulps(a: float, b: float) -> int:
    """Distance in bf16 units in the last place (bf16 = the top 16 bits of an fp32)."""

    def ordered(x: float) -> int:
        bits = struct.unpack("<I", struct.pack("<f", x))[0] >> 16
        return bits if bits < 0x8000 else 0x8000 - bits

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


# --- report ----------------------------------------------------------------------------------------------------


def pair_table(a: Run, b: Run) -> str:
    la, lb = series(a), series(b)
    lines = [
        f"| iter | {a.backend} lm loss | {b.backend} lm loss | abs diff | rel diff | bf16 ULPs |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for it in sorted(set(la) | set(lb)):
        x, y = la.get(it), lb.get(it)
        if x is None or y is None:
            lines.append(f"| {it} | {x} | {y} | missing | | |")
            continue
        d = abs(x - y)
        lines.append(f"| {it} | {x!r} | {y!r} | {d:.3e} | {d / abs(x) if x else 0:.3e} | {bf16_ulps(x, y)} |")
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
            f"{'ok' if s.get('all_reduce_ok') else 'FAILED'} | {'clean' if s.get('parity_clean') else 'DIFFERS'} "
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


def report(sweep_dirs: list[str], gate: str = "exact", out_dir: str | None = None) -> tuple[str, bool]:
    """The comparison report (markdown) and whether every pair passed `gate`. With `out_dir`, also writes
    comparison.md, comparison.png and a golden-values JSON into every run directory."""
    every = rundir.load_runs(sweep_dirs)
    checks = [r for r in every if r.is_preflight]
    runs = [r for r in every if not r.is_preflight]
    by_pair: dict[str, list[Run]] = {}
    for run in runs:
        by_pair.setdefault(run.pair_id, []).append(run)
    out, all_ok, complete_pairs = ["# unified_train comparison", ""], True, []
    if checks:
        lines, all_ok = preflight_table(checks)
        out += lines
    for pid, members in sorted(by_pair.items()):
        backends = {r.backend: r for r in members}
        first = members[0].job
        out.append(f"## pair {pid} ({first.model}, tp={first.tp}, pp={first.pp})")
        missing = [b for b in BACKEND_NAMES if b not in backends or not backends[b].ok]
        if missing:
            all_ok = False
            out.append(f"**incomplete**: {', '.join(missing)} half missing or failed (no metrics/summary)\n")
            continue
        a, b = backends[REFERENCE], backends[CANDIDATE]
        complete_pairs.append((a, b))
        result = verdicts(a, b)
        all_ok &= result[gate][0]
        out += [pair_table(a, b), ""]
        out += [f"- {name}: **{'pass' if ok else 'FAIL'}** ({detail})" for name, (ok, detail) in result.items()]
        out += ["", f"verdict: **{'exact (bitwise)' if result['exact'][0] else 'NOT bitwise'}**", ""]
    out += tp_table(runs)
    text = "\n".join(out)
    if out_dir is not None:
        with open(os.path.join(out_dir, rundir.COMPARISON_MD), "w") as f:
            f.write(text + "\n")
        if complete_pairs:
            plot(complete_pairs, os.path.join(out_dir, rundir.COMPARISON_PNG))
        for run in runs:
            if run.ok:
                rundir.write_golden_values(run.path, golden_values(run))
    return text, all_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unified_train.results.compare", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dirs", nargs="*")
    parser.add_argument("--gate", choices=GATES, default="exact", help="the gate the exit status reports")
    parser.add_argument("--write", action="store_true", help="write comparison.md/.png into the first directory")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
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

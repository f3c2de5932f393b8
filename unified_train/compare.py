"""Correlation verdicts over sweep directories: pair runs by pair id and compare their per-iteration losses.

Reads only files (`run.json`, `metrics.jsonl`, `summary.json` in each job directory), so it works whatever
process or host ran the jobs. Also a Hydra callback that runs at the end of every multirun.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import dataclass, field

from hydra.experimental.callback import Callback


@dataclass
class Run:
    path: str
    backend: str
    pair_id: str
    info: dict
    metrics: list[dict] = field(default_factory=list)
    summary: dict | None = None

    @property
    def ok(self) -> bool:
        return self.summary is not None and bool(self.metrics)


def load_runs(sweep_dirs: list[str]) -> list[Run]:
    runs = []
    for sweep in sweep_dirs:
        for root, dirs, files in os.walk(sweep):
            if "run.json" not in files:
                continue
            dirs[:] = []  # a run directory holds no other runs
            with open(os.path.join(root, "run.json")) as f:
                info = json.load(f)
            run = Run(root, info["backend"], info["pair_id"], info)
            metrics = os.path.join(root, "metrics.jsonl")
            if os.path.exists(metrics):
                with open(metrics) as f:
                    run.metrics = [json.loads(line) for line in f if line.strip()]
            summary = os.path.join(root, "summary.json")
            if os.path.exists(summary):
                with open(summary) as f:
                    run.summary = json.load(f)
            runs.append(run)
    return sorted(runs, key=lambda r: r.path)


def bf16_ulps(a: float, b: float) -> int:
    """Distance in bf16 units in the last place (bf16 = the top 16 bits of an fp32)."""
    def ordered(x: float) -> int:
        bits = struct.unpack("<I", struct.pack("<f", x))[0] >> 16
        return bits if bits < 0x8000 else 0x8000 - bits
    return abs(ordered(a) - ordered(b))


def _series(run: Run, key: str = "lm loss") -> dict[int, float]:
    return {r["iteration"]: r[key] for r in run.metrics if isinstance(r.get(key), float)}


def exact(a: Run, b: Run) -> bool:
    keys = ("lm loss", "grad_norm", "lr")
    return all(_series(a, k) == _series(b, k) for k in keys) and bool(_series(a))


def pair_table(a: Run, b: Run) -> str:
    la, lb = _series(a), _series(b)
    lines = [f"| iter | {a.backend} lm loss | {b.backend} lm loss | abs diff | rel diff | bf16 ULPs |",
             "|---:|---:|---:|---:|---:|---:|"]
    for it in sorted(set(la) | set(lb)):
        x, y = la.get(it), lb.get(it)
        if x is None or y is None:
            lines.append(f"| {it} | {x} | {y} | missing | | |")
            continue
        d = abs(x - y)
        lines.append(f"| {it} | {x!r} | {y!r} | {d:.3e} | {d / abs(x) if x else 0:.3e} | {bf16_ulps(x, y)} |")
    return "\n".join(lines)


def report(sweep_dirs: list[str]) -> tuple[str, bool]:
    """The comparison report (markdown) and whether every pair passed the exact gate."""
    runs = load_runs(sweep_dirs)
    by_pair: dict[str, list[Run]] = {}
    for run in runs:
        by_pair.setdefault(run.pair_id, []).append(run)
    out, all_ok = ["# unified_train comparison", ""], True
    for pid, members in sorted(by_pair.items()):
        backends = {r.backend: r for r in members}
        out.append(f"## pair {pid} ({members[0].info.get('model')}, tp={members[0].info.get('tp')}, "
                   f"pp={members[0].info.get('pp')})")
        missing = [b for b in ("mlm", "bridge") if b not in backends or not backends[b].ok]
        if missing:
            all_ok = False
            out.append(f"**incomplete**: {', '.join(missing)} half missing or failed (no metrics/summary)\n")
            continue
        a, b = backends["mlm"], backends["bridge"]
        verdict = exact(a, b)
        all_ok &= verdict
        out += [pair_table(a, b), "", f"verdict: **{'exact (bitwise)' if verdict else 'NOT bitwise'}**", ""]
    return "\n".join(out), all_ok


class CompareCallback(Callback):
    """At the end of a multirun, compare whatever the jobs wrote into the sweep directory."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = config.hydra.sweep.dir
        text, ok = report([sweep_dir])
        with open(os.path.join(sweep_dir, "comparison.md"), "w") as f:
            f.write(text + "\n")
        print(text)
        print(f"comparison written to {os.path.join(sweep_dir, 'comparison.md')}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m unified_train.compare SWEEP_DIR [SWEEP_DIR ...]", file=sys.stderr)
        return 2
    text, ok = report(argv)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

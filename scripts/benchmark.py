"""Throughput benchmark: unified_train vs the same stacks driven natively, one config, one GPU session.

    python scripts/benchmark.py --label vanilla_gpt -- model=vanilla_gpt train.iters=30
    python scripts/benchmark.py --label llama32_1b -- model=llama32_1b train.seq_length=2048 train.iters=12

Runs, each in its own process and measured with one instrument (the stacks' own per-iteration time lines,
which every variant prints): (a) unified_train backend=mlm, (b) backend=bridge, (c) native MLM and native Bridge
(scripts/native_baseline.py), and (d) the in-process pair `-m backend=mlm,bridge` against (a)+(b).
Reports steady-state tokens/s, TFLOP/s per GPU, MFU against the bf16 matmul peak measured here, time to the
first iteration (process start to the iteration-1 line) and whole wall time; ratios are taken within this run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ITER_LINE = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*?elapsed time per iteration \(ms\): ([\d.]+)")
QUIET = ["logger=none", "checkpoint=none", "validation.eval_iters=0"]


def measure_bf16_peak(n: int = 8192, reps: int = 50) -> float:
    """Dense bf16 matmul TFLOP/s on this GPU (the MFU denominator)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    tflops = 2 * n**3 * reps / (time.perf_counter() - start) / 1e12
    del a, b
    torch.cuda.empty_cache()  # the variants run in child processes on this GPU
    return tflops


def run(cmd: list[str], log: Path) -> dict:
    """Run one variant; timestamp its output lines."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TORCHDYNAMO_DISABLE", None)
    start = time.perf_counter()
    first_iteration = None
    times: dict[int, float] = {}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            m = ITER_LINE.search(line)
            if m:
                it = int(m.group(1))
                if first_iteration is None:
                    first_iteration = time.perf_counter() - start
                times[it] = float(m.group(3)) / 1000
        proc.wait()
    if proc.returncode != 0:
        print(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}", file=sys.stderr)
        return {"failed": True, "wall_s": time.perf_counter() - start, "first_iteration_s": None,
                "steady_iter_s": None, "iterations": len(times)}
    # Skip warm-up: iteration 1 compiles, and MLM prints iteration 2 as the mean of iterations 1 and 2.
    steady = [t for it, t in sorted(times.items()) if it >= max(4, len(times) // 3)]
    return {"wall_s": time.perf_counter() - start, "first_iteration_s": first_iteration,
            "steady_iter_s": statistics.median(steady) if steady else None, "iterations": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True)
    parser.add_argument("--out", default=None, help="directory for logs and the JSON/markdown results")
    parser.add_argument("--skip-pair", action="store_true", help="do not time the in-process pair")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the discarded first run (it fills the torch.compile/inductor and file caches, "
                             "which otherwise make whichever variant runs first look slow to start)")
    parser.add_argument("overrides", nargs="*", help="unified_train overrides (after --)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_"))
    out.mkdir(parents=True, exist_ok=True)
    ov = [*QUIET, *args.overrides]
    py = sys.executable

    peak = measure_bf16_peak()  # first, so a session cut off mid-way still reports MFU for what it measured
    if not args.no_warmup:
        run([py, "scripts/native_baseline.py", "mlm", *ov], out / "warmup.log")
    results: dict[str, dict] = {}
    summaries: dict[str, dict] = {}

    def measure(name: str, cmd: list[str], log: Path) -> None:
        results[name] = run(cmd, log)
        write_table(args.label, out, peak, results, summaries)  # after every variant: survives a cut-off session

    for backend in ("mlm", "bridge"):
        run_dir = out / f"unified_{backend}"
        cmd = [py, "-m", "unified_train", f"backend={backend}", f"hydra.run.dir={run_dir}", *ov]
        results[f"unified {backend}"] = run(cmd, out / f"unified_{backend}.log")
        if (run_dir / "summary.json").exists():  # token and FLOP counts per iteration, for every variant
            summaries[backend] = json.loads((run_dir / "summary.json").read_text())
        write_table(args.label, out, peak, results, summaries)
        measure(f"native {backend}", [py, "scripts/native_baseline.py", backend, *ov], out / f"native_{backend}.log")
    if not args.skip_pair:
        measure("pair in one process",
                [py, "-m", "unified_train", "-m", "backend=mlm,bridge", f"hydra.sweep.dir={out / 'pair'}", *ov],
                out / "pair.log")
    print(write_table(args.label, out, peak, results, summaries))


def write_table(label: str, out: Path, peak: float, results: dict[str, dict], summaries: dict[str, dict]) -> str:
    """Derive throughput, MFU and the ratios from what has been measured so far; write `<label>.md/.json`."""
    for name, r in results.items():
        backend = "bridge" if "bridge" in name else "mlm"
        s = summaries.get(backend)
        r.update(tokens_per_s=None, tflops_per_gpu=None, mfu=None)
        if s is None or r.get("failed") or not r["steady_iter_s"]:
            continue
        r["tokens_per_s"] = s["tokens_per_iteration"] / r["steady_iter_s"]
        if "pair" not in name:
            r["tflops_per_gpu"] = s["flops_per_iteration"] / r["steady_iter_s"] / s["world_size"] / 1e12
            r["mfu"] = r["tflops_per_gpu"] / peak
    for backend in ("mlm", "bridge"):
        u, n = results.get(f"unified {backend}"), results.get(f"native {backend}")
        if u and n and not (u.get("failed") or n.get("failed")):
            u["throughput_vs_native"] = n["steady_iter_s"] / u["steady_iter_s"]
            u["first_iteration_vs_native"] = u["first_iteration_s"] / n["first_iteration_s"]
    pair = results.get("pair in one process")
    if pair and not pair.get("failed") and "unified mlm" in results and "unified bridge" in results:
        pair["wall_vs_two_processes"] = pair["wall_s"] / (results["unified mlm"]["wall_s"] +
                                                          results["unified bridge"]["wall_s"])

    def fmt(v, spec):
        return "" if v is None else format(v, spec)

    lines = [f"### {label} (bf16 matmul peak measured here: {peak:.0f} TFLOP/s)", "",
             "| variant | steady s/it | tokens/s | TFLOP/s/GPU | MFU | first iteration s | wall s | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in results.items():
        ratio = "FAILED (see its log)" if r.get("failed") else ""
        if "throughput_vs_native" in r:
            ratio = (f"throughput {r['throughput_vs_native']:.3f}x native, "
                     f"first-iteration time {r['first_iteration_vs_native']:.2f}x native")
        if "wall_vs_two_processes" in r:
            ratio = f"wall {r['wall_vs_two_processes']:.2f}x of two separate processes"
        lines.append(f"| {name} | {fmt(r['steady_iter_s'], '.4f')} | {fmt(r['tokens_per_s'], ',.0f')} | "
                     f"{fmt(r['tflops_per_gpu'], '.1f')} | {fmt(r['mfu'], '.1%')} | "
                     f"{fmt(r['first_iteration_s'], '.1f')} | {r['wall_s']:.1f} | {ratio} |")
    text = "\n".join(lines)
    (out / f"{label}.md").write_text(text + "\n")
    (out / f"{label}.json").write_text(json.dumps({"peak_tflops": peak, "results": results}, indent=2))
    return text


if __name__ == "__main__":
    main()

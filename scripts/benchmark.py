"""Throughput benchmark: unified_train vs the same stacks driven natively, one config, one GPU session.

    python scripts/benchmark.py --label vanilla_gpt --repeats 3 -- model=vanilla_gpt train.iters=30
    python scripts/benchmark.py --label llama32_1b -- model=llama32_1b train.seq_length=2048 train.iters=12
    python scripts/benchmark.py --label llama_8k --backends mlm --attention flex,sdpa --skip-pair --no-warmup -- \
        model=llama32_1b train.seq_length=8192 train.micro_batch_size=1 train.global_batch_size=8 train.iters=6

Runs, each in its own process and measured with one instrument (the stacks' own per-iteration time lines,
which every variant prints): (a) unified_train backend=mlm, (b) backend=bridge, (c) native MLM and native Bridge
(scripts/native_baseline.py: the stacks' own attention), and (d) the in-process pair `-m backend=mlm,bridge`
against (a)+(b). With `--attention flex,sdpa` the unified runs are made once per core attention
(`kernels.attention`), each compared with the native run of its backend.
Reports steady-state tokens/s, TFLOP/s per GPU, MFU against the bf16 matmul peak measured here, time to the
first iteration (process start to the iteration-1 line), iteration 1 itself (the stack's own time for it: the
fused kernels are compiled there) and whole wall time; ratios are taken within this run.
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
# Printed by unified_train and by native_baseline.py: splits the time to the first iteration at the stack's entry.
PRETRAIN_LINE = re.compile(r"pretrain called ([\d.]+) s after process start")
QUIET = ["logger=none", "checkpoint=none", "validation.eval_iters=0"]
# A run's timings (seconds), besides its wall time: all None for a run that failed, medians in the table.
TIMINGS = ("steady_iter_s", "first_iteration_s", "to_pretrain_s", "iteration_1_s")


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
    """Run one variant. Each line of its log starts with the seconds since the variant was started (`[  12.345] `),
    so the phases of two variants can be compared on one clock, lines the stacks print without a time too."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TORCHDYNAMO_DISABLE", None)
    start = time.perf_counter()
    first_iteration = to_pretrain = None
    times: dict[int, float] = {}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(f"[{time.perf_counter() - start:8.3f}] {line}")
            called = PRETRAIN_LINE.search(line)
            if called and to_pretrain is None:
                to_pretrain = float(called.group(1))
            m = ITER_LINE.search(line)
            if m:
                it = int(m.group(1))
                if first_iteration is None:
                    first_iteration = time.perf_counter() - start
                times[it] = float(m.group(3)) / 1000
        proc.wait()
    if proc.returncode != 0:
        print(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}", file=sys.stderr)
        return {
            "failed": True,
            "wall_s": time.perf_counter() - start,
            "iterations": len(times),
            **dict.fromkeys(TIMINGS),
        }
    # Skip warm-up: iteration 1 compiles, and MLM prints iteration 2 as the mean of iterations 1 and 2.
    steady = [t for it, t in sorted(times.items()) if it >= max(4, len(times) // 3)]
    return {
        "wall_s": time.perf_counter() - start,
        "first_iteration_s": first_iteration,
        "to_pretrain_s": to_pretrain,
        "iteration_1_s": times.get(1),
        "steady_iter_s": statistics.median(steady) if steady else None,
        "iterations": len(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True)
    parser.add_argument("--out", default=None, help="directory for logs and the JSON/markdown results")
    parser.add_argument("--backends", default="mlm,bridge", help="comma-separated: which backends to measure")
    parser.add_argument("--skip-pair", action="store_true", help="do not time the in-process pair")
    parser.add_argument(
        "--attention",
        default=None,
        help="comma-separated kernels.attention choices: one unified run of each backend per choice",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every variant this many times, in alternating order (ABC CBA ...), and report "
        "medians: a drifting host (clocks, another tenant) then biases no variant",
    )
    parser.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the discarded first run (it fills the torch.compile/inductor and file caches, "
        "which otherwise make whichever variant runs first look slow to start)",
    )
    parser.add_argument("overrides", nargs="*", help="unified_train overrides (after --)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_"))
    if out.is_dir() and any(out.iterdir()):  # its run directories would be refused, and its tables overwritten
        sys.exit(f"--out {out} already holds results: choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    ov = [*QUIET, *args.overrides]
    py = sys.executable
    backends = args.backends.split(",")

    peak = measure_bf16_peak()  # first, so a session cut off mid-way still reports MFU for what it measured
    if not args.no_warmup:
        run([py, "scripts/native_baseline.py", backends[0], *ov], out / "warmup.log")

    # Each variant's command for repeat r (a unified run needs a directory of its own every time).
    variants: dict[str, object] = {}
    choices = args.attention.split(",") if args.attention else [None]
    for backend in backends:
        variants[f"native {backend}"] = lambda r, b=backend: [py, "scripts/native_baseline.py", b, *ov]
        for choice in choices:
            name = unified_name(backend, choice)
            kernel = [f"kernels.attention={choice}"] if choice else []
            variants[name] = lambda r, b=backend, n=name, k=kernel: [
                py,
                "-m",
                "unified_train",
                f"backend={b}",
                f"hydra.run.dir={out / n.replace(' ', '_')}_{r}",
                *ov,
                *k,
            ]
    if not args.skip_pair and len(backends) == 2:
        variants["pair in one process"] = lambda r: [
            py,
            "-m",
            "unified_train",
            "-m",
            f"backend={','.join(backends)}",
            f"hydra.sweep.dir={out / f'pair_{r}'}",
            *ov,
        ]

    runs: dict[str, list[dict]] = {name: [] for name in variants}
    summaries: dict[str, dict] = {}
    for r, name in schedule(list(variants), args.repeats):
        runs[name].append(run(variants[name](r), out / f"{name.replace(' ', '_')}_{r}.log"))
        summary = out / f"{name.replace(' ', '_')}_{r}" / "summary.json"
        if name.startswith("unified") and summary.exists():  # token and FLOP counts per iteration
            summaries.setdefault(name.split()[1], json.loads(summary.read_text()))
        write_table(args.label, out, peak, runs, summaries)  # after every run: survives a cut-off session
    print(write_table(args.label, out, peak, runs, summaries))


def unified_name(backend: str, attention: str | None) -> str:
    return f"unified {backend}" + (f" {attention}" if attention else "")


def schedule(names: list[str], repeats: int) -> list[tuple[int, str]]:
    """(repeat, variant) in run order: forward, then backward, and so on, so a slow drift of the host
    (clocks, temperature, another tenant) weighs on every variant alike."""
    return [(r, name) for r in range(repeats) for name in (names if r % 2 == 0 else names[::-1])]


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if not r.get("failed") and r.get(key) is not None]
    return statistics.median(values) if values else None


def write_table(label: str, out: Path, peak: float, runs: dict[str, list[dict]], summaries: dict[str, dict]) -> str:
    """Medians over each variant's runs, then throughput, MFU and the ratios; write `<label>.md/.json`."""
    results: dict[str, dict] = {}
    for name, measured in runs.items():
        if not measured:
            continue
        steady = [m["steady_iter_s"] for m in measured if not m.get("failed") and m["steady_iter_s"]]
        r = results[name] = {key: _median(measured, key) for key in (*TIMINGS, "wall_s")}
        r.update(
            runs=len(measured),
            failed=sum(bool(m.get("failed")) for m in measured),
            steady_spread=(min(steady), max(steady)) if steady else None,
            tokens_per_s=None,
            tflops_per_gpu=None,
            mfu=None,
        )
        s = summaries.get(name.split()[1] if "pair" not in name else "mlm")
        if s is None or not r["steady_iter_s"]:
            continue
        r["tokens_per_s"] = s["tokens_per_iteration"] / r["steady_iter_s"]
        if "pair" not in name:
            r["tflops_per_gpu"] = s["flops_per_iteration"] / r["steady_iter_s"] / s["world_size"] / 1e12
            r["mfu"] = r["tflops_per_gpu"] / peak
    for name, u in results.items():
        n = results.get(f"native {name.split()[1]}") if name.startswith("unified") else None
        if u and n and u["steady_iter_s"] and n["steady_iter_s"]:
            u["throughput_vs_native"] = n["steady_iter_s"] / u["steady_iter_s"]
            u["first_iteration_vs_native"] = u["first_iteration_s"] / n["first_iteration_s"]
    pair, u_mlm, u_bridge = (results.get(k) for k in ("pair in one process", "unified mlm", "unified bridge"))
    if pair and u_mlm and u_bridge and pair["wall_s"] and u_mlm["wall_s"] and u_bridge["wall_s"]:
        pair["wall_vs_two_processes"] = pair["wall_s"] / (u_mlm["wall_s"] + u_bridge["wall_s"])

    def fmt(v, spec):
        return "" if v is None else format(v, spec)

    lines = [
        f"### {label} (bf16 matmul peak measured here: {peak:.0f} TFLOP/s; medians over the runs)",
        "",
        (
            "| variant | runs | steady s/it | (min-max) | tokens/s | TFLOP/s/GPU | MFU | to pretrain s "
            "| first iteration s | iteration 1 s | wall s | ratio |"
        ),
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        ratio = f"{r['failed']} FAILED (see the logs)" if r["failed"] else ""
        if "throughput_vs_native" in r:
            ratio = (
                f"throughput {r['throughput_vs_native']:.3f}x native, "
                f"first-iteration time {r['first_iteration_vs_native']:.2f}x native"
            )
        if "wall_vs_two_processes" in r:
            ratio = f"wall {r['wall_vs_two_processes']:.2f}x of two separate processes"
        spread = f"{r['steady_spread'][0]:.4f}-{r['steady_spread'][1]:.4f}" if r["steady_spread"] else ""
        lines.append(
            f"| {name} | {r['runs']} | {fmt(r['steady_iter_s'], '.4f')} | {spread} | "
            f"{fmt(r['tokens_per_s'], ',.0f')} | {fmt(r['tflops_per_gpu'], '.1f')} | {fmt(r['mfu'], '.1%')} | "
            f"{fmt(r['to_pretrain_s'], '.1f')} | {fmt(r['first_iteration_s'], '.1f')} | "
            f"{fmt(r['iteration_1_s'], '.2f')} | "
            f"{fmt(r['wall_s'], '.1f')} | {ratio} |"
        )
    text = "\n".join(lines + ["", run_to_run(out)])
    (out / f"{label}.md").write_text(text + "\n")
    (out / f"{label}.json").write_text(json.dumps({"peak_tflops": peak, "runs": runs, "results": results}, indent=2))
    return text


def run_to_run(out: Path) -> str:
    """Every unified_train run of a benchmark with one core attention trains the same config (both backends, the
    pairs too), so they must all agree bit for bit: a determinism check at no extra GPU cost."""
    from unified_train import rundir

    by_attention: dict[str, list] = {}
    for run in rundir.load_runs([str(out)]):
        if run.metrics:
            by_attention.setdefault(run.job.attention, []).append(run)
    return (
        "\n".join(_identical(out, attention, runs) for attention, runs in sorted(by_attention.items()))
        or "Run-to-run: no unified_train run finished, nothing to compare."
    )


def _identical(out: Path, attention: str, runs: list) -> str:
    from unified_train.results import compare

    label = "Run-to-run" + (f" ({attention} attention)" if attention else "")
    if len(runs) < 2:
        return f"{label}: fewer than two unified_train runs finished, nothing to compare."
    ref, differing = runs[0], []
    for run in runs[1:]:
        first = next(
            (
                a["iteration"]
                for a, b in zip(ref.metrics, run.metrics, strict=False)
                if any(a.get(k) != b.get(k) for k in compare.EXACT_KEYS)
            ),
            None,
        )
        if first is not None:
            differing.append(f"{Path(run.path).relative_to(out)} (from iteration {first})")
        elif len(run.metrics) != len(ref.metrics):
            differing.append(f"{Path(run.path).relative_to(out)} ({len(run.metrics)} of {len(ref.metrics)} iterations)")
    name = Path(ref.path).relative_to(out)
    if not differing:
        return (
            f"{label}: all {len(runs)} unified_train runs are bitwise identical to {name} "
            f"(lm loss, grad norm, lr at every iteration)."
        )
    return (
        f"{label}: {len(differing)} of {len(runs) - 1} unified_train runs differ from {name}: {', '.join(differing)}."
    )


if __name__ == "__main__":
    main()

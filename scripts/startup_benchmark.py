"""Start-up cost of the CLI paths that must stay light (`--help`, `--cfg job`, bad input) and of the
translation paths (`mode=parity`, `mode=export`), each in a fresh interpreter, median of N runs.

    python scripts/startup_benchmark.py [--repeat 5]

Also checks that the light paths import neither torch nor megatron (from `-X importtime`). Target: `--cfg job`
under 2 s.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

CASES = {
    "--help": ["--help"],
    "--cfg job": ["--cfg", "job"],
    "bad input (parallel.tp=3)": ["parallel.tp=3"],
    "mode=parity": ["mode=parity"],
    "mode=export": ["mode=export"],
}
LIGHT = ("--help", "--cfg job", "bad input (parallel.tp=3)")
HEAVY = re.compile(r"\|\s+(torch|megatron(\.\S+)?)\s*$", re.MULTILINE)


def once(args: list[str], cwd: str, importtime: bool = False) -> tuple[float, str]:
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "unified_train", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=dict(os.environ))
    return time.perf_counter() - start, proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--heavy-repeat", type=int, default=1, help="runs of the parity/export cases")
    args = parser.parse_args()
    cwd = tempfile.mkdtemp(prefix="startup_")  # nothing lands in the repo
    print("| command | median s | runs | imports torch/megatron |\n|---|---:|---:|---|")
    for name, argv in CASES.items():
        n = args.repeat if name in LIGHT else args.heavy_repeat
        times = [once(argv, cwd)[0] for _ in range(n)]
        heavy = bool(HEAVY.search(once(argv, cwd, importtime=True)[1])) if name in LIGHT else "yes (expected)"
        print(f"| `python -m unified_train {' '.join(argv)}` | {statistics.median(times):.2f} | {n} | {heavy} |")


if __name__ == "__main__":
    main()

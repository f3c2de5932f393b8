"""Record every garbage collection of one Python process (generation, start, seconds, objects freed) into a JSON
file at its exit. A diagnostic for start-up time: a full (generation-2) collection re-scans the whole heap, and
with torch, megatron and Hydra imported that takes the better part of a second.

    python scripts/gc_trace.py OUT.json [--no-freeze] -m unified_train backend=mlm ...
    python scripts/gc_trace.py OUT.json scripts/native_baseline.py mlm ...

Times are seconds since this wrapper started, which is within a few milliseconds of the process start, so they
line up with scripts/benchmark.py's stamped logs. `--no-freeze` makes `gc.freeze` a no-op in the traced program,
to measure it without unified_train's heap freeze (runtime.job.run_job). This imports nothing heavy itself.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import runpy
import sys
import time


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    started = time.perf_counter()
    out, program = sys.argv[1], sys.argv[2:]
    if program[0] == "--no-freeze":
        program = program[1:]
        gc.freeze = gc.unfreeze = lambda: None
    collections: list[list] = []
    current: dict[str, float] = {}

    def on_collection(phase: str, info: dict) -> None:
        now = time.perf_counter() - started
        if phase == "start":
            current["start"] = now
        else:
            start = current.get("start", now)
            collections.append([info["generation"], round(start, 4), round(now - start, 4), info["collected"]])

    def write() -> None:
        with open(out, "w") as f:
            json.dump(
                {
                    "collections": collections,
                    "frozen_at_exit": gc.get_freeze_count(),
                    "exit_s": round(time.perf_counter() - started, 4),
                },
                f,
            )

    gc.callbacks.append(on_collection)
    atexit.register(write)
    if program[0] == "-m":
        sys.argv = [program[1], *program[2:]]
        sys.path.insert(0, os.getcwd())
        runpy.run_module(program[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = program
        sys.path.insert(0, os.path.dirname(os.path.abspath(program[0])))
        runpy.run_path(program[0], run_name="__main__")


if __name__ == "__main__":
    main()

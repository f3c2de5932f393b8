"""Backend adapters. Both implement the same interface; all knowledge of one stack lives in its module.

    name: str
    native_config(cfg, run_dir) -> native   pure, CPU-only, no process group
    describe(native) -> dict[str, object]   flat, comparable fields for the parity diff
    export(native) -> list[str]             the equivalent upstream command line
    train(native, sink) -> None             the real loop, in-process, feeding `sink` per iteration
    teardown() -> None                      leave no global state behind

Modules are imported lazily so `backend=mlm` never imports megatron.bridge.
"""

from __future__ import annotations

import importlib

NAMES = ("mlm", "bridge")


def get(name: str):
    if name not in NAMES:
        raise KeyError(name)
    return importlib.import_module(f"unified_train.backends.{name}")

"""Backend adapters: one per stack, behind one typed interface. All knowledge of a stack lives in its room.

Adapters are handed everything they need (the config, the job's identity, the metrics sink) and import nothing
from runtime/, modes/ or results/. Their modules are imported lazily, so `backend=mlm` never imports
megatron.bridge and importing this package imports no stack.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from unified_train.config import BACKEND_NAMES as NAMES
from unified_train.rundir import JobIdentity

__all__ = ["NAMES", "Backend", "MetricsSink", "get"]


class MetricsSink(Protocol):
    """What an adapter feeds while its stack trains (results.metrics.MetricsSink)."""

    def set_flops_per_iteration(self, flops: float) -> None: ...
    def training_started(self) -> None: ...
    def record_train(self, iteration: int, loss, grad_norm, lr, seconds: float) -> None: ...
    def record_eval(self, kind: str, loss: float) -> None: ...


class Backend(Protocol):
    name: str

    def native_config(self, cfg, job: JobIdentity) -> Any:
        """The stack's own configuration of this job: pure, CPU-only, no process group."""

    def describe(self, native) -> dict[str, object]:
        """Flat, comparable `section.field` values for the parity diff."""

    def export(self, native) -> list[str]:
        """The equivalent upstream command line."""

    def export_code(self, native) -> list[str]:
        """Python statements the upstream script needs besides its command line (what no flag can carry)."""

    def write_native(self, native, directory: str) -> None:
        """The native config and upstream command, as files in `directory`."""

    def train(self, native, sink: MetricsSink) -> None:
        """The stack's real loop, in this process, feeding `sink` every iteration."""

    def teardown(self) -> None:
        """Leave no global state behind (the world process group is kept)."""


def get(name: str) -> Backend:
    if name not in NAMES:
        raise KeyError(name)
    return importlib.import_module(f"unified_train.backends.{name}").ADAPTER

"""Shared set-up for the unified_train test suite.

CPU tests run in one pytest process so megatron (~20 s to import) is imported once; tests that must observe a
fresh interpreter (import side effects, exit codes) start their own subprocess (see ut_helpers.py).
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (tests/gpu/); skipped when none is visible")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and not _cuda_available():
        skip = pytest.mark.skip(reason="no CUDA GPU visible")
        for item in gpu_items:
            item.add_marker(skip)

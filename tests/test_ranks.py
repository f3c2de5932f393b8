"""The multi-rank launch path on CPU: ranks start from the composed config, rendezvous and report."""

from __future__ import annotations

import json

from ut_helpers import compose

from unified_train import ranks


def test_two_ranks_start_rendezvous_and_all_reduce(tmp_path):
    cfg = compose(["parallel.dp=2"])
    ranks.spawn(cfg, str(tmp_path), world_size=2, entry=ranks.rendezvous_probe)
    reports = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(2)]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    assert all(r["world_size"] == 2 and r["all_reduce_ok"] for r in reports)
    assert sorted(r["local_rank"] for r in reports) == [0, 1]

"""The multi-rank launch path on CPU: ranks start from the composed config, rendezvous and report."""

from __future__ import annotations

import json

from ut_helpers import compose

from unified_train.runtime import ranks


def test_two_ranks_start_rendezvous_and_all_reduce(tmp_path):
    cfg = compose(["parallel.dp=2"])
    ranks.spawn(cfg, 2, ranks.rendezvous_probe, str(tmp_path))
    reports = [json.loads((tmp_path / "preflight" / f"rank_{r}.json").read_text()) for r in range(2)]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    assert all(r["world_size"] == 2 and r["all_reduce_ok"] for r in reports)
    assert sorted(r["local_rank"] for r in reports) == [0, 1]


def _dataloader_in_spawned_child(queue):
    import multiprocessing as mp

    import torch

    from unified_train.runtime import ranks

    inherited = mp.get_start_method()
    ranks.as_fresh_interpreter()

    def worker_init_fn(_):  # a local function, like MLM's own: only a forked worker can receive it
        pass

    loader = torch.utils.data.DataLoader(list(range(4)), num_workers=1, worker_init_fn=worker_init_fn)
    queue.put((inherited, mp.get_start_method(), [int(x) for x in loader]))


def test_spawned_ranks_and_isolated_jobs_start_dataloader_workers_like_a_fresh_interpreter():
    """Spawned ranks and launch.isolation=process workers are spawn children, whose default start method is
    spawn; MLM's DataLoader workers (a local worker_init_fn) only start once the default is restored."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_dataloader_in_spawned_child, args=(queue,))
    child.start()
    inherited, restored, batches = queue.get(timeout=120)
    child.join(timeout=60)
    assert (inherited, restored, batches) == ("spawn", "fork", [0, 1, 2, 3])

"""`mode=preflight`: before burning GPU hours, check the allocation, the rendezvous and the config on every rank.

Each rank builds both native configs and runs the parity diff, joins the world process group (NCCL with GPUs,
gloo without), all-reduces, and writes `preflight/rank_<r>.json` (rank, world size, host, device, all-reduce,
parity). Then one summary per job, `preflight/summary.json`. No training. Works in-process (one rank), with
ranks spawned from the config, and under an existing launcher (torchrun, Slurm), which sets the rank variables.
"""

from __future__ import annotations

import glob
import json
import os

from omegaconf import OmegaConf


def rank_main(cfg_yaml: str, run_dir: str) -> None:
    """One rank's checks; the parity diff runs before any process-group work."""
    from unified_train import parity, plan, ranks

    cfg = OmegaConf.create(cfg_yaml)
    both = parity.describe_both(cfg, world_size=plan.world_size(cfg))
    rows = parity.diff(both["mlm"], both["bridge"])
    out = os.path.join(run_dir, "preflight")
    ranks.rendezvous_probe(cfg_yaml, out, extra={"parity_fields": len(both["mlm"]),
                                                 "parity_differences": [r[0] for r in rows]})


def summarize(run_dir: str, expected_world: int) -> dict:
    reports = []
    for path in sorted(glob.glob(os.path.join(run_dir, "preflight", "rank_*.json"))):
        with open(path) as f:
            reports.append(json.load(f))
    ranks_seen = sorted(r["rank"] for r in reports)
    summary = {
        "world_size": expected_world,
        "ranks_reported": ranks_seen,
        "hosts": sorted({r["host"] for r in reports}),
        "devices": sorted({r["device"] for r in reports}),
        "all_reduce_ok": bool(reports) and all(r["all_reduce_ok"] for r in reports),
        "parity_clean": bool(reports) and all(not r["parity_differences"] for r in reports),
    }
    summary["ok"] = (ranks_seen == list(range(expected_world)) and summary["all_reduce_ok"]
                     and summary["parity_clean"])
    with open(os.path.join(run_dir, "preflight", "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def run(cfg, run_dir: str) -> int:
    """Run the checks on every rank of the job; returns the exit status (0 when everything is right)."""
    from unified_train import launch, plan, ranks

    world = plan.world_size(cfg)
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    if "RANK" in os.environ:  # one rank of a launcher's job (torchrun, Slurm): check this rank
        rank_main(cfg_yaml, run_dir)
        if int(os.environ["RANK"]) != 0:  # every rank has reported (probe's barrier): rank 0 sums up
            return 0
    elif world > 1:
        ranks.spawn(cfg, run_dir, world, entry=rank_main)
    else:
        with _single_rank_env():
            rank_main(cfg_yaml, run_dir)
    launch.write_run_json(cfg, run_dir)  # after the rendezvous: no rank is still checking the run directory
    summary = summarize(run_dir, world)
    print(f"preflight: {'OK' if summary['ok'] else 'FAILED'}: ranks {summary['ranks_reported']} of world "
          f"{world}, all-reduce {'ok' if summary['all_reduce_ok'] else 'FAILED'}, parity "
          f"{'clean' if summary['parity_clean'] else 'DIFFERS'}, hosts {summary['hosts']}, "
          f"devices {summary['devices']}")
    return 0 if summary["ok"] else 1


class _single_rank_env:
    """The rank variables for a one-rank group in this process (restored afterwards)."""

    def __enter__(self):
        from unified_train.ranks import RANK_VARIABLES, free_port

        port = free_port()
        self.saved = {k: os.environ.get(k) for k in RANK_VARIABLES}
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

    def __exit__(self, *exc):
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

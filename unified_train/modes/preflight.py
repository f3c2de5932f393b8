"""`mode=preflight`: before burning GPU hours, check the allocation, the rendezvous and the config on every rank.

Each rank builds both native configs and runs the parity diff, joins the world process group (NCCL with GPUs,
gloo without), all-reduces, and writes its report into the run directory (rank, world size, host, device,
all-reduce, parity). Then one summary per job. No training. Works in-process (one rank), with ranks spawned from
the config, and under an existing launcher (torchrun, Slurm), which sets the rank variables.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from unified_train import rundir
from unified_train.modes import parity
from unified_train.runtime import ranks


def rank_main(cfg_yaml: str, identity: dict) -> None:
    """One rank's checks; the parity diff runs before any process-group work."""
    cfg = OmegaConf.create(cfg_yaml)
    job = rundir.JobIdentity(**identity)
    both = parity.describe_both(cfg, job)
    rows = parity.diff(both[parity.LEFT], both[parity.RIGHT])
    ranks.rendezvous_probe(
        cfg_yaml,
        job.run_dir,
        extra={"parity_fields": len(both[parity.LEFT]), "parity_differences": [r[0] for r in rows]},
    )


def summarize(run_dir: str, expected_world: int) -> dict:
    reports = rundir.read_rank_reports(run_dir)
    ranks_seen = sorted(r["rank"] for r in reports)
    summary = {
        "world_size": expected_world,
        "ranks_reported": ranks_seen,
        "hosts": sorted({r["host"] for r in reports}),
        "devices": sorted({r["device"] for r in reports}),
        "all_reduce_ok": bool(reports) and all(r["all_reduce_ok"] for r in reports),
        "parity_clean": bool(reports) and all(not r["parity_differences"] for r in reports),
        "parity_differences": sorted({field for r in reports for field in r["parity_differences"]}),
    }
    summary["ok"] = ranks_seen == list(range(expected_world)) and summary["all_reduce_ok"] and summary["parity_clean"]
    rundir.write_preflight_summary(run_dir, summary)
    return summary


def run(cfg, job: rundir.JobIdentity) -> int:
    """Run the checks on every rank of the job; returns the exit status (0 when everything is right)."""
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    identity = job.handover()
    if ranks.launched_as_rank():  # one rank of a launcher's job (torchrun, Slurm): check this rank
        rank_main(cfg_yaml, identity)
        if ranks.rank() != 0:  # every rank has reported (probe's barrier): rank 0 sums up
            return 0
    elif job.world_size > 1:
        ranks.spawn(cfg, job.world_size, rank_main, identity)
    else:
        with ranks.single_rank():
            rank_main(cfg_yaml, identity)
    rundir.write_job_record(cfg, job)  # after the rendezvous: no rank is still checking the run directory
    summary = summarize(job.run_dir, job.world_size)
    differing = ", ".join(summary["parity_differences"])
    print(
        f"preflight: {'OK' if summary['ok'] else 'FAILED'}: ranks {summary['ranks_reported']} of world "
        f"{job.world_size}, all-reduce {'ok' if summary['all_reduce_ok'] else 'FAILED'}, parity "
        f"{'clean' if summary['parity_clean'] else f'DIFFERS in {differing}'}, hosts {summary['hosts']}, "
        f"devices {summary['devices']}"
    )
    return 0 if summary["ok"] else 1

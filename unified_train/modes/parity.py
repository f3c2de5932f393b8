"""`mode=parity`: build both native configs from one unified config and compare them field by field.

Compared: the transformer config each stack builds, GPT-level model fields (padded vocab, position table),
the optimizer config, the learning rate and weight decay each stack's scheduler yields at every iteration,
the DDP config, the dataset config, training shape and the RNG seeds.
"""

from __future__ import annotations

import dataclasses

from unified_train import backends, rundir
from unified_train.runtime.env import job_environment

LEFT, RIGHT = backends.NAMES


def diff(left: dict, right: dict) -> list[tuple[str, object, object]]:
    rows = []
    for key in sorted(set(left) | set(right)):
        a, b = left.get(key, "<absent>"), right.get(key, "<absent>")
        if a != b:
            rows.append((key, a, b))
    return rows


def natives(cfg, job: rundir.JobIdentity) -> dict[str, tuple[backends.Backend, object]]:
    """Both stacks' native configs of one job, built under the job's process environment."""
    out = {}
    with job_environment(cfg):
        for name in backends.NAMES:
            backend = backends.get(name)
            out[name] = backend, backend.native_config(cfg, dataclasses.replace(job, backend=name))
    return out


def describe_both(cfg, job: rundir.JobIdentity) -> dict[str, dict]:
    return {name: backend.describe(native) for name, (backend, native) in natives(cfg, job).items()}


def table(rows, left: str = LEFT, right: str = RIGHT) -> str:
    width = max([len(r[0]) for r in rows] + [5])
    lines = [f"{'field':<{width}}  {left:<28}  {right}", "-" * (width + 60)]
    lines += [f"{k:<{width}}  {str(a):<28}  {b}" for k, a, b in rows]
    return "\n".join(lines)


def main(cfg, job: rundir.JobIdentity) -> int:
    """Print the differing fields; exit status 1 if there are any."""
    both = describe_both(cfg, job)
    rows = diff(both[LEFT], both[RIGHT])
    compared = len(set(both[LEFT]) | set(both[RIGHT]))
    if cfg.backend.extra:
        print(f"note: backend.extra={list(cfg.backend.extra)} is applied on the {cfg.backend.name} side only")
    if rows:
        print(table(rows))
        print(f"\nparity: {len(rows)} of {compared} fields differ")
        return 1
    print(
        f"parity: all {compared} compared fields are identical (model {cfg.model.name}, "
        f"tp={cfg.parallel.tp} pp={cfg.parallel.pp} world={job.world_size})"
    )
    return 0

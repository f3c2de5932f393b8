"""The parity diff: build both native configs from one unified config and compare them field by field.

Compared: the transformer config each stack builds, GPT-level model fields (padded vocab, position table),
the optimizer config, the learning rate and weight decay each stack's scheduler yields at every iteration,
the DDP config, the dataset config, training shape and the RNG seeds.
"""

from __future__ import annotations

import sys

from unified_train import backends, plan


def diff(left: dict, right: dict) -> list[tuple[str, object, object]]:
    rows = []
    for key in sorted(set(left) | set(right)):
        a, b = left.get(key, "<absent>"), right.get(key, "<absent>")
        if a != b:
            rows.append((key, a, b))
    return rows


def describe_both(cfg, world_size: int | None = None) -> dict[str, dict]:
    from unified_train.launch import job_environment

    world_size = world_size or plan.world_size(cfg)
    out = {}
    with job_environment(cfg):
        for name in backends.NAMES:
            backend = backends.get(name)
            out[name] = backend.describe(backend.native_config(cfg, None, world_size=world_size))
    return out


def table(rows, left: str = "mlm", right: str = "bridge") -> str:
    width = max([len(r[0]) for r in rows] + [5])
    lines = [f"{'field':<{width}}  {left:<28}  {right}", "-" * (width + 60)]
    lines += [f"{k:<{width}}  {str(a):<28}  {b}" for k, a, b in rows]
    return "\n".join(lines)


def main(cfg) -> int:
    """Print the differing fields; exit status 1 if there are any."""
    both = describe_both(cfg)
    rows = diff(both["mlm"], both["bridge"])
    compared = len(set(both["mlm"]) | set(both["bridge"]))
    if cfg.backend.extra:
        print(f"note: backend.extra={list(cfg.backend.extra)} is applied on the {cfg.backend.name} side only")
    if rows:
        print(table(rows))
        print(f"\nparity: {len(rows)} of {compared} fields differ")
        return 1
    print(f"parity: all {compared} compared fields are identical (model {cfg.model.name}, "
          f"tp={cfg.parallel.tp} pp={cfg.parallel.pp} world={plan.world_size(cfg)})")
    return 0


if __name__ == "__main__":
    sys.exit("use: python -m unified_train mode=parity [overrides]")

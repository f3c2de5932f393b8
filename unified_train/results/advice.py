"""The parts of a configuration that are not bitwise repeatable run to run, and the setting that removes each: the one
table the comparison's advice comes from (results/compare.py appends it when a backend's repeats differ).

Each entry reads the run's resolved unified config (and the core attention its run.json records) and says, in the
config's own keys, whether the part is present. Measured on an H200 (../shared/megatron-notes.md, docs/attention.md):
MoE token dispatch differs at iteration 1 between two runs of one config and is bitwise under determinism=strict;
SDPA's cuDNN, flash and efficient backward kernels are not repeatable even under torch's deterministic algorithms,
flex_attention's backward is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import OmegaConf

STRICT = "determinism=strict"


@dataclass(frozen=True)
class Part:
    name: str
    present: Callable[[object, str, int], str | None]  # (cfg, attention, world size) -> the config's words, or None
    fix: str


def _strict(cfg) -> bool:
    return bool(cfg.determinism.deterministic_mode)


def _data_parallel(cfg, world_size: int) -> int:
    p = cfg.parallel
    return max(1, world_size // (p.tp * p.pp * p.cp))


PARTS = (
    Part(
        "MoE token dispatch",
        lambda cfg, attention, world: (
            f"model.num_experts={cfg.model.num_experts}"
            if cfg.model.num_experts is not None and not _strict(cfg)
            else None
        ),
        f"{STRICT} (bitwise on an H200 for both stacks; it also turns the fused cross entropy off)",
    ),
    Part(
        "SDPA attention backward (cuDNN, flash)",
        lambda cfg, attention, world: "kernels.attention=sdpa" if attention == "sdpa" else None,
        "kernels.attention=flex (bitwise-repeatable backward, measured on an H200) or kernels.attention=local",
    ),
    Part(
        "Transformer Engine attention backward",
        lambda cfg, attention, world: "kernels.attention=te" if attention == "te" and not _strict(cfg) else None,
        f"{STRICT} (NVTE_ALLOW_NONDETERMINISTIC_ALGO=0), or kernels.attention=flex",
    ),
    Part(
        "data-parallel gradient reduction order",
        lambda cfg, attention, world: (
            f"data-parallel size {_data_parallel(cfg, world)}"
            if _data_parallel(cfg, world) > 1 and not _strict(cfg)
            else None
        ),
        f"{STRICT} (NCCL_ALGO=Ring)",
    ),
    Part(
        "tensor-parallel all-reduce order",
        lambda cfg, attention, world: (
            f"parallel.tp={cfg.parallel.tp}" if cfg.parallel.tp > 1 and not _strict(cfg) else None
        ),
        f"{STRICT} (NCCL_ALGO=Ring)",
    ),
    Part(
        "fused cross entropy",
        lambda cfg, attention, world: (
            "kernels.cross_entropy_loss_fusion=true"
            if cfg.kernels.cross_entropy_loss_fusion and not _strict(cfg)
            else None
        ),
        f"{STRICT} (turns it off: both stacks refuse it under deterministic mode)",
    ),
)


def present(cfg, attention: str, world_size: int) -> list[tuple[Part, str]]:
    """The parts this config (a run's unified config, or its plain data) has, each with the config's own words."""
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    found = ((part, part.present(cfg, attention, world_size)) for part in PARTS)
    return [(part, words) for part, words in found if words]


def lines(cfg, attention: str, world_size: int) -> list[str]:
    """Markdown lines: each nondeterministic part present and its fix, or what is left when none is."""
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    found = present(cfg, attention, world_size)
    if not found:
        fix = "" if _strict(cfg) else f"; {STRICT} pins the remaining kernels (cuBLAS workspace, NCCL algorithm)"
        return [f"- none of the known nondeterministic parts is in this config{fix}"]
    return [f"- {part.name} ({words}): {part.fix}" for part, words in found]

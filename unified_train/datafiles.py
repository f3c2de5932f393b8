"""Megatron .bin/.idx data, checked before any job starts and without importing torch or megatron: the files
exist, and every split that samples are drawn from gets some of their sequences.

A split whose share rounds to no sequence at all is not an error to MCore: its sample-index builder adds empty
epochs until the requested samples are covered, and never returns (the default split 9999,8,2 does this to the
validation split of a prefix of a few hundred sequences). Both stacks would hang there, on the GPU.
"""

from __future__ import annotations

import os
import re
import struct

_IDX_MAGIC = b"MMIDIDX\x00\x00"  # megatron.core.datasets.indexed_dataset._INDEX_HEADER
_SPLITS = ("train", "validation", "test")


def blend_list(data_path) -> list[str]:
    """`data.data_path` ("prefix" or "weight prefix" entries) as the flat list both stacks take: MLM's
    --data-path tokens, and what Bridge's blend is built from (megatron.core's get_blend_from_list)."""
    return [t for entry in data_path for t in entry.split()]


def prefixes(data_path) -> list[str]:
    """The dataset prefixes of `data.data_path`, read the way get_blend_from_list reads the flat list."""
    tokens = blend_list(data_path)
    if len(tokens) % 2 == 0:
        try:
            [float(w) for w in tokens[0::2]]
            return tokens[1::2]
        except ValueError:
            pass
    return tokens


def sequence_count(prefix: str) -> int:
    """The number of sequences in `prefix.idx` (the unit MCore splits GPT data by), from its header."""
    with open(prefix + ".idx", "rb") as f:
        header = f.read(len(_IDX_MAGIC) + 8 + 1 + 8)  # magic, version, dtype code, sequence count
    if len(header) < len(_IDX_MAGIC) + 17 or not header.startswith(_IDX_MAGIC):
        raise ValueError(f"{prefix}.idx is not a Megatron index file")
    return struct.unpack("<Q", header[-8:])[0]


def split_shares(split: str) -> list[float] | None:
    """The train, validation and test shares of `split` ("99,1,0"), normalised as MCore's
    parse_and_normalize_split does; None when it gives no usable shares."""
    try:
        shares = [float(x) for x in re.findall(r"[.0-9]+", split)]
    except ValueError:
        return None
    if not 0 < len(shares) <= len(_SPLITS) or sum(shares) <= 0:
        return None
    shares += [0.0] * (len(_SPLITS) - len(shares))
    return [share / sum(shares) for share in shares]


def problems(cfg) -> list[str]:
    d = cfg.data
    if d.type != "indexed" or not d.data_path:
        return []
    shares = split_shares(d.split)
    if shares is None:
        return [
            (
                f"data.split={d.split}: give up to three non-negative shares of train,validation,test, e.g. "
                "data.split='90,5,5'"
            )
        ]
    bounds = [(sum(shares[:i]), sum(shares[: i + 1])) for i in range(len(shares))]  # MCore's split matrix
    drawn_from = (True, cfg.validation.eval_iters > 0, cfg.validation.eval_iters > 0)
    out = []
    for prefix in prefixes(d.data_path):
        missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
        if missing:
            out.append(
                f"data.data_path: {missing[0]} not found: give the prefixes of .bin/.idx pairs, without the extension"
            )
            continue
        try:
            n = sequence_count(prefix)
        except ValueError as exc:
            out.append(f"data.data_path: {exc}")
            continue
        # MCore's own rounding of the split bounds (BlendedMegatronDatasetBuilder).
        empty = [
            name
            for name, (begin, end), needed in zip(_SPLITS, bounds, drawn_from, strict=True)
            if needed and end > begin and round(end * n) == round(begin * n)
        ]
        if empty:
            fix = " or set validation.eval_iters=0" if "train" not in empty else ""
            out.append(
                f"data.split={d.split}: the {' and '.join(empty)} split gets none of the {n} sequences of "
                f"{prefix}, and MCore would wait for ever for its samples: raise its share, e.g. "
                f"data.split='90,5,5'{fix}"
            )
    return out

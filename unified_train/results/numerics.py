"""Where a mode=numerics pair parts: the first module whose forward output differs and the first parameter whose
gradient differs, read from both jobs' numerics files (written by backends/numerics.py).

Records are matched by (rank, model chunk, name, micro-batch, call) and judged by their sha256 (bitwise); the size of
a difference is the relative difference of the two float64 norms, |a - b| / |a| with MLM as `a`. Orders:
- forward: micro-batch by micro-batch, model chunk, pipeline stage, then the order the modules finished (a module
  finishes after its children, so the first differing output is the innermost module where the difference
  appears, and every output before it was bitwise equal);
- backward: last chunk and stage first, then the order the recorder wrote the gradients (the reverse of the
  order the modules' forward finished: the order backward produces them).
Once a forward output differs, every gradient downstream of it differs too; the first differing gradient says
something of its own only when the forward was equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from unified_train import rundir

TABLE_ROWS = 8  # differing modules listed per pair


def _key(record: dict) -> tuple:
    return (
        record["kind"],
        record["rank"],
        record["chunk"],
        record["name"],
        record.get("microbatch"),
        record.get("call"),
    )


def _forward_order(indexed: tuple[int, dict]) -> tuple:
    i, r = indexed
    return (r["microbatch"], r["chunk"], r["pp_rank"], r["rank"], i)


def _backward_order(indexed: tuple[int, dict]) -> tuple:
    i, r = indexed
    return (-r["chunk"], -r["pp_rank"], r["rank"], i)


@dataclass
class Difference:
    ref: dict
    cand: dict

    @property
    def name(self) -> str:
        return self.ref["name"]

    @property
    def relative(self) -> float | None:
        """|norm a - norm b| / |norm a| (None where a norm is missing or not finite)."""
        a, b = self.ref.get("norm"), self.cand.get("norm")
        if not isinstance(a, float) or not isinstance(b, float):
            return None
        return abs(a - b) / abs(a) if a else (0.0 if b == 0 else float("inf"))

    def where(self) -> str:
        r = self.ref
        out = f"rank {r['rank']}"
        if r.get("microbatch") is not None:
            out = f"micro-batch {r['microbatch']}, {out}"
        return out


def _differs(a: dict, b: dict) -> bool:
    return any(a.get(k) != b.get(k) for k in ("sha256", "shape", "dtype"))


@dataclass
class Localisation:
    outputs: int = 0  # compared on both sides
    grads: int = 0
    output_differences: list[Difference] = field(default_factory=list)  # forward order
    grad_differences: list[Difference] = field(default_factory=list)  # backward order
    last_equal_output: str | None = None  # the output just before the first differing one, in forward order
    only_ref: list[str] = field(default_factory=list)  # names recorded by one side only
    only_cand: list[str] = field(default_factory=list)

    @property
    def first_output(self) -> Difference | None:
        return self.output_differences[0] if self.output_differences else None

    @property
    def first_grad(self) -> Difference | None:
        return self.grad_differences[0] if self.grad_differences else None

    @property
    def equal(self) -> bool:
        return not (self.output_differences or self.grad_differences or self.only_ref or self.only_cand)


def localise(ref: list[dict], cand: list[dict]) -> Localisation:
    """Compare two jobs' records (rundir.read_numerics), reference (MLM) first."""
    theirs = {_key(r): r for r in cand}
    ours = {_key(r): r for r in ref}
    out = Localisation(
        only_ref=sorted({k[3] for k in ours.keys() - theirs.keys()}),
        only_cand=sorted({k[3] for k in theirs.keys() - ours.keys()}),
    )
    previous = None
    for r, other in _matched(ref, theirs, "output", _forward_order):
        out.outputs += 1
        if _differs(r, other):
            if not out.output_differences:
                out.last_equal_output = previous
            out.output_differences.append(Difference(r, other))
        previous = r["name"]
    for r, other in _matched(ref, theirs, "grad", _backward_order):
        out.grads += 1
        if _differs(r, other):
            out.grad_differences.append(Difference(r, other))
    return out


def _matched(ref: list[dict], theirs: dict, kind: str, order):
    """The reference's records of `kind` in `order`, each with the other side's record of the same key."""
    for _, r in sorted(((i, r) for i, r in enumerate(ref) if r["kind"] == kind), key=order):
        other = theirs.get(_key(r))
        if other is not None:
            yield r, other


def _relative(d: Difference) -> str:
    rel = d.relative
    if rel is None:
        return f"norms {d.ref.get('norm')} vs {d.cand.get('norm')}"
    if rel == 0:
        return "relative norm difference 0 (equal norms, different bits)"
    return f"relative norm difference {rel:.3e}"


def _shape_note(d: Difference) -> str:
    a, b = d.ref, d.cand
    if (a.get("shape"), a.get("dtype")) == (b.get("shape"), b.get("dtype")):
        return ""
    return f"; shape/dtype {a.get('shape')} {a.get('dtype')} vs {b.get('shape')} {b.get('dtype')}"


def section(ref_dir: str, cand_dir: str, ref_label: str = "mlm", cand_label: str = "bridge") -> list[str]:
    """The markdown lines compare.report adds for a pair of mode=numerics jobs."""
    out = ["### where the numerics part (mode=numerics: iteration 1, every module output and gradient)", ""]
    ref, cand = rundir.read_numerics(ref_dir), rundir.read_numerics(cand_dir)
    missing = [label for label, records in ((ref_label, ref), (cand_label, cand)) if not records]
    if missing:
        return [*out, f"- no {rundir.NUMERICS} from {', '.join(missing)}: nothing to localise", ""]
    found = localise(ref, cand)
    if found.equal:
        return [
            *out,
            f"- every module output ({found.outputs}) and every gradient ({found.grads}) of iteration 1 is bitwise "
            "equal",
            "",
        ]
    first = found.first_output
    if first is None:
        out.append(f"- forward: all {found.outputs} module outputs are bitwise equal")
    else:
        after = (
            f"; every output before it is equal (last: `{found.last_equal_output}`)" if found.last_equal_output else ""
        )
        out.append(
            f"- forward: first differing module output `{first.name}` ({first.where()}), {_relative(first)}"
            f"{_shape_note(first)}{after}"
        )
    grad = found.first_grad
    if grad is None:
        out.append(f"- backward: all {found.grads} gradients are bitwise equal")
    else:
        note = " (downstream of the forward difference)" if first is not None else ""
        out.append(
            f"- backward: first differing gradient, in the order backward produces them, `{grad.name}` "
            f"({grad.where()}), {_relative(grad)}{_shape_note(grad)}{note}"
        )
    out.append(
        f"- {len(found.output_differences)} of {found.outputs} module outputs and {len(found.grad_differences)} of "
        f"{found.grads} gradients differ"
    )
    for label, names in ((ref_label, found.only_ref), (cand_label, found.only_cand)):
        if names:
            shown = ", ".join(f"`{n}`" for n in names[:6])
            out.append(f"- recorded by {label} only ({len(names)}): {shown}{' ...' if len(names) > 6 else ''}")
    if found.output_differences:
        out += [
            "",
            f"| # | module | where | {ref_label} norm | {cand_label} norm | relative difference |",
            "|---:|---|---|---:|---:|---:|",
        ]
        for i, d in enumerate(found.output_differences[:TABLE_ROWS], 1):
            rel = d.relative
            out.append(
                f"| {i} | `{d.name}` | {d.where()} | {d.ref.get('norm')} | {d.cand.get('norm')} | "
                f"{'' if rel is None else f'{rel:.3e}'} |"
            )
    return [*out, ""]

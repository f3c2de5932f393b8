#!/usr/bin/env python3
"""Build an offline wheelhouse for an air-gapped GPU node whose image already has torch.

The requirement set is this project's lock (`uv export --frozen --no-hashes --no-dev --no-emit-project`).
From it we drop what the node already has (`--have`, pip-freeze style) and what the GPU pretraining path
never imports (the default exclude list below, plus `--exclude`), download the rest as wheels for the
node's platform with `pip download --no-deps --only-binary=:all:`, build the sdist-only ones with
`pip wheel --no-deps`, build this project's own wheel, and print a size table checked against a budget.

Install on the node (no network there):

    python3 -m pip install --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site

Run it with a Python >= 3.11 that has pip (the project's uv venv has none). Names, versions, specifiers and
environment markers are handled by `packaging`; where that is not installed, the copy that pip vendors
(`pip._vendor.packaging`) is used.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

try:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
    from packaging.version import InvalidVersion, Version
except ImportError:
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
    from pip._vendor.packaging.specifiers import InvalidSpecifier, SpecifierSet
    from pip._vendor.packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
    from pip._vendor.packaging.version import InvalidVersion, Version

SCRIPT_DIR = Path(__file__).resolve().parent
REPO_ROOT = SCRIPT_DIR.parent
MIB = 1024 * 1024

# manylinux_2_39 is last so that pip prefers the older-glibc build when a project ships both; it is there
# for nvidia-resiliency-ext 0.6.0, which has only a 2_39 wheel (the GPU node has glibc 2.39).
DEFAULT_PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
    "manylinux_2_39_x86_64",
]

# Locked packages that the GPU pretraining path (MLM and Bridge loops, local layer spec, no TE) never
# imports, or that the node's torch already brings. fnmatch patterns on normalized names -> one-line reason.
DEFAULT_EXCLUDES: dict[str, str] = {
    # The node's own torch build and what comes with it. Shipping any of these would shadow it.
    "torch": "the node's CUDA build (2.11.0+cu130); a PyPI copy on PYTHONPATH would shadow it",
    "triton": "ships with the node's torch",
    "nvidia-cu*": "CUDA runtime/library wheels (cublas, cudnn, cufft, ...) that come with the node's torch",
    "nvidia-nccl-*": "NCCL wheel that comes with the node's torch",
    "nvidia-nvjitlink*": "CUDA wheel that comes with the node's torch",
    "nvidia-nvshmem-*": "NVSHMEM wheel that comes with the node's torch",
    "nvidia-nvtx*": "NVTX wheel that comes with the node's torch",
    "cuda-toolkit": "CUDA metapackage of the node's torch",
    "cuda-bindings": "CUDA Python bindings, part of the node's image",
    "cuda-pathfinder": "CUDA Python helper, part of the node's image",
    # megatron-energon and its chain: unified_train.compat stubs `megatron.energon` when it is absent.
    "megatron-energon": "multimodal data loader; unified_train.compat stubs it when absent",
    "multi-storage-client": "energon dep: 8.6 MiB wheel with a 17 MiB Rust .so",
    "s3fs": "energon dep (S3 filesystem)",
    "aiobotocore": "energon/s3fs dep (AWS SDK)",
    "aioitertools": "energon/s3fs dep (aiobotocore)",
    "botocore": "energon/s3fs dep (AWS SDK, ~13 MiB)",
    "jmespath": "energon/MSC dep (botocore)",
    "webdataset": "energon dep (tar-shard datasets)",
    "braceexpand": "energon dep (webdataset)",
    "mfusepy": "energon dep (FUSE)",
    "filetype": "energon dep",
    "rapidyaml": "energon dep",
    "deprecation": "energon dep (rapidyaml)",
    "jsonschema": "multi-storage-client dep",
    "jsonschema-specifications": "multi-storage-client dep (jsonschema)",
    "referencing": "multi-storage-client dep (jsonschema)",
    "rpds-py": "multi-storage-client dep (jsonschema)",
    "lark": "multi-storage-client dep",
    "prettytable": "multi-storage-client dep",
    "wcwidth": "multi-storage-client dep (prettytable)",
    "wcmatch": "multi-storage-client dep",
    "bracex": "multi-storage-client dep (wcmatch)",
    "xattr": "multi-storage-client dep",
    "cffi": "multi-storage-client dep (xattr)",
    "pycparser": "multi-storage-client dep (xattr/cffi)",
    "tzdata": "multi-storage-client dep",
    # megatron-core extras that the training loops do not import.
    "flask": "megatron-core[mlm] text-generation REST server, not the training loop",
    "flask-restful": "megatron-core[mlm] text-generation REST server",
    "aniso8601": "flask-restful dep",
    "blinker": "flask dep",
    "itsdangerous": "flask dep",
    "pytz": "flask-restful dep (the node's pandas does not need it)",
    "flash-linear-attention": "linear-attention (GDN) kernels; import is guarded and GPT never uses them",
    "fla-core": "flash-linear-attention dep",
    "orjson": "megatron-core[dev] extra; not imported by the training loops",
    "zstandard": "megatron-core[dev] extra; not imported by the training loops",
    "grpcio-tools": "nvidia-resiliency-ext's protobuf code generator; not imported at run time",
}

# Locked packages that PyPI has only as an sdist: built here with `pip wheel --no-deps` (pure Python).
SDIST_ONLY = {"antlr4-python3-runtime"}

# Files dropped from the pulp wheel by --strip-pulp-solvers: bundled CBC solver binaries (~16 MiB).
# nvidia-modelopt imports pulp but never runs a solver on the pretraining path.
PULP_STRIP_PATTERNS = ["pulp/solverdir/cbc/*"]


# ---------------------------------------------------------------------------------------------------------
# Requirements


def marker_env(python_version: str, extra: str = "") -> dict[str, str]:
    """PEP 508 marker environment of the node (CPython on linux x86_64), not of the machine running this."""
    full = python_version if python_version.count(".") >= 2 else python_version + ".0"
    return {
        "python_version": ".".join(python_version.split(".")[:2]),
        "python_full_version": full,
        "implementation_version": full,
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "platform_release": "",
        "platform_version": "",
        "extra": extra,
    }


def applies(req: Requirement, env: dict[str, str]) -> bool:
    """Whether `req`'s marker holds in `env`; a marker that cannot be evaluated keeps the requirement."""
    if req.marker is None:
        return True
    try:
        return req.marker.evaluate(env)
    except ValueError as exc:  # UndefinedComparison, UndefinedEnvironmentName, InvalidVersion
        print(f"  warning: {exc}; keeping the requirement", file=sys.stderr)
        return True


def parse_export(text: str, env: dict[str, str]) -> list[tuple[str, str]]:
    """(normalized name, version) pins from `uv export` output whose marker holds in `env`.

    Skips comments, `# via` and `--hash` continuation lines (indented) and option lines (`-e`, `--index-url`);
    raises ValueError on a line that is not a `name==version` pin.
    """
    reqs: list[tuple[str, str]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#") or line[0].isspace() or line.startswith("-"):
            continue
        # A same-line `--hash=...` or `# comment` and a trailing `\` continuation are not part of the requirement.
        spec = line
        for cut in (" --", "\t--", " #", "\t#"):
            spec = spec.split(cut, 1)[0]
        spec = spec.rstrip().removesuffix("\\").rstrip()
        try:
            req = Requirement(spec)
        except InvalidRequirement:
            req = None
        pins = list(req.specifier) if req is not None and req.url is None else []
        if len(pins) != 1 or pins[0].operator != "==" or pins[0].version.endswith(".*"):
            raise ValueError(f"unexpected line in uv export output: {line!r}")
        if applies(req, env):
            reqs.append((canonicalize_name(req.name), pins[0].version))
    return reqs


def run(cmd: list[str], cwd: Path | None = None, capture: bool = False) -> subprocess.CompletedProcess:
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=cwd, text=True, capture_output=capture, check=False)


def uv_command() -> list[str]:
    uv = shutil.which("uv")
    if uv:
        return [uv]
    return [sys.executable, "-m", "uv"]


def pip_command() -> list[str]:
    import importlib.util

    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    for exe in ("pip3", "pip"):
        found = shutil.which(exe)
        if found:
            return [found]
    sys.exit("error: no pip found; run this script with a Python that has pip (e.g. python3.12 from pyenv)")


def uv_export_command() -> list[str]:
    return uv_command() + ["export", "--frozen", "--no-hashes", "--no-dev", "--no-emit-project"]


def locked_requirements(root: Path, python_version: str) -> list[tuple[str, str]]:
    """(name, version) pairs from `uv export`, markers evaluated for the node."""
    proc = run(uv_export_command(), cwd=root, capture=True)
    if proc.returncode != 0:
        sys.exit(f"error: uv export failed ({proc.returncode}):\n{proc.stderr}")
    try:
        return parse_export(proc.stdout, marker_env(python_version))
    except ValueError as exc:
        sys.exit(f"error: {exc}")


def overridden_out(root: Path, python_version: str) -> set[str]:
    """Names that pyproject's [tool.uv] override-dependencies removes from the lock with a never-true marker."""
    data = tomllib.loads((root / "pyproject.toml").read_text())
    env = marker_env(python_version)
    names = set()
    for text in data.get("tool", {}).get("uv", {}).get("override-dependencies", []):
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        if not applies(req, env):
            names.add(canonicalize_name(req.name))
    return names


def read_have(paths: list[Path]) -> dict[str, str | None]:
    """name -> version (or None) from pip-freeze style files."""
    have: dict[str, str | None] = {}
    for path in paths:
        for raw in path.read_text().splitlines():
            line = raw.split("#", 1)[0].strip()
            if not line or line.startswith("-"):
                continue
            try:
                req = Requirement(line)
            except InvalidRequirement:
                print(f"  warning: {path}: cannot read {raw!r}", file=sys.stderr)
                continue
            pins = [s.version for s in req.specifier if s.operator in ("==", "===")]
            have[canonicalize_name(req.name)] = pins[0] if pins else None
    return have


def match_exclude(name: str, patterns: dict[str, str]) -> str | None:
    for pat, reason in patterns.items():
        if fnmatch.fnmatchcase(name, canonicalize_name(pat)):
            return reason
    return None


def exclude_patterns(defaults: bool, keep: list[str], exclude: list[str]) -> dict[str, str]:
    """Exclude patterns -> reason: the default list (unless `defaults` is false) less `keep`, plus `exclude`."""
    excludes = dict(DEFAULT_EXCLUDES) if defaults else {}
    for k in keep:
        excludes.pop(k, None)
        excludes.pop(canonicalize_name(k), None)
    for e in exclude:
        excludes[e] = "--exclude"
    return excludes


def same_version(node: str, lock: str) -> bool:
    """Whether the node's version, local label (+cu130) ignored, is the lock's."""
    try:
        return Version(node.split("+")[0]) == Version(lock)
    except InvalidVersion:
        return node == lock


def select(
    reqs: list[tuple[str, str]], have: dict[str, str | None], excludes: dict[str, str], keep: list[str]
) -> tuple[list[tuple[str, str]], list[str], list[tuple[str, str]]]:
    """Split the locked pins into (to ship, on the node, excluded).

    On the node: names in `have`, with " (node X, lock Y)" appended when the versions differ. Excluded:
    ("name==version", reason) for names matching `excludes` and not in `keep`. The rest is shipped.
    """
    keep_names = {canonicalize_name(k) for k in keep}
    ship: list[tuple[str, str]] = []
    on_node: list[str] = []
    excluded: list[tuple[str, str]] = []
    for name, version in reqs:
        if name in have:
            node_v = have[name]
            note = "" if node_v is None or same_version(node_v, version) else f" (node {node_v}, lock {version})"
            on_node.append(name + note)
            continue
        reason = None if name in keep_names else match_exclude(name, excludes)
        if reason:
            excluded.append((f"{name}=={version}", reason))
            continue
        ship.append((name, version))
    return ship, on_node, excluded


# ---------------------------------------------------------------------------------------------------------
# Wheels


def wheel_name_version(filename: str) -> tuple[str, Version] | None:
    """(normalized name, version) of a wheel file name, None if it is not one."""
    try:
        name, version, _, _ = parse_wheel_filename(filename)
    except (InvalidWheelFilename, InvalidVersion):
        return None
    return name, version


def wheel_for(out: Path, name: str, version: str) -> Path | None:
    want = (name, Version(version))
    for f in sorted(out.glob("*.whl")):
        if wheel_name_version(f.name) == want:
            return f
    return None


def pip_download_command(pip: list[str], out: Path, pyver: str, platforms: list[str]) -> list[str]:
    """`pip download` of wheels for the node's Python and platforms, without their dependencies."""
    cmd = pip + [
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        pyver,
        "--implementation",
        "cp",
        "--disable-pip-version-check",
        "-d",
        str(out),
    ]
    for plat in platforms:
        cmd += ["--platform", plat]
    return cmd


def download(pip: list[str], out: Path, reqs: list[tuple[str, str]], pyver: str, platforms: list[str]) -> list[str]:
    """pip download the wheels; returns the names that failed."""
    base = pip_download_command(pip, out, pyver, platforms)
    todo = [(n, v) for n, v in reqs if wheel_for(out, n, v) is None]
    if not todo:
        return []
    if run(base + [f"{n}=={v}" for n, v in todo]).returncode == 0:
        return []
    print("  batch download failed; retrying one package at a time", flush=True)
    failed = []
    for n, v in todo:
        if wheel_for(out, n, v) is None and run(base + ["-q", f"{n}=={v}"]).returncode != 0:
            failed.append(n)
    return failed


def is_pure(whl: Path) -> bool:
    """Whether the wheel installs anywhere (every tag is ABI `none`, platform `any`)."""
    _, _, _, tags = parse_wheel_filename(whl.name)
    return all(t.abi == "none" and t.platform == "any" for t in tags)


def build_sdist_wheel(pip: list[str], out: Path, name: str, version: str) -> None:
    if wheel_for(out, name, version) is not None:
        return
    proc = run(pip + ["wheel", "--no-deps", "--disable-pip-version-check", "-w", str(out), f"{name}=={version}"])
    whl = wheel_for(out, name, version)
    if proc.returncode != 0 or whl is None:
        sys.exit(f"error: could not build a wheel for {name}=={version}")
    if not is_pure(whl):
        sys.exit(f"error: {whl.name} was built for this machine, not the node; it is not pure Python")


def strip_wheel(whl: Path, patterns: list[str]) -> int:
    """Repack `whl` without members matching `patterns`, dropping their RECORD lines. Returns bytes saved."""
    with zipfile.ZipFile(whl) as zin:
        drop = {i.filename for i in zin.infolist() if any(fnmatch.fnmatchcase(i.filename, p) for p in patterns)}
        if not drop:
            return 0
        before = whl.stat().st_size
        fd, tmp = tempfile.mkstemp(suffix=".whl", dir=whl.parent)
        os.close(fd)
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zout:
            for info in zin.infolist():
                if info.filename in drop:
                    continue
                data = zin.read(info.filename)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(ln for ln in lines if ln.split(",", 1)[0] not in drop).encode()
                zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    os.replace(tmp, whl)
    return before - whl.stat().st_size


def build_project_wheel(root: Path, out: Path, pip: list[str]) -> Path:
    for old in out.glob("unified_train-*.whl"):
        old.unlink()
    proc = run(uv_command() + ["build", "--wheel", "--out-dir", str(out)], cwd=root)
    if proc.returncode != 0:
        print("  uv build failed; trying pip wheel", flush=True)
        proc = run(
            pip
            + [
                "wheel",
                "--no-deps",
                "--disable-pip-version-check",
                "-w",
                str(out),
                str(root),
            ]
        )
    found = sorted(out.glob("unified_train-*.whl"))
    if proc.returncode != 0 or not found:
        sys.exit("error: could not build the project's wheel")
    return found[-1]


def requires_dist(whl: Path) -> list[str]:
    with zipfile.ZipFile(whl) as z:
        meta = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
        if meta is None:
            return []
        text = z.read(meta).decode("utf-8", "replace")
    head = text.split("\n\n", 1)[0]
    return [line.split(":", 1)[1].strip() for line in head.splitlines() if line.startswith("Requires-Dist:")]


def version_satisfies(version: str, specifiers: str) -> bool | None:
    """Whether `version` (local label ignored) meets a PEP 440 specifier list; None if either does not parse.

    Pre-releases count: the question is whether the version the node has is in range, not whether to pick it.
    """
    try:
        return SpecifierSet(specifiers).contains(Version(version.split("+")[0]), prereleases=True)
    except (InvalidSpecifier, InvalidVersion):
        return None


def unmet_dependencies(
    wheels: list[Path],
    shipped: set[str],
    have: dict,
    pyver: str,
    conflicts: list[str] | None = None,
) -> dict[str, set[str]]:
    """dependency name -> wheels needing it, for deps neither shipped nor on the node. Appends to
    `conflicts` the requirements that the node's known version of a package does not meet."""
    env = marker_env(pyver)
    unmet: dict[str, set[str]] = {}
    for whl in wheels:
        owner = wheel_name_version(whl.name)[0]
        for text in requires_dist(whl):
            try:
                req = Requirement(text)
            except InvalidRequirement as exc:
                print(f"  warning: {whl.name}: {exc}; ignoring the requirement", file=sys.stderr)
                continue
            if not applies(req, env):
                continue
            dep = canonicalize_name(req.name)
            if dep not in shipped and dep not in have:
                unmet.setdefault(dep, set()).add(owner)
            elif (
                conflicts is not None
                and dep not in shipped
                and have.get(dep)
                and version_satisfies(have[dep], str(req.specifier)) is False
            ):
                conflicts.append(f"{owner} wants {dep}{req.specifier}, the node has {have[dep]}")
    return unmet


# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Default excludes (pattern: reason):\n" + "\n".join(f"  {k}: {v}" for k, v in DEFAULT_EXCLUDES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--python-version",
        default="3.12",
        help="the node's Python (default: %(default)s)",
    )
    p.add_argument(
        "--platform",
        action="append",
        dest="platforms",
        metavar="TAG",
        help=f"wheel platform tag, repeatable; replaces the defaults ({', '.join(DEFAULT_PLATFORMS)})",
    )
    p.add_argument(
        "--have",
        action="append",
        type=Path,
        metavar="FILE",
        help="what the node already has, one `name==version` or `name` a line (pip freeze "
        "style, # comments); repeatable; those are not shipped "
        f"(default: {SCRIPT_DIR.relative_to(REPO_ROOT) / 'gpu_node_have.txt'})",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path(".whl"),
        help="wheelhouse folder, relative to the repo root unless absolute (default: %(default)s)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="NAME",
        help="leave this package out on purpose (fnmatch patterns allowed); repeatable",
    )
    p.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="NAME",
        help="ship this package although a default exclude names it; repeatable",
    )
    p.add_argument(
        "--no-default-excludes",
        action="store_true",
        help="ignore the built-in exclude list",
    )
    p.add_argument(
        "--max-mib",
        type=float,
        default=64.0,
        help="size budget for the wheelhouse in MiB; exit 1 if over (default: %(default)s)",
    )
    p.add_argument(
        "--strip-pulp-solvers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="repack pulp without its bundled CBC binaries, pulp/solverdir/cbc/* (default: on)",
    )
    p.add_argument(
        "--no-project",
        action="store_true",
        help="do not build this project's own wheel",
    )
    p.add_argument(
        "--no-prune",
        action="store_true",
        help="keep other wheels found in OUT (by default they are removed: two versions of one "
        "package stop the offline install)",
    )
    p.add_argument("--dry-run", action="store_true", help="print what would be shipped and stop")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = REPO_ROOT
    if not (root / "pyproject.toml").is_file():
        sys.exit(f"error: no pyproject.toml in {root}")
    out = args.out if args.out.is_absolute() else root / args.out
    platforms = args.platforms or DEFAULT_PLATFORMS
    have_files = args.have or [SCRIPT_DIR / "gpu_node_have.txt"]
    have = read_have(have_files)

    excludes = exclude_patterns(not args.no_default_excludes, args.keep, args.exclude)
    reqs = locked_requirements(root, args.python_version)
    ship, on_node, excluded = select(reqs, have, excludes, args.keep)

    print(
        f"\nlocked: {len(reqs)}   on the node: {len(on_node)}   excluded: {len(excluded)}   "
        f"to ship: {len(ship)} + project wheel"
    )
    mismatched = [n for n in on_node if "(" in n]
    if mismatched:
        print("on the node with another version than the lock (the node's is used):\n  " + "\n  ".join(mismatched))
    print("excluded:")
    for nv, reason in excluded:
        print(f"  {nv:40s} {reason}")
    print("to ship:\n  " + " ".join(f"{n}=={v}" for n, v in ship))
    if args.dry_run:
        return 0

    pip = pip_command()
    out.mkdir(parents=True, exist_ok=True)
    binary = [(n, v) for n, v in ship if n not in SDIST_ONLY]
    failed = download(pip, out, binary, args.python_version, platforms)
    for n, v in ship:
        if n in SDIST_ONLY or n in failed:
            if n in failed:
                print(
                    f"  no wheel for {n}=={v} on the index; building it from the sdist",
                    flush=True,
                )
            build_sdist_wheel(pip, out, n, v)

    wheels = []
    for n, v in ship:
        whl = wheel_for(out, n, v)
        if whl is None:
            sys.exit(f"error: no wheel for {n}=={v} in {out}")
        wheels.append(whl)

    if args.strip_pulp_solvers:
        for whl in wheels:
            if wheel_name_version(whl.name)[0] == "pulp":
                saved = strip_wheel(whl, PULP_STRIP_PATTERNS)
                if saved:
                    print(f"  stripped {PULP_STRIP_PATTERNS} from {whl.name}: -{saved / MIB:.2f} MiB")

    if not args.no_project:
        wheels.append(build_project_wheel(root, out, pip))

    if not args.no_prune:
        keep_files = {w.name for w in wheels}
        for f in sorted(out.iterdir()):
            if f.is_file() and f.suffix in (".whl", ".gz", ".zip") and f.name not in keep_files:
                print(f"  removing {f.name} (not in this set)")
                f.unlink()

    conflicts: list[str] = []
    unmet = unmet_dependencies(wheels, {n for n, _ in ship}, have, args.python_version, conflicts)
    excluded_names = {nv.split("==")[0] for nv, _ in excluded}
    removed = overridden_out(root, args.python_version)
    missing = {d: w for d, w in unmet.items() if d not in excluded_names and d not in removed}
    if missing:
        print("\nwarning: dependencies neither shipped, excluded nor listed in --have:")
        for d, w in sorted(missing.items()):
            print(f"  {d:30s} needed by {', '.join(sorted(w))}")
    if conflicts:
        print("\nnote: the node's version falls outside a shipped wheel's declared range (--no-deps installs anyway):")
        for c in sorted(set(conflicts)):
            print(f"  {c}")

    rows = sorted(((w.name, w.stat().st_size) for w in wheels), key=lambda r: -r[1])
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    width = max(len(r[0]) for r in rows)
    print(f"\n{'wheel':{width}s}  {'MiB':>7s}")
    print(f"{'-' * width}  {'-' * 7}")
    for name, size in rows:
        print(f"{name:{width}s}  {size / MIB:7.2f}")
    print(f"{'-' * width}  {'-' * 7}")
    print(f"{f'total ({len(rows)} wheels, all of {out.name}/)':{width}s}  {total / MIB:7.2f}")
    if total > args.max_mib * MIB:
        print(
            f"error: {total / MIB:.2f} MiB is over the --max-mib budget of {args.max_mib:g} MiB",
            file=sys.stderr,
        )
        return 1
    print(f"within the {args.max_mib:g} MiB budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())

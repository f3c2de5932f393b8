"""The manuals' commands, run: every command in README.md's code blocks, and every example `--help` gives.

What runs on a CPU runs as written (parity, export, preflight, `--cfg job`, compare, panels, the refusal the README
shows) in a scratch directory holding the README's paths (`sweeps/`, `runs/a/checkpoints`), so Hydra's output
directories land there. A command that needs a GPU is validated as written with `--dry-run` (the up-front checks and
the stacks' own, everything `python -m unified_train` does before it starts a job) on a host whose hardware shows one
GPU (an nvidia-smi stand-in, ut_helpers.fake_gpu_env); a Slurm command is validated, not submitted. Commands that
install software or need a cluster are run by the test ELSEWHERE names; NODE_ONLY ones only on the GPU node. A README
command this file does not know fails test_every_readme_command_is_run.

The slow ones (each imports both stacks) start together when the module starts, so the file takes about as long as
the slowest: the CPU runs, and one interpreter that runs the CLI's main() for every `--dry-run` in turn.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from ut_helpers import REPO, compose, fake_gpu_env, job_for, subprocess_env, write_run_dir

from unified_train import config as C
from unified_train import rundir

README = REPO / "README.md"
PYTHONS = ("python", "python3", ".venv/bin/python")
CPU_MODES = ("parity", "export", "preflight")
INSPECT = ("--cfg", "-c", "--help", "-h", "--info")
# Commands another test (or CI) runs, by their first words: the file that runs them, and a word it must contain.
ELSEWHERE = {
    "python -m pip install uv": (".ci/run", "python -m pip install -q uv==0.13.9"),
    "python -m uv sync": (".ci/run", "python -m uv sync --locked --python-platform x86_64-manylinux_2_39"),
    ".venv/bin/python -m pytest": (".ci/run", ".venv/bin/python -m pytest"),
    "bash scripts/local_slurm.sh": ("tests/test_slurm.py", "local_slurm.sh"),
    'eval "$(bash scripts/local_slurm.sh': ("tests/test_slurm.py", '"start"'),
    "python3 scripts/build_wheelhouse.py": ("tests/test_build_wheelhouse.py", "build_wheelhouse.py"),
}
# Commands for the air-gapped GPU node only (its GPU suite, and the script that installs the wheelhouse there):
# here the script is only parsed and the suite's directory checked.
NODE_ONLY = ("bash scripts/gpu_node_setup.sh", "python3 -m pytest tests/gpu")
LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\]")  # a logging record ([time][name][level] - message)


def readme_commands() -> list[tuple[str, list[str]]]:
    """(command line, the output the README shows for it) for every command in a code block: each line of a bash
    block (continuations joined, `&&` split), and `$ ` lines of any other block, followed by their output."""
    found = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", README.read_text(), re.S):
        lines = body.replace("\\\n", " ").splitlines()
        for i, line in enumerate(lines):
            if lang == "bash" and line.strip() and not line.lstrip().startswith("#"):
                found += [(part.strip(), []) for part in line.split("&&")]
            elif line.startswith("$ "):
                output = []
                for following in lines[i + 1 :]:
                    if following.startswith("$ "):
                        break
                    output.append(following)
                found.append((line[2:], [o for o in output if o.strip()]))
    return found


def _kind(command: str, output: list[str] = ()) -> str | None:
    """How a README command is run here: "run" (as written), "validate" (with --dry-run), "compare", "panels",
    "node" (NODE_ONLY), "elsewhere:<key>" (ELSEWHERE), or None (unknown)."""
    argv = _argv(command)
    if output:  # the README shows what it prints: run it and compare
        return "run"
    if argv[0] in PYTHONS and argv[1:2] == ["-m"]:
        module = argv[2]
        if module == "unified_train":
            if "--dry-run" in argv or "hydra/launcher=slurm" in argv:
                return "validate"
            if any(a in INSPECT for a in argv) or _mode(argv) in CPU_MODES:
                return "run"
            return "validate"
        if module in ("unified_train.results.compare", "unified_train.results.panels"):
            return module.rsplit(".", 1)[1]
    if command.startswith(NODE_ONLY):
        return "node"
    return next((f"elsewhere:{k}" for k in ELSEWHERE if command.startswith(k)), None)


def _argv(command: str) -> list[str]:
    return shlex.split(command.split(" > ")[0], comments=True)  # `> FILE` is the shell's


def _mode(argv: list[str]) -> str | None:
    return next((a.split("=", 1)[1] for a in argv if a.startswith("mode=")), None)


COMMANDS = readme_commands()


def _slurm_settings() -> list[str]:
    """What `...` stands for in a Slurm command: the settings of the README's full Slurm example."""
    for command, _ in COMMANDS:
        argv = _argv(command)
        if "hydra/launcher=slurm" in argv and "..." not in argv:
            return [a for a in argv[3:] if "=" in a and not a.startswith(("hydra/launcher=", "backend="))]
    return []


def _cli_args(argv: list[str]) -> list[str]:
    """The arguments after `python`; `...` filled (in a Slurm command, with the Slurm example's settings)."""
    rest = argv[1:]
    if "..." in rest:
        fill = _slurm_settings() if "hydra/launcher=slurm" in rest else []
        at = rest.index("...")
        rest = rest[:at] + fill + rest[at + 1 :]
    return rest


def _env(extra=None) -> dict:
    return {k: v for k, v in {**subprocess_env(), **(extra or {})}.items() if k != "WANDB_API_KEY"}


def _run(argv, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=_env(env), capture_output=True, text=True, timeout=timeout)


def _workspace(root: Path) -> Path:
    """A working directory holding what the README's commands refer to."""
    work = root / "work"
    work.mkdir()
    (work / "sweeps").symlink_to(REPO / "sweeps")
    checkpoints = work / "runs" / "a" / "checkpoints"
    (checkpoints / "iter_0001000").mkdir(parents=True)
    (checkpoints / "latest_checkpointed_iteration.txt").write_text("1000\n")
    return work


def _files(work: Path) -> set:
    return {p.relative_to(work) for p in work.rglob("*")}


def _help_examples(help_text: str) -> list[str]:
    return [
        line.strip()
        for line in help_text.splitlines()
        if line.strip().startswith("python -m unified_train ") and "--cfg" not in line and "--hydra-help" not in line
    ]


# The CLI's main() for each argument list in turn, in one interpreter (the stacks are imported once): exit code,
# stdout and stderr of each, as JSON into the file named by the second argument.
_DRY_RUNS = """
import contextlib, io, json, sys
from unified_train.__main__ import main
commands, results_file, results = json.loads(sys.argv[1]), sys.argv[2], []
for args in commands:
    sys.argv = ["unified_train", *args]
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    results.append([code, out.getvalue(), err.getvalue()])
open(results_file, "w").write(json.dumps(results))
"""


class Started:
    """A command started in the background; `result()` waits for it."""

    def __init__(self, argv, cwd: Path, env=None):
        self.argv, self.cwd = argv, cwd
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(argv, cwd=cwd, env=_env(env), stdout=self.out, stderr=self.err, text=True)

    def result(self, timeout=600) -> subprocess.CompletedProcess:
        self.proc.wait(timeout=timeout)
        self.out.seek(0), self.err.seek(0)
        return subprocess.CompletedProcess(self.argv, self.proc.returncode, self.out.read(), self.err.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.out.close(), self.err.close()


@pytest.fixture(scope="module")
def help_text(tmp_path_factory):
    work = tmp_path_factory.mktemp("help")
    proc = _run([sys.executable, "-X", "importtime", "-m", "unified_train", "--help"], work, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    heavy = re.findall(r"\|\s*((?:torch|megatron)(?:\.\S+)?)$", proc.stderr, re.MULTILINE)
    assert heavy == [], heavy[:10]  # --help imports neither torch nor megatron
    assert list(work.iterdir()) == []
    return proc.stdout


@pytest.fixture(scope="module", autouse=True)
def started(help_text, tmp_path_factory):
    """Everything slow, started at once: each README CPU run (in its own scratch directory), and the dry runs of
    every README command that needs a GPU or Slurm and of every --help example (one interpreter, one directory)."""
    runs, dry = {}, []
    for command, output in COMMANDS:
        kind = _kind(command, output)
        if kind == "run" and not output and _mode(_argv(command)) in CPU_MODES:
            work = _workspace(tmp_path_factory.mktemp("cpu_run"))
            runs[command] = Started([sys.executable, *_cli_args(_argv(command))], work)
        elif kind == "validate":
            dry.append(command)
    dry += _help_examples(help_text)
    root = tmp_path_factory.mktemp("dry_runs")
    work = _workspace(root)
    args = [a[2:] + ([] if "--dry-run" in a else ["--dry-run"]) for a in (_cli_args(_argv(c)) for c in dry)]
    batch = Started(
        [sys.executable, "-c", _DRY_RUNS, json.dumps(args), str(root / "results.json")], work, fake_gpu_env(root)
    )
    before = _files(work)

    def dry_runs() -> dict[str, subprocess.CompletedProcess]:
        proc = batch.result()
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert _files(work) == before  # --dry-run writes nothing
        results = json.loads((root / "results.json").read_text())
        return {c: subprocess.CompletedProcess(c, *r) for c, r in zip(dry, results, strict=True)}

    yield {"runs": runs, "dry_runs": functools.cache(dry_runs)}
    for run in [*runs.values(), batch]:
        run.stop()


def test_every_readme_command_is_run():
    assert len(COMMANDS) >= 20, COMMANDS
    unknown = [c for c, output in COMMANDS if _kind(c, output) is None]
    assert unknown == [], f"README commands no test runs: {unknown}"


@pytest.mark.parametrize("key", list(ELSEWHERE))
def test_commands_run_elsewhere_are_run_there(key):
    if not any(c.startswith(key) for c, _ in COMMANDS):
        pytest.skip(f"the README has no `{key}` command now")
    path, word = ELSEWHERE[key]
    assert word in (REPO / path).read_text(), f"{path} does not run `{key}`"


def _assert_dry_run_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "overrides" not in line]
    assert rows and all(row.rstrip().endswith("| ok |") for row in rows), (proc.args, proc.stdout)


@pytest.mark.parametrize("command, output", COMMANDS, ids=[re.sub(r"\s+", " ", c)[:90] for c, _ in COMMANDS])
def test_readme_command(command, output, started, tmp_path):
    argv, kind = _argv(command), _kind(command, output)
    if kind is None or kind.startswith("elsewhere:"):
        pytest.skip("run by the test ELSEWHERE names (test_commands_run_elsewhere_are_run_there)")
    if kind == "node":
        script = next((a for a in argv if a.endswith(".sh")), None)
        if script:
            assert subprocess.run(["bash", "-n", str(REPO / script)]).returncode == 0
        else:
            assert list((REPO / "tests" / "gpu").glob("test_*.py"))
    elif kind == "validate":  # needs a GPU (or Slurm): validated as written, on a host with one GPU
        _assert_dry_run_ok(started["dry_runs"]()[command])
    elif kind in ("compare", "panels"):
        sweep = _finished_pair(tmp_path / "sweep")
        (_compare if kind == "compare" else _panels)(argv, sweep, _workspace(tmp_path))
    elif command in started["runs"]:
        _assert_cpu_run(argv, started["runs"][command].result(), tmp_path)
    else:  # quick: the refusal the README shows, --cfg job
        work = _workspace(tmp_path)
        before = _files(work)
        proc = _run([sys.executable, *_cli_args(argv)], work, timeout=120)
        if output:
            assert proc.returncode == 2, proc.stderr[-3000:]
            assert [line for line in proc.stderr.splitlines() if line.startswith("unified_train:")] == output
            assert proc.stdout == "" and _files(work) == before
        else:
            assert proc.returncode == 0 and "model:" in proc.stdout, proc.stderr[-3000:]


def _assert_cpu_run(argv, proc, tmp_path) -> None:
    """Exit 0, and the mode's result alone on stdout: no logging records, no tracebacks (they go to stderr)."""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert not [line for line in proc.stdout.splitlines() if LOG_LINE.match(line)], proc.stdout[:3000]
    assert "Traceback" not in proc.stdout, proc.stdout[:3000]
    mode = _mode(argv)
    if mode == "export":
        _assert_script(proc.stdout, tmp_path)
    else:
        assert proc.stdout.startswith(f"{mode}: ") and proc.stdout.count("\n") == 1, proc.stdout
        assert proc.stdout.startswith(("parity: all ", "preflight: OK:")), proc.stdout


def _assert_script(text: str, tmp_path) -> None:
    """`mode=export > cmds.sh` is a script: bash parses it, and every line is a comment or a command."""
    script = tmp_path / "cmds.sh"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, text[:3000]
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines and all(line.startswith("#") or line.startswith("torchrun ") for line in lines), text[:3000]
    assert sum(line.startswith("torchrun ") for line in lines) == 2


def _finished_pair(sweep: Path) -> Path:
    """A sweep directory as a paired multirun leaves it: the job records and the metrics of both halves."""
    for num, backend in enumerate(("mlm", "bridge")):
        cfg = compose([f"backend={backend}"])
        run_dir = write_run_dir(sweep / f"{num}_{backend}", backend)
        rundir.write_job_record(cfg, job_for(cfg, run_dir, sweep.name))
    return sweep


def _options(argv: list[str], placeholder: dict) -> list[list[str]]:
    """The command with its placeholders filled: once bare (no `[...]` options) and once with every option (its
    first choice)."""
    bare, full, optional = [], [], False
    for arg in argv:
        words = arg.strip("[]").split("|")[0]
        filled = next((arg.replace(k, v) for k, v in placeholder.items() if k in arg), None)
        word = filled.rstrip(".") if filled is not None else words
        if arg.startswith("["):
            optional = True
        if not optional:
            bare.append(word)
        full.append(word)
        if arg.endswith("]"):
            optional = False
    return [bare, full]


def _compare(argv, sweep, work) -> None:
    for variant in _options(argv, {"SWEEP_DIR": str(sweep)}):
        proc = _run([sys.executable, *variant[1:]], work, timeout=120)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "verdict: **exact (bitwise)**" in proc.stdout
        assert "Traceback" not in proc.stdout and not LOG_LINE.match(proc.stdout)
    assert (sweep / "comparison.md").is_file()  # --write


def _panels(argv, sweep, work) -> None:
    """Offline (no WANDB_API_KEY, no network): the sweep's spec is written; creating the panels from a spec asks
    for the key in one line."""
    filled = [a.replace("SWEEP_DIR", str(sweep)) for a in argv]
    if "--spec" in argv:
        assert _run([sys.executable, "-m", "unified_train.results.panels", str(sweep)], work).returncode == 0
        proc = _run([sys.executable, *filled[1:]], work, timeout=120)
        assert proc.returncode == 2 and "WANDB_API_KEY is not set" in proc.stderr, proc.stderr[-2000:]
        return
    proc = _run([sys.executable, *filled[1:]], work, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (sweep / "wandb_panels.json").is_file() and "spec written to" in proc.stdout


# --- --help -----------------------------------------------------------------------------------------------------


def test_help_says_what_the_tool_does(help_text):
    assert "Megatron-LM" in help_text and "Megatron-Bridge" in help_text and "in-process" in help_text
    modes = help_text.split("== Modes (mode=...) ==")[1].split("==")[0]
    assert [line.split()[0] for line in modes.splitlines() if line.strip()] == list(C.MODES)
    for words in ("-m backend=mlm,bridge", "--dry-run", "-cd sweeps -cn", "hydra/launcher=slurm"):
        assert words in help_text, words
    for sweep in (REPO / "sweeps").glob("*.yaml"):
        assert sweep.stem in help_text, sweep.stem
    assert "python -m unified_train.results.compare" in help_text
    groups = help_text.split("== Config groups")[1]
    for group in (REPO / "conf").iterdir():
        if group.is_dir() and group.name != "hydra":
            assert f"\n{group.name}: " in groups, group.name


def test_help_examples_validate(help_text, started):
    """Each example passes every check as written (on a host with one GPU)."""
    examples = _help_examples(help_text)
    assert len(examples) >= 6, examples
    for example in examples:
        _assert_dry_run_ok(started["dry_runs"]()[example])

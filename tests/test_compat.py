"""Both stacks import without Transformer Engine / apex, with the wheel's missing datasets Makefile, and in
multiprocessing spawn children; the real package is used where installed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest
from ut_helpers import run_python

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None


def test_compat_hooks_are_installed_at_interpreter_start():
    from unified_train import compat

    assert any(isinstance(f, compat.CompatFinder) for f in sys.meta_path)
    compat.install()  # idempotent
    assert sum(isinstance(f, compat.CompatFinder) for f in sys.meta_path) == 1


@pytest.mark.skipif(HAVE_TE, reason="Transformer Engine is installed here")
def test_bridge_pretrain_imports_without_transformer_engine():
    import megatron.bridge.training.pretrain  # noqa: F401
    from megatron.bridge.peft import lora_layers

    assert "transformer_engine" not in sys.modules
    assert not any(m.startswith("transformer_engine") for m in sys.modules)
    # megatron.core's own probes still see the truth.
    from megatron.core.extensions import transformer_engine as te_ext  # noqa: F401
    from megatron.core.utils import is_te_min_version  # noqa: F401

    # The placeholder: isinstance checks are False, constructing a TE layer raises a clear ImportError.
    assert not isinstance(object(), lora_layers.te.Linear)
    with pytest.raises(ImportError, match="Transformer Engine"):
        lora_layers.te.Linear(4, 4)


@pytest.mark.skipif(HAVE_TE, reason="Transformer Engine is installed here")
def test_default_layer_spec_is_local_without_te():
    from ut_helpers import compose

    from unified_train import config

    assert config.transformer_impl(compose()) == "local"
    assert config.transformer_impl(compose(["kernels.transformer_impl=local"])) == "local"


def test_compile_helpers_does_not_run_make(monkeypatch):
    from megatron.core.datasets import utils

    def forbidden(*args, **kwargs):
        raise AssertionError(f"compile_helpers ran a command: {args}")

    monkeypatch.setattr(subprocess, "run", forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)
    utils.compile_helpers()  # returns: the wheel's prebuilt helpers_cpp imports
    from megatron.core.datasets import helpers_cpp

    assert helpers_cpp.__file__.endswith(".so")


def test_compile_helpers_falls_back_to_make_without_prebuilt(monkeypatch):
    """The patch is only a no-op when the prebuilt extension imports; otherwise upstream's compile runs."""
    from megatron.core.datasets import utils

    calls = []

    class Done:
        returncode = 0

    import megatron.core.datasets as datasets_pkg

    monkeypatch.setitem(sys.modules, "megatron.core.datasets.helpers_cpp", None)  # import now fails
    monkeypatch.delattr(datasets_pkg, "helpers_cpp", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda cmd, *a, **k: calls.append(cmd) or Done())
    utils.compile_helpers()
    assert calls and calls[0][0] == "make"


def test_energon_is_the_real_package_when_installed():
    spec = importlib.util.find_spec("megatron.energon")
    if spec is None or spec.origin is None:
        pytest.skip("megatron-energon is not installed")
    import megatron.energon

    from unified_train import compat

    assert not isinstance(megatron.energon, compat.AbsentModule)
    assert megatron.energon.__file__ and megatron.energon.__file__.endswith("__init__.py")


def test_energon_placeholder_when_missing(tmp_path):
    """Without the real package (hidden here from the path finder), `import megatron.energon` and its names
    still resolve (as Bridge's data builders need at import time), and using one raises an ImportError naming
    the package."""
    code = textwrap.dedent("""
        import sys
        from importlib.machinery import PathFinder

        # Hide the real package from the path search, then re-install the hooks as on a machine without it.
        real = PathFinder.find_spec
        def find_spec(name, path=None, target=None):
            if name == 'megatron.energon' or name.startswith('megatron.energon.'):
                return None
            return real(name, path, target)
        PathFinder.find_spec = staticmethod(find_spec)
        from unified_train import compat
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, (compat.CompatFinder, compat.AbsentFinder))]
        compat.install()
        import megatron.energon as e
        assert isinstance(e, compat.AbsentModule), type(e)
        from megatron.energon import WorkerConfig
        try:
            WorkerConfig()
        except ImportError as exc:
            assert 'megatron-energon' in str(exc)
            print('PLACEHOLDER_OK')
    """)
    proc = run_python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PLACEHOLDER_OK" in proc.stdout


@pytest.mark.skipif(HAVE_TE, reason="Transformer Engine is installed here")
def test_spawn_child_gets_the_compat_hooks(tmp_path):
    """A spawn child of a plain script (which never imports unified_train) can import Bridge's lora_layers,
    because unified_train_compat.pth installs the hooks at every interpreter start."""
    script = tmp_path / "spawn_probe.py"
    script.write_text(
        textwrap.dedent("""
        import multiprocessing as mp
        import sys


        def child(queue):
            import megatron.bridge.peft.lora_layers  # noqa: F401
            queue.put(("ok", "transformer_engine" in sys.modules))


        if __name__ == "__main__":
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            proc = ctx.Process(target=child, args=(queue,))
            proc.start()
            proc.join(600)
            print("EXIT", proc.exitcode)
            print("RESULT", queue.get(timeout=5) if proc.exitcode == 0 else None)
    """)
    )
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("ut_helpers").subprocess_env()},
    )
    assert "EXIT 0" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "RESULT ('ok', False)" in proc.stdout


def test_pth_file_installs_compat_and_is_shipped():
    import site

    from ut_helpers import REPO

    pth = (REPO / "unified_train_compat.pth").read_text().strip()
    assert pth.startswith("import ") and "install()" in pth
    installed = [
        p for d in site.getsitepackages() for p in __import__("pathlib").Path(d).glob("unified_train_compat.pth")
    ]
    assert installed and installed[0].read_text().strip() == pth


def test_bridge_recipes_import_without_energon(tmp_path):
    """Like on the GPU node (no megatron-energon): Bridge's recipe package decorates and subclasses energon
    classes at import; the placeholder keeps that import working (the native Bridge baseline needs it)."""
    code = (
        "import importlib.machinery as m\n"
        "orig = m.PathFinder.find_spec\n"
        "m.PathFinder.find_spec = staticmethod(lambda n, p=None, t=None: None if n == 'megatron.energon' "
        "else orig(n, p, t))\n"
        "from megatron.bridge.recipes.gpt.vanilla_gpt import vanilla_gpt_pretrain_config\n"
        "import megatron.energon, unified_train.compat as c\n"
        "assert isinstance(megatron.energon, c.AbsentModule)\n"
        "print('RECIPE', type(vanilla_gpt_pretrain_config().model).__name__)\n"
    )
    proc = run_python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RECIPE GPTModelProvider" in proc.stdout

"""Packaging traps of the megatron-core 0.19.2 / megatron-bridge 0.6.2 wheels, handled in one place.

Each fix is an import hook: it acts only when the module in question is imported, and only when the real
dependency is missing. With the real package installed nothing is changed. `install()` is cheap (no heavy
imports) and idempotent; the `unified_train_compat.pth` file shipped with the package calls it at interpreter
start, so `multiprocessing` spawn children (Bridge's async checkpoint writer) get the same fixes.

The traps:
1. `megatron/bridge/peft/lora_layers.py` does an unguarded `import transformer_engine.pytorch as te` and
   every `import megatron.bridge...` reaches it. Without TE we execute that module with `te` bound to a
   placeholder whose attributes are classes nothing is an instance of, so `isinstance` checks are False and
   constructing a TE layer raises a clear ImportError. Nothing named `transformer_engine` enters
   `sys.modules`, so megatron.core's own `HAVE_TE` probes still see the truth.
2. The wheel ships the prebuilt `helpers_cpp` extension but not the Makefile `compile_helpers()` runs, and a
   failed `make` calls `sys.exit(1)` on rank 0 of both loops. When the prebuilt extension imports we make
   `compile_helpers` a no-op; otherwise the original runs (and compiles, from a source checkout).
3. megatron-core 0.19.2's `DistributedOptimizer` without apex or TE (torch's Adam) cannot resume
   (`megatron/core/optimizer/distrib_optimizer.py`): `state_dict()` (line 839, `assert len(steps) == 1`) reads
   Adam's `step` from a per-parameter state that does not exist before the first step, which is exactly when a
   load builds its state dict; and `load_state_dict()` leaves Adam's per-parameter step wrong: one tensor shared
   by every parameter (line 1032, `s["step"] = step`; torch's Adam adds 1 to it once per parameter) and then
   overwritten by the load template's step (line 1225, the dp_reshardable parameter-state copy), so a resumed
   run's bias correction restarts from step 0. Patched only for the affected versions and only when the module
   fell back to torch's Adam (`HAVE_APEX_OR_TE` False); tests/test_resume_optimizer.py reproduces both on a gloo
   group.
4. `megatron.energon` is imported at module level by Bridge's data builders but used only by multimodal
   recipes. Where it is not installed (the GPU node's wheelhouse omits its large dependency chain) an
   empty placeholder package is provided; touching anything in it raises ImportError.
"""

from __future__ import annotations

import abc
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

_TE_IMPORT = "import transformer_engine.pytorch as te"
_LORA_MODULE = "megatron.bridge.peft.lora_layers"
_DATASET_UTILS = "megatron.core.datasets.utils"
_DISTRIB_OPTIMIZER = "megatron.core.optimizer.distrib_optimizer"
# Checked against each release's distrib_optimizer.py; a new release is added only once it is read.
ADAM_STEP_BUG_VERSIONS = ("0.19.2",)


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class _AbsentType(abc.ABCMeta):
    """Metaclass of placeholder classes: nested attributes (`te.ops.Sequential`) are placeholders too.
    An ABCMeta, so placeholders can be mixed with abstract base classes in a subclass's bases."""

    def __getattr__(cls, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _placeholder(f"{cls.__module__}.{cls.__qualname__}", attr, cls._package)


def _placeholder(owner: str, name: str, package: str) -> type:
    def refuse(cls, *args, **kwargs):
        # Decorators from the missing package run at import time of modules that merely mention it (Bridge's
        # recipe package decorates energon task encoders): applied to a function or class, they leave it as is.
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]
        if not args and kwargs:  # a decorator factory: @stateless(restore_seeds=True)
            return lambda target: target
        raise ImportError(f"{owner}.{name} needs {package}, which is not installed")

    return _AbsentType(name, (), {"__new__": refuse, "__module__": owner, "_package": package})


class AbsentModule(types.ModuleType):
    """A module stand-in for a package that is not installed.

    Attribute access yields placeholder classes (so annotations, subclassing and `isinstance` checks work)
    whose instantiation raises ImportError naming the missing package; used as a decorator they are inert.
    """

    def __init__(self, name: str, package: str):
        super().__init__(name)
        self.__path__ = []  # lets `import name.sub` resolve through AbsentFinder
        self._package = package

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        value = _placeholder(self.__name__, attr, self._package)
        setattr(self, attr, value)
        return value


class _TEFreeLoraLoader(importlib.machinery.SourceFileLoader):
    """Loads lora_layers.py with its TE import bound to a placeholder instead."""

    def source_to_code(self, data, path, *, _optimize=-1):
        source = importlib.util.decode_source(data)
        if _TE_IMPORT not in source:  # upstream changed: fail loudly rather than patch blindly
            raise ImportError(f"unified_train.compat: expected '{_TE_IMPORT}' in {path}")
        patched = source.replace(
            _TE_IMPORT, "te = __import__('unified_train.compat', fromlist=['x']).absent_transformer_engine()", 1
        )
        return compile(patched, path, "exec", dont_inherit=True, optimize=_optimize)


class _AfterImport(importlib.abc.Loader):
    """Wraps a loader and runs `hook(module)` right after the module executes."""

    def __init__(self, loader, hook):
        self._loader, self._hook = loader, hook

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._hook(module)


class AbsentFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Provides `AbsentModule` placeholders for a missing top-level package and its submodules."""

    def __init__(self, root: str, package: str):
        self._root, self._package = root, package

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self._root or fullname.startswith(self._root + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return AbsentModule(spec.name, self._package)

    def exec_module(self, module):
        pass


class CompatFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in (_LORA_MODULE, _DATASET_UTILS, _DISTRIB_OPTIMIZER):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.origin is None:
            return None
        if fullname == _LORA_MODULE:
            if _has_module("transformer_engine"):
                return None
            spec.loader = _TEFreeLoraLoader(fullname, spec.origin)
        elif fullname == _DISTRIB_OPTIMIZER:
            spec.loader = _AfterImport(spec.loader, _patch_adam_step)
        else:
            spec.loader = _AfterImport(spec.loader, _patch_compile_helpers)
        return spec


def absent_transformer_engine() -> AbsentModule:
    return AbsentModule("transformer_engine.pytorch", "Transformer Engine (pip install 'unified-train[te]')")


def _patch_compile_helpers(utils_module) -> None:
    original = utils_module.compile_helpers

    def compile_helpers():
        """No-op when the wheel's prebuilt helpers_cpp imports; the original `make` otherwise."""
        try:
            from megatron.core.datasets import helpers_cpp  # noqa: F401
        except ImportError:
            original()

    utils_module.compile_helpers = compile_helpers


def _megatron_core_version() -> str | None:
    # Not megatron.core.package_info: its __version__ appends the git hash of the current directory.
    import importlib.metadata

    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return None


def _patch_adam_step(module) -> None:
    """Trap 3: resume with torch's Adam under megatron-core's DistributedOptimizer."""
    if module.HAVE_APEX_OR_TE or _megatron_core_version() not in ADAM_STEP_BUG_VERSIONS:
        return
    import functools

    import torch

    cls = module.DistributedOptimizer
    original_state_dict, original_load_state_dict = cls.state_dict, cls.load_state_dict

    @functools.wraps(original_state_dict)
    def state_dict(self):
        adam = self.optimizer
        if adam.state:
            return original_state_dict(self)
        # No step taken: step 0 for the state-dict template that a load fills in (the checkpoint's step replaces
        # it). Held in a throwaway state only for the call, so the optimizer stays unstepped.
        params = [p for group in adam.param_groups for p in group["params"]]
        try:
            for p in params:
                adam.state[p] = {"step": torch.tensor(0.0)}
            return original_state_dict(self)
        finally:
            adam.state.clear()

    @functools.wraps(original_load_state_dict)
    def load_state_dict(self, state_dict):
        original_load_state_dict(self, state_dict)
        if self.ddp_config.use_megatron_fsdp:
            return
        # The checkpoint's step lives in its param groups. Upstream sets it as one tensor shared by every parameter
        # (torch's Adam would add 1 to it once per parameter at each step), and the dp_reshardable parameter-state
        # load then copies over it the load template's non-persistent step (0). One fresh tensor per parameter, as
        # torch's Adam creates them.
        (step,) = {group["step"] for group in state_dict["optimizer"]["param_groups"]}
        for param_state in self.optimizer.state.values():
            param_state["step"] = torch.tensor(float(step), dtype=torch.float32)

    cls.state_dict, cls.load_state_dict = state_dict, load_state_dict


def install() -> None:
    """Register the import hooks (idempotent, imports nothing heavy)."""
    if any(isinstance(f, CompatFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, CompatFinder())
    # Last on the path: only asked when no real megatron.energon was found, so nothing is probed here.
    sys.meta_path.append(AbsentFinder("megatron.energon", "megatron-energon"))

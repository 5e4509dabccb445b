"""The flat module paths of earlier releases, kept importable as deprecated aliases of their new homes.

``import lyapunov_callbacks.hessian_monitor`` (or a LightningCLI ``class_path`` through it) gets the very module
object ``lyapunov_callbacks.callbacks.hessian_monitor``, with one :class:`DeprecationWarning` naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

#: old module name → the module it lives in now
MOVED = {
    "lyapunov_callbacks.hessian": "lyapunov_callbacks.core.hessian",
    "lyapunov_callbacks.eigen": "lyapunov_callbacks.core.eigen",
    "lyapunov_callbacks.tangent": "lyapunov_callbacks.core.tangent",
    "lyapunov_callbacks.stability": "lyapunov_callbacks.core.stability",
    "lyapunov_callbacks.preconditioned": "lyapunov_callbacks.core.preconditioned",
    "lyapunov_callbacks.distributed": "lyapunov_callbacks.core.distributed",
    "lyapunov_callbacks.quasi_newton_rule": "lyapunov_callbacks.core.quasi_newton_rule",
    "lyapunov_callbacks.hessian_monitor": "lyapunov_callbacks.callbacks.hessian_monitor",
    "lyapunov_callbacks.lyapunov_monitor": "lyapunov_callbacks.callbacks.lyapunov_monitor",
    "lyapunov_callbacks.quasi_newton": "lyapunov_callbacks.callbacks.quasi_newton",
    "lyapunov_callbacks.tensorboard_layout": "lyapunov_callbacks.callbacks.tensorboard_layout",
    "lyapunov_callbacks.plotting": "lyapunov_callbacks.analysis.plotting",
    "lyapunov_callbacks.summary": "lyapunov_callbacks.analysis.summary",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"`{spec.name}` moved to `{self.target}`; import from there (or from `lyapunov_callbacks`).",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(self.target)
        self._spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The target module is already executed; the import system has just set its ``__spec__`` to the alias'
        # spec: put its own back, so that the module keeps describing where it lives.
        module.__spec__ = self._spec


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(MOVED[fullname]))


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())

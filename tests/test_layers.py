"""The package's layers: ``core`` is pure PyTorch, ``analysis`` runs without Lightning, no import runs back up a
layer, and the module paths of earlier releases still import (as deprecated aliases of the same modules)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lyapunov_callbacks"

#: layer → top-level names and package layers its modules must not import
FORBIDDEN = {
    "core": ("lightning", "pytorch_lightning", "lyapunov_callbacks.callbacks", "lyapunov_callbacks.analysis",
             "matplotlib", "tensorboard"),
    "analysis": ("lightning", "pytorch_lightning", "lyapunov_callbacks.callbacks"),
    "callbacks": ("lyapunov_callbacks.analysis",),
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_module_imports_across_its_layer_rule(layer):
    modules = sorted((PACKAGE / layer).glob("*.py"))
    assert len(modules) >= 3, modules
    bad = []
    for path in modules:
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[layer]):
                bad.append(f"{path.name} imports {name}")
    assert bad == []


def test_the_flat_package_holds_only_the_entry_points():
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "_moved.py", "cli.py", "make_train.py"]


def test_importing_the_core_loads_no_lightning():
    code = (
        "import sys, lyapunov_callbacks, lyapunov_callbacks.core.tracker, lyapunov_callbacks.core.quasi_newton_rule\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_old_module_paths_are_the_new_modules_with_a_deprecation_warning():
    from lyapunov_callbacks._moved import MOVED

    for old, new in MOVED.items():
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
            alias = importlib.import_module(old)
        assert alias is importlib.import_module(new)
        assert alias.__spec__.name == new  # the module still says where it lives
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from lyapunov_callbacks.hessian_monitor import HessianEigenvalueMonitor
    from lyapunov_callbacks import HessianEigenvalueMonitor as public

    assert HessianEigenvalueMonitor is public

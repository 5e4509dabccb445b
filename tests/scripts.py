"""Loading the repository's scripts (``benchmarks/*.py``, ``figures/*.py``) by path, as their tests do."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: str, name: str | None = None, reuse: bool = False) -> ModuleType:
    """The script at ``path`` (relative to the repository root) executed as a module.

    Registered in ``sys.modules`` under ``name`` (default: the file's stem), where dataclasses look their module up.
    The script's folder goes on ``sys.path`` first (``benchmarks/_common.py``, ``figures/_worker.py`` are imported
    by name). Each call executes the script afresh, unless ``reuse`` and the module of that name is this file: then
    the loaded module is returned (two test files sharing one module's classes).
    """
    file = ROOT / path
    name = name or file.stem
    loaded = sys.modules.get(name)
    if reuse and loaded is not None and Path(getattr(loaded, "__file__", "")).resolve() == file:
        return loaded
    if str(file.parent) not in sys.path:
        sys.path.insert(0, str(file.parent))
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

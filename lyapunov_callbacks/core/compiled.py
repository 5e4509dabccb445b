"""``torch.compile``'d models measured through their eager code: detection and the eager-evaluation context.

Hessian-vector products need a double backward, which graphs compiled by ``torch.compile`` (AOTAutograd) do
not have. Measuring does not need the compiled graph: under ``torch.compiler.set_stance("force_eager")``
(PyTorch >= 2.6) every ``torch.compile`` wrapper runs the function it wraps eagerly, without compiling and
without consulting the compiled cache, so the same module, at the same weights, is differentiated twice through
its own Python code while the training step keeps running its compiled graph. Pure PyTorch: no Lightning here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["CompiledModelError", "can_evaluate_eagerly", "check_compiled", "compiled_modules", "eager_evaluation"]


class CompiledModelError(ValueError):
    """A ``torch.compile``'d model on a PyTorch without ``torch.compiler.set_stance`` (before 2.6)."""


def can_evaluate_eagerly() -> bool:
    """Whether this PyTorch can run compiled code eagerly on demand (``torch.compiler.set_stance``, from 2.6)."""
    return callable(getattr(torch.compiler, "set_stance", None))


def compiled_modules(model: nn.Module) -> list[str]:
    """Names of the compiled parts of ``model`` (``""`` is shown as the class name); empty when nothing is compiled.

    Found: a submodule that is a ``torch.compile(module)`` wrapper (``OptimizedModule``, e.g.
    ``self.net = torch.compile(net)``), a submodule compiled in place (``module.compile()``), and a
    LightningModule that Lightning unwrapped from ``trainer.fit(torch.compile(module))`` (it keeps the module and
    wraps its ``forward`` and step methods, recording them in ``_compiler_ctx``).
    """
    found = []
    for name, module in model.named_modules():
        if (
            isinstance(module, torch._dynamo.eval_frame.OptimizedModule)
            or getattr(module, "_compiled_call_impl", None) is not None
            or getattr(module, "_compiler_ctx", None)
        ):
            found.append(name or type(module).__name__)
    return found


def check_compiled(model: nn.Module, owner: str) -> None:
    """Raise :class:`CompiledModelError` when ``model`` has compiled parts this PyTorch cannot evaluate eagerly.

    On PyTorch >= 2.6 nothing is checked (every compiled part can be run eagerly, see :func:`eager_evaluation`).

    Args:
        model: the model to be measured.
        owner: who measures (named in the message).
    """
    if can_evaluate_eagerly():
        return
    compiled = compiled_modules(model)
    if compiled:
        raise CompiledModelError(
            f"{owner} measures a torch.compile'd model (compiled: {', '.join(compiled)}) through its eager code, "
            "which needs torch.compiler.set_stance (PyTorch >= 2.6); this is PyTorch "
            f"{torch.__version__}. Upgrade PyTorch, or remove torch.compile / module.compile() for runs with the "
            "curvature callbacks."
        )


@contextlib.contextmanager
def eager_evaluation() -> Iterator[None]:
    """Run every ``torch.compile``'d function called inside eagerly: nothing is compiled, no compiled graph runs.

    ``torch.compiler.set_stance("force_eager")`` on PyTorch >= 2.6 (restoring the caller's stance after);
    elsewhere nothing changes (:func:`check_compiled` refuses compiled models there). The compiled caches and
    guards are left as they are, so the training step's graphs are neither recompiled nor invalidated.
    """
    if not can_evaluate_eagerly():
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield

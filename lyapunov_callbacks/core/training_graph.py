"""H δ taken on the training step's own autograd graph, summed over the micro-batch losses of one optimiser step.

Pure PyTorch (imports the core's :func:`~lyapunov_callbacks.core.hessian.graph_hvp` only). A caller that sees
each micro-batch loss before its backward (Lightning's ``on_before_backward``, which passes the loss divided by
``accumulate_grad_batches``) adds the products one by one; their sum is the product of the step's mean loss,
with the step's weights, batch and dropout masks, and no forward pass of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lyapunov_callbacks.core.hessian import graph_hvp

__all__ = ["TrainingGraphProducts"]


class TrainingGraphProducts:
    """The products ``H_i δ`` of one optimiser step's micro-batch losses, summed as they arrive.

    Args:
        params: the tensors H is taken with respect to, in the flat order of δ; ``None`` turns the products off
            (e.g. under DDP, mixed precision or a compiled step, where the caller measures through an operator).

    A product that fails (a kernel without a double backward, reentrant checkpointing) turns the products off
    for good and is returned by :meth:`add`, so the caller can say so once and fall back; the graph is retained,
    so the training backward still runs.
    """

    def __init__(self, params: Sequence[torch.Tensor] | None = None) -> None:
        self.params = None if params is None else list(params)
        self.begin()

    @property
    def enabled(self) -> bool:
        return self.params is not None

    def begin(self) -> None:
        """Forget the products summed so far (the first micro-batch of a step, or after :meth:`take`)."""
        self._hv: torch.Tensor | None = None
        self.parts = 0

    def add(self, loss: torch.Tensor, delta: torch.Tensor) -> Exception | None:
        """Add ``H δ`` of ``loss``'s graph; returns the error (and turns the products off) if autograd fails."""
        try:
            hv = graph_hvp(loss, self.params, delta)
        except (RuntimeError, ValueError) as err:
            self.params = None
            self.begin()
            return err
        self._hv = hv if self._hv is None else self._hv.add_(hv)
        self.parts += 1
        return None

    def take(self, micro_batches: int, delta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The step's product as a function of δ when all ``micro_batches`` losses contributed, else ``None``.

        The summed products are forgotten either way. The function answers only for ``delta`` itself (the
        tangent step asks for ``H δ`` once) and raises for any other vector.
        """
        hv, parts = self._hv, self.parts
        self.begin()
        if hv is None or parts != micro_batches:
            return None

        def product(v: torch.Tensor) -> torch.Tensor:
            if v is not delta:
                raise RuntimeError("the tangent step asked for a product with a vector other than δ")
            return hv

        return product

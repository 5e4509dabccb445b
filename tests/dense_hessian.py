"""The dense Hessian of a model's loss, the exact reference the sharded tests compare with."""

import torch


def dense_hessian(model: torch.nn.Module, loss_of, batch) -> torch.Tensor:
    """``[dim, dim]`` Hessian of ``loss_of(f, batch)`` in the flat parameters of ``model``, where ``f(x)`` is the model
    evaluated at those parameters (``torch.autograd.functional.hessian``; the model is not changed)."""
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    flat = torch.cat([p.reshape(-1) for p in params])

    def loss(theta):
        pieces, offset = {}, 0
        for name, p in zip(names, params):
            pieces[name] = theta[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
        return loss_of(lambda x: torch.func.functional_call(model, pieces, (x,)), batch)

    return torch.autograd.functional.hessian(loss, flat)

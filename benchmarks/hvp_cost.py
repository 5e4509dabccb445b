"""Cost of one Hessian-vector product relative to one gradient (forward + backward), per HVP backend.

Measured side by side in one run, per model (train mode, mean cross-entropy over one synthetic batch):

- ``gradient``: ``torch.autograd.grad(model.training_loss(batch), params)`` — the unit of cost;
- ``autograd, first HVP``: ``HessianOperator(..., backend="autograd")`` construction (forward + backward with
  ``create_graph=True``) plus its first ``matvec`` — what a one-off product costs;
- ``autograd, each further HVP``: one more ``matvec`` on that operator (the gradient graph is reused; this is
  what each iteration of an eigen-solver pays);
- ``torch.func jvp-over-grad``: ``jvp(grad(f), (θ,), (v,))`` computed here as a reference (a full forward,
  backward and forward-mode pass per product, nothing reused);
- ``finite_difference, each further HVP``: one ``matvec`` of ``HessianOperator(..., backend="finite_difference",
  gradient=g)`` given ``g = ∇L(θ)`` — one gradient at the perturbed point.

Every time is the median of interleaved repetitions; the table prints times over the gradient's time.
Target from the issue: an exact HVP costs ≤ 3× a forward+backward.

A full run (not ``--quick``) also writes its tables to ``benchmarks/results/hvp_cost.md`` (``--out FILE``
elsewhere), with the machine's ``uptime`` load before and after.

Run: ``python benchmarks/hvp_cost.py [--quick] [--threads 2] [--out FILE]``.
"""

from __future__ import annotations

import _common as C
import torch
from torch.func import functional_call, grad, jvp

from lyapunov_callbacks.core.hessian import HessianOperator

#: The issue's target for an exact HVP, in units of one forward+backward.
TARGET_RATIO = 3.0


def _models(quick: bool) -> list[tuple[str, torch.nn.Module, int, int]]:
    """``(label, model, batch_size, repeats)``: MLP 3072-512-512-10 and LeNet1 at batch 128, ResNet18 small."""
    from lyapunov_callbacks.models import MLP, LeNet1, ResNet18

    out = [
        ("MLP 3072-512-512-10", MLP(num_classes=10, hidden_sizes=[512, 512]), 128, 7 if quick else 21),
        ("LeNet1", LeNet1(num_classes=10), 128, 7 if quick else 21),
    ]
    if not quick:
        out.append(("ResNet18", ResNet18(num_classes=10), 16, 5))
    return out


def _func_hvp_fn(model: torch.nn.Module, batch):
    """A closure computing ``H v`` by ``torch.func`` forward-over-reverse (jvp of grad) at the model's weights."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())
    x, y = batch

    def loss_of(p: dict) -> torch.Tensor:
        # Fresh buffer clones so BatchNorm's running-stat updates never reach the model.
        tensors = {**p, **{n: b.clone() for n, b in buffers.items()}}
        return model.loss_from_logits(functional_call(model, tensors, (x,)), y)

    def hvp(v: dict) -> dict:
        return jvp(grad(loss_of), (params,), (v,))[1]

    shapes = {n: params[n].shape for n in names}
    return hvp, names, shapes


def measure(label: str, model: torch.nn.Module, batch_size: int, repeats: int, seed: int) -> dict:
    """Median seconds of every variant for one model; returns a row dictionary."""
    batch = C.synthetic_batch(batch_size, num_classes=10, seed=seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(dim, generator=gen)

    op_ad = HessianOperator(model, C.loss_fn, batch, backend="autograd")
    g = op_ad.gradient()
    op_fd = HessianOperator(model, C.loss_fn, batch, backend="finite_difference", gradient=g)
    func_hvp, names, shapes = _func_hvp_fn(model, batch)
    chunks = torch.split(v, [p.numel() for p in params])
    v_dict = {n: c.view(shapes[n]) for n, c in zip(names, chunks)}

    def gradient() -> None:
        loss = model.training_loss(batch)
        torch.autograd.grad(loss, params)

    def autograd_first() -> None:
        with HessianOperator(model, C.loss_fn, batch, backend="autograd") as op:
            op.matvec(v)

    def graph_only() -> None:
        HessianOperator(model, C.loss_fn, batch, backend="autograd").close()

    variants = {
        "gradient": gradient,
        "autograd_first": autograd_first,
        "graph_only": graph_only,
        "autograd_further": lambda: op_ad.matvec(v),
        "func": lambda: func_hvp(v_dict),
        "fd_further": lambda: op_fd.matvec(v),
    }
    med = C.interleaved_medians(variants, repeats=repeats, warmup=1)
    # Sanity: the three HVPs agree (finite differences only approximately on ReLU nets).
    hv_ad = op_ad.matvec(v)
    hv_func = torch.cat([t.reshape(-1) for t in func_hvp(v_dict).values()])
    rel_func = float(torch.linalg.vector_norm(hv_func - hv_ad) / torch.linalg.vector_norm(hv_ad))
    rel_fd = float(torch.linalg.vector_norm(op_fd.matvec(v) - hv_ad) / torch.linalg.vector_norm(hv_ad))
    op_ad.close()
    op_fd.close()
    base = med["gradient"]
    return {
        "model": f"{label} (batch {batch_size}, {dim:,} params)",
        "grad_ms": 1e3 * base,
        "first": med["autograd_first"] / base,
        "graph": med["graph_only"] / base,
        "further": med["autograd_further"] / base,
        "func": med["func"] / base,
        "fd": med["fd_further"] / base,
        "rel_func": rel_func,
        "rel_fd": rel_fd,
        "repeats": repeats,
    }


def main(argv=None) -> list[dict]:
    args = C.parse_args("HVP cost relative to one forward+backward, per backend.", argv,
                        extra=lambda p: C.add_out_argument(p, "hvp_cost.md"))
    with C.recorded(C.out_path(args, "hvp_cost.md"), "hvp_cost.py", argv, "HVP cost"):
        return _run(args)


def _run(args) -> list[dict]:
    """The measurements of :func:`main` (its printed tables are what ``--out`` records)."""
    C.header("HVP cost: one Hessian-vector product / one gradient (forward+backward)", args)
    torch.manual_seed(args.seed)
    rows = []
    for label, model, bs, reps in _models(args.quick):
        reps = args.repeats or reps
        C.progress(f"hvp_cost: {label}, batch {bs}, {reps} repetitions")
        rows.append(measure(label, model, bs, reps, args.seed))
    print(
        C.table(
            [
                "model", "gradient (ms)", "autograd: first HVP incl. graph", "(graph build alone)",
                "autograd: each further HVP", "torch.func jvp-over-grad", "finite_difference given g",
                f"exact HVP ≤ {TARGET_RATIO:g}× met (further / first)",
            ],
            [
                [
                    r["model"], r["grad_ms"], r["first"], r["graph"], r["further"], r["func"], r["fd"],
                    f"{C.met(r['further'], TARGET_RATIO)} / {C.met(r['first'], TARGET_RATIO)}",
                ]
                for r in rows
            ],
        )
    )
    print(
        "\nRatios are median times over the gradient's median time (interleaved repetitions: "
        + ", ".join(f"{r['repeats']}" for r in rows)
        + "). Agreement with the autograd HVP (relative L2 error): "
        + "; ".join(f"{r['model'].split(' (')[0]}: torch.func {r['rel_func']:.1e}, FD {r['rel_fd']:.1e}" for r in rows)
        + " (FD is inexact on ReLU networks: the step crosses kinks).\n"
    )
    return rows


if __name__ == "__main__":
    main()

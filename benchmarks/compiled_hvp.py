"""Would a ``torch.compile``'d HVP make the monitors cheaper? Cost of one estimate's products, compiled or not.

The monitors use the project's exact HVP: :class:`~lyapunov_callbacks.core.hessian.HessianOperator` builds the
gradient graph once (forward + backward with ``create_graph=True``) and each product is one more backward
through it. A compiled alternative is ``torch.compile`` of ``jvp(grad(loss))`` (forward-over-reverse with
``torch.func``), which returns the gradient and one product per call and has no graph to keep. The two use
patterns of the callbacks are timed side by side (medians of interleaved repetitions):

- **1 product per graph** (``LyapunovExponentMonitor``: one tangent step per measured step);
- **8 products per graph** (a warm-started Lanczos estimate of ``HessianEigenvalueMonitor``: 4-9 HVPs in
  ``benchmarks/results/monitor_overhead.md``).

Each is printed in milliseconds and as a multiple of one gradient (forward + backward, what a training step
costs besides the optimiser). Also printed: the compile time of the first call, the time of the first call
after the batch shape changes (a recompile, e.g. a smaller last batch), and the largest relative difference
between the two products. Models: MLP 64-256-256-10 (85,002 parameters) on 8×8 digits at batch 64 and MLP
3072-512-512-2 (1,837,058 parameters) on the synthetic CIFAR stand-in at batch 128, the two models of
``monitor_overhead.py``.

Run: ``python benchmarks/compiled_hvp.py [--quick] [--threads 1] [--repeats N] [--out FILE]``; a full run writes
``benchmarks/results/compiled_hvp.md``. Needs a C++ compiler for inductor (CPU).
"""

from __future__ import annotations

import time
import warnings

import _common as C
import torch

PRODUCTS = (1, 8)


def _models(quick: bool) -> dict:
    """``name -> (model, batch)``."""
    from lyapunov_callbacks.models import MLP

    small = C.small_mlp_module(0)
    x, y = next(iter(C.digits_8x8_loader(64, 0)))
    out = {"MLP 64-256-256-10 (85,002 params), 8×8 digits, batch 64": (small, (x, y))}
    if not quick:
        torch.manual_seed(0)
        big = MLP(num_classes=2, hidden_sizes=[512, 512])
        out["MLP 3072-512-512-2 (1,837,058 params), synthetic CIFAR stand-in, batch 128"] = (
            big, C.synthetic_batch(128, num_classes=2))
    return out


def _compiled_hvp(model: torch.nn.Module):
    """``f(params, v, batch) -> (gradient dict, Hv dict)``: torch.compile of jvp(grad(loss)).

    The loss is ``model.training_loss(batch)`` evaluated functionally the way ``HessianOperator`` does it
    (``functional_call`` of the module wrapping ``loss_fn(model, batch)``, parameters named ``model.<name>``).
    """
    from torch.func import functional_call, grad, jvp

    from lyapunov_callbacks.core.hessian import _LossModule

    module = _LossModule(model, C.loss_fn)

    def loss(params, batch):
        return functional_call(module, {f"model.{k}": t for k, t in params.items()}, (batch,))

    def grad_and_hvp(params, v, batch):
        return jvp(lambda p: grad(loss)(p, batch), (params,), (v,))

    return torch.compile(grad_and_hvp, dynamic=False)


def _one_model(name: str, model, batch, repeats: int) -> tuple[list, str]:
    from lyapunov_callbacks.core.hessian import HessianOperator

    model.train()
    params = {k: p.detach() for k, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    v_flat = torch.randn(sum(p.numel() for p in params.values()), generator=gen)
    v = dict(zip(params, torch.split(v_flat, [p.numel() for p in params.values()])))
    v = {k: t.view_as(params[k]) for k, t in v.items()}
    fn = _compiled_hvp(model)
    compile_s, (_, hv_c) = C.timed(lambda: fn(params, v, batch))
    smaller = tuple(t[: max(1, t.shape[0] // 2)] for t in batch)
    recompile_s, _ = C.timed(lambda: fn(params, v, smaller))

    with torch.enable_grad(), HessianOperator(model, C.loss_fn, batch) as op:
        hv_a = op.matvec(v_flat)
    hv_c_flat = torch.cat([hv_c[k].reshape(-1) for k in params])
    rel = float((hv_c_flat - hv_a).norm() / hv_a.norm())

    def gradient():
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            C.loss_fn(model, batch).backward()
        model.zero_grad(set_to_none=True)

    def autograd(n):
        def run():
            with torch.enable_grad(), HessianOperator(model, C.loss_fn, batch) as op:
                for _ in range(n):
                    op.matvec(v_flat)
        return run

    def compiled(n):
        def run():
            for _ in range(n):
                fn(params, v, batch)
        return run

    variants = {"gradient": gradient}
    for n in PRODUCTS:
        variants[f"autograd {n}"] = autograd(n)
        variants[f"compiled {n}"] = compiled(n)
    med = C.interleaved_medians(variants, repeats)
    g = med["gradient"]
    rows = []
    for n in PRODUCTS:
        a, c = med[f"autograd {n}"], med[f"compiled {n}"]
        rows.append([name.split(" (")[0], n, 1e3 * a, a / g, 1e3 * c, c / g, a / c])
    notes = (f"- {name}: one gradient {1e3 * g:.2f} ms; compile (first call) {compile_s:.1f} s, first call on a "
             f"batch of another size (recompile) {recompile_s:.1f} s; compiled and autograd products differ by "
             f"{rel:.1e} (relative).")
    return rows, notes


def main(argv=None) -> str:
    def extra(p):
        p.add_argument("--out", default=None, help="also write the table here (full run default: "
                                                   "benchmarks/results/compiled_hvp.md)")

    args = C.parse_args("Compiled HVP against the double-backward HVP of HessianOperator.", argv, extra=extra)
    repeats = args.repeats or (5 if args.quick else 30)
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    rows, notes = [], []
    for name, (model, batch) in _models(args.quick).items():
        C.progress(f"compiled_hvp: {name}")
        r, n = _one_model(name, model, batch, repeats)
        rows += r
        notes.append(n)
    table = C.table(["model", "HVPs per graph", "autograd (ms)", "autograd / gradient", "compiled (ms)",
                     "compiled / gradient", "autograd / compiled"], rows)
    text = (f"Medians of {repeats} interleaved repetitions. \"HVPs per graph\": 1 = the λ monitor's tangent step, "
            f"8 = a warm-started Lanczos estimate; the autograd column includes the graph build, the compiled "
            f"one recomputes the gradient with every product.\n\n{table}\n\n" + "\n".join(notes) + "\n")
    C.header("Compiled HVP (torch.compile of jvp(grad)) against HessianOperator's double backward", args)
    print(text)
    out = C.out_path(args, "compiled_hvp.md")
    if out:
        C.write_results(out, "compiled_hvp.py", argv, "Compiled HVP", text,
                        f" ({time.perf_counter() - started:.0f} s), torch {torch.__version__}, "
                        f"{torch.get_num_threads()} torch threads")
    return text


if __name__ == "__main__":
    main()

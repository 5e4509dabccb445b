"""The prepared GPU check (run through ``benchmarks/gpu_check.sh``): one table of HVP costs, monitor overhead,
h0 time against PyHessian and CPU/GPU agreement, on the first CUDA device (CPU when there is none).

Rows (every time a median of interleaved repetitions, synchronised on CUDA):

- ``hvp <model>``: one HVP over one gradient (forward+backward) for the ``autograd`` backend (each further
  product on a built operator), ``finite_difference`` (given the gradient) and ``torch.func`` jvp-over-grad;
  MLP 3072-512-512-10 and LeNet1 at batch 128, ResNet18 at batch 64;
- ``monitor ResNet18 / N``: ``trainer.fit`` with ``HessianEigenvalueMonitor(every_n_steps=N)`` over the fit
  without it, N = 10 and 50 (synthetic CIFAR stand-in, batch 64, SGD);
- ``h0 vs PyHessian``: seconds of a cold ``top_hessian_eigenvalues`` (tol 1e-3) and of PyHessian's
  ``eigenvalues()`` at its defaults on LeNet1 (skipped, with a note, when PyHessian is not installed);
- ``cpu == device``: h0 of a seeded LeNet1 batch computed on the CPU and on the device (float64, tol 1e-8):
  relative difference, and whether it is within 1e-3.

``--tiny``: MLP 3072-16-10, LeNet1 and TinyResNet (in place of ResNet18) at batch 8, 6-step fits measured
every 2 / 3 steps, one repetition: runs on a CPU in seconds (the test suite runs it so the script keeps
working); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import torch  # noqa: E402
from torch.func import functional_call, grad, jvp  # noqa: E402

from lyapunov_callbacks.core.eigen import top_hessian_eigenvalues  # noqa: E402
from lyapunov_callbacks.core.hessian import HessianOperator  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def medians(fns: dict, repeats: int, device: torch.device) -> dict:
    times = {k: [] for k in fns}
    for fn in fns.values():  # warm-up (kernels, allocator)
        fn()
    for r in range(repeats):
        names = list(fns)[r % len(fns):] + list(fns)[: r % len(fns)]
        for name in names:
            sync(device)
            t = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def batch_on(size: int, device: torch.device, seed: int = 0):
    x, y = C.synthetic_batch(size, num_classes=10, seed=seed)
    return x.to(device), y.to(device)


def hvp_row(label: str, model: torch.nn.Module, size: int, device: torch.device, repeats: int) -> list:
    model = model.to(device).train()
    batch = batch_on(size, device)
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(0)).to(device)
    op = HessianOperator(model, C.loss_fn, batch, backend="autograd")
    fd = HessianOperator(model, C.loss_fn, batch, backend="finite_difference", gradient=op.gradient())
    theta = {n: p.detach() for n, p in zip(names, params)}
    buffers = dict(model.named_buffers())
    vd = {n: c.view_as(theta[n]) for n, c in zip(names, torch.split(v, [p.numel() for p in params]))}

    def loss_of(p):
        return model.loss_from_logits(functional_call(model, {**p, **{n: b.clone() for n, b in buffers.items()}},
                                                      (batch[0],)), batch[1])

    med = medians({
        "grad": lambda: torch.autograd.grad(model.training_loss(batch), params),
        "autograd": lambda: op.matvec(v),
        "fd": lambda: fd.matvec(v),
        "func": lambda: jvp(grad(loss_of), (theta,), (vd,)),
    }, repeats, device)
    op.close()
    fd.close()
    g = med["grad"]
    return [f"hvp {label} (batch {size})", f"{1e3 * g:.2f} ms", f"autograd {med['autograd'] / g:.2f}×",
            f"finite diff. {med['fd'] / g:.2f}×", f"torch.func {med['func'] / g:.2f}×"]


def monitor_rows(device: torch.device, tiny: bool, repeats: int) -> list:
    import logging

    import lightning as L

    from lyapunov_callbacks.datamodules import CIFAR10DataModule
    from lyapunov_callbacks.callbacks.hessian_monitor import HessianEigenvalueMonitor
    from lyapunov_callbacks.models import ResNet18, TinyResNet

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    size, steps, periods = (8, 6, (2, 3)) if tiny else (64, 100, (10, 50))
    net, label = (TinyResNet, "TinyResNet") if tiny else (ResNet18, "ResNet18")

    def fit(callbacks):
        torch.manual_seed(0)
        model = net(num_classes=10)
        dm = CIFAR10DataModule(synthetic=True, batch_size=size, seed=0, synthetic_train_size=max(64, 4 * size * steps),
                               synthetic_val_size=size)
        trainer = L.Trainer(max_steps=steps, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                            callbacks=callbacks)
        sync(device)
        t = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        sync(device)
        return time.perf_counter() - t

    fit([])  # warm-up
    variants = {"base": lambda: [], **{p: (lambda p=p: [HessianEigenvalueMonitor(every_n_steps=p)]) for p in periods}}
    times = {k: [] for k in variants}
    for r in range(repeats):
        for k in list(variants)[r % 3:] + list(variants)[: r % 3]:
            times[k].append(fit(variants[k]()))
    base = statistics.median(times["base"])
    return [[f"monitor {label} / {p} (batch {size}, {steps} steps)", f"fit {base:.2f} s",
             f"ratio {statistics.median(times[p]) / base:.2f}×", "", ""] for p in periods]


def pyhessian_row(device: torch.device, size: int) -> list:
    from lyapunov_callbacks.models import LeNet1

    try:
        from pyhessian import hessian as py_hessian
    except ImportError:
        return ["h0 vs PyHessian (LeNet1)", "skipped: PyHessian is not installed", "", "", ""]
    torch.manual_seed(0)
    model = LeNet1(num_classes=10).to(device).train()
    batch = batch_on(size, device)
    sync(device)
    t = time.perf_counter()
    ours = float(top_hessian_eigenvalues(model, C.loss_fn, batch, tol=1e-3).eigenvalues[0])
    sync(device)
    t_ours = time.perf_counter() - t
    import copy

    other = copy.deepcopy(model)
    t = time.perf_counter()
    comp = py_hessian(other, torch.nn.CrossEntropyLoss(), data=batch, cuda=device.type == "cuda")
    theirs = float(comp.eigenvalues()[0][0])
    sync(device)
    t_py = time.perf_counter() - t
    return ["h0 vs PyHessian (LeNet1)", f"ours {t_ours:.3f} s (h0 {ours:.5g})", f"PyHessian {t_py:.3f} s (h0 {theirs:.5g})",
            f"speed-up {t_py / t_ours:.2f}×", ""]


def agreement_row(device: torch.device, size: int) -> list:
    from lyapunov_callbacks.models import LeNet1

    values = {}
    for where in ("cpu", device.type):
        torch.manual_seed(0)
        model = LeNet1(num_classes=10).double().to(where).train()
        x, y = batch_on(size, torch.device(where))
        values[where] = float(top_hessian_eigenvalues(model, C.loss_fn, (x.double(), y), tol=1e-8, max_iter=200,
                                                      seed=0).eigenvalues[0])
    rel = abs(values["cpu"] - values[device.type]) / abs(values["cpu"])
    note = "" if device.type == "cuda" else "no GPU: CPU against itself"
    return [f"cpu == {device.type} (h0, LeNet1 float64)", f"cpu {values['cpu']:.8g}",
            f"{device.type} {values[device.type]:.8g}", f"rel. diff {rel:.1e}: {'match' if rel <= 1e-3 else 'MISMATCH'}", note]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: runs on a CPU in seconds")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from lyapunov_callbacks.models import MLP, LeNet1, ResNet18, TinyResNet

    tiny = args.tiny
    repeats = 1 if tiny else 7
    b = 8 if tiny else 128
    print(f"## GPU check: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU (no CUDA device)'}, "
          f"torch {torch.__version__}, {'TINY sizes' if tiny else 'full sizes'}\n")
    torch.manual_seed(0)
    C.progress("gpu_check: HVP costs")
    rows = [
        hvp_row("MLP 3072-16-10", MLP(num_classes=10, hidden_sizes=[16]), b, device, repeats) if tiny else
        hvp_row("MLP 3072-512-512-10", MLP(num_classes=10, hidden_sizes=[512, 512]), b, device, repeats),
        hvp_row("LeNet1", LeNet1(num_classes=10), b, device, repeats),
        hvp_row("TinyResNet", TinyResNet(num_classes=10), b, device, repeats) if tiny else
        hvp_row("ResNet18", ResNet18(num_classes=10), 64, device, repeats),
    ]
    C.progress("gpu_check: monitor overhead")
    rows += monitor_rows(device, tiny, 1 if tiny else 3)
    C.progress("gpu_check: PyHessian and CPU agreement")
    rows.append(pyhessian_row(device, b))
    rows.append(agreement_row(device, b))
    print(C.table(["row", "unit / first", "second", "third", "fourth"], rows))


if __name__ == "__main__":
    main()

"""Measure the per-step costs the full-scale plan of figures/figures.yaml is sized with.

For each architecture, single-threaded (``torch.set_num_threads(1)``, as each of ``make_figures.py --jobs``
workers runs): one SGD training step (forward, backward, update) at the scale's batch, one Hessian-vector product
(HVP, double backward) on the mini-batch and one on the probe batch. Writes ``figures/rates.json`` (read by
``make_figures.py --plan`` to predict the wall time of the plan) with the machine's load average beside it.

    python figures/rates.py                  # every architecture
    python figures/rates.py --arch mlp lenet1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RATES_PATH = Path(__file__).resolve().parent / "rates.json"
ARCHS = ("linear", "mlp", "lenet1", "tinyresnet", "resnet18")


def _model(arch: str):
    from lyapunov_callbacks import models

    cls = {"linear": models.LinearModel, "mlp": models.MLP, "lenet1": models.LeNet1,
           "tinyresnet": models.TinyResNet, "resnet18": models.ResNet18}[arch]
    return cls(num_classes=10 if arch == "resnet18" else 2, loss="ce")


def _time(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of ``fn()``: CPU time of a single-threaded process hardly depends on how many
    other processes share the cores, so it is what the plan is sized with."""
    fn()  # warm-up (allocations, first-call dispatch)
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return sorted(wall)[len(wall) // 2], sorted(cpu)[len(cpu) // 2]


def measure(arch: str, batch: int, probe: int, repeats: int) -> dict[str, float]:
    import torch

    from lyapunov_callbacks.core.hessian import HessianOperator

    torch.manual_seed(0)
    model = _model(arch)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    n_cls = 10 if arch == "resnet18" else 2

    def data(n):
        return torch.randn(n, 3, 32, 32), torch.randint(0, n_cls, (n,))

    mb, pb = data(batch), data(probe)

    def step():
        opt.zero_grad()
        model.training_loss(mb).backward()
        opt.step()

    def forward():
        with torch.no_grad():
            model.training_loss(pb)

    out = {}
    out["step_wall_s"], out["step_cpu_s"] = _time(step, repeats)
    # a forward pass without gradient over the probe batch, per sample (FullTrainLoss, validation)
    wall, cpu = _time(forward, max(1, repeats // 2))
    out["fwd_sample_wall_s"], out["fwd_sample_cpu_s"] = wall / probe, cpu / probe
    for key, b in (("hvp_batch", mb), ("hvp_probe", pb)):
        op = HessianOperator(model, lambda m, bb: m.training_loss(bb), b)
        v = torch.randn(op.dim)
        out[f"{key}_wall_s"], out[f"{key}_cpu_s"] = _time(lambda: op.matvec(v), max(1, repeats // 2))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--probe", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RATES_PATH))
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    old = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    rates = old.get("archs", {})
    for arch in args.arch:
        load = os.getloadavg()[0]
        rates[arch] = {**measure(arch, args.batch, args.probe, args.repeats if arch != "resnet18" else 2),
                       "batch": args.batch, "probe": args.probe, "threads": args.threads,
                       "load_1min": round(load, 2), "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        print(arch, json.dumps(rates[arch]), flush=True)
        Path(args.out).write_text(json.dumps({"archs": rates}, indent=1) + "\n")  # after each: keep what is done
    return 0


if __name__ == "__main__":
    sys.exit(main())

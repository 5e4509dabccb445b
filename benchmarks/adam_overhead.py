"""Wall-clock overhead of the curvature monitors under AdamW beside SGD: fit time with a monitor / plain fit.

For each optimiser — plain SGD (lr 0.1) and AdamW (lr 1e-3, weight decay 0.01) — and each model, every variant
fits a freshly initialised (same seed) ReLU MLP with cross-entropy on a fixed synthetic data set (Gaussian inputs,
labels from a random linear teacher), for ``--steps`` optimiser steps, with ``logger=False``, no validation, no
checkpointing, no progress bar and no model summary for every variant alike. Only ``trainer.fit`` is timed.

Models:

- small: MLP 64-256-256-10 on 8×8 inputs (85 k parameters), batch 64, 200 steps (a training step ≈ 1–2 ms);
- README: MLP 3072-512-512-10 (1.84 M parameters), batch 128, 100 steps (so that every-50 variants measure
  at step 50 too, where AdamW has a preconditioner), median of 2 (the small model: median of 5).

Variants (each over the plain fit of the same optimiser and model):

- ``h0 / 10`` and ``h0 / 50``: :class:`HessianEigenvalueMonitor` every 10 / 50 steps, ``pre_h0=False`` (h0 only);
- ``h0 + pre_h0 / 10`` and ``h0 + pre_h0 / 50``: the same with ``pre_h0=True`` (AdamW's default): the second,
  warm-started solve of P^{-1/2} H P^{-1/2}; for SGD (P = I) it reuses h0 and costs nothing;
- ``λ window=1 / 10``: :class:`LyapunovExponentMonitor(window=1, every_n_steps=10)`;
- ``λ continuous``: :class:`LyapunovExponentMonitor(window=20)` (one HVP every step).

The ratio is the median fit time over the plain fit's median, repetitions interleaved (one round runs every
variant once, the order rotating). The HVP columns are the mean HVPs per measurement (h0 + pre_h0) of the
first (warm-up) fit. The machine's ``uptime`` load is printed beside the numbers. Writes
``benchmarks/results/adam_overhead.md`` (``--out``).

Torch runs on one thread unless ``--threads N`` is given: on a 2-core machine shared with other work, two
OpenMP threads per process make a 1 ms step take tens of ms whenever another process holds a core (measured:
17 s instead of 0.26 s for 60 small-MLP steps at load 15), which would swamp every ratio. The default run
takes about 5 minutes on an idle machine.

Run: ``python benchmarks/adam_overhead.py [--quick] [--threads N] [--repeats N]``.
"""

from __future__ import annotations

import os
import time
import warnings

import _common as C
import torch

SGD_LR, ADAMW_LR, ADAMW_WD = 0.1, 1e-3, 0.01

#: name -> (in_features, hidden sizes, classes, batch size, steps, quick steps, repeats, quick repeats)
MODELS = {
    "small MLP 64-256-256-10, batch 64": (64, (256, 256), 10, 64, 200, 40, 5, 1),
    "README MLP 3072-512-512-10, batch 128": (3072, (512, 512), 10, 128, 100, 10, 2, 1),
}


def _module(in_features: int, hidden: tuple[int, ...], classes: int, optimizer: str, seed: int):
    import lightning as L
    from torch import nn

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(seed)
            layers: list[nn.Module] = []
            width = in_features
            for h in hidden:
                layers += [nn.Linear(width, h), nn.ReLU()]
                width = h
            self.net = nn.Sequential(*layers, nn.Linear(width, classes))

        def training_loss(self, batch):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def training_step(self, batch, batch_idx):
            return self.training_loss(batch)

        def configure_optimizers(self):
            if optimizer == "SGD":
                return torch.optim.SGD(self.parameters(), lr=SGD_LR)
            return torch.optim.AdamW(self.parameters(), lr=ADAMW_LR, weight_decay=ADAMW_WD)

    return Net()


def _loader(in_features: int, classes: int, batch: int, steps: int, seed: int):
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(seed)
    n = batch * steps  # one epoch of distinct batches
    x = torch.randn(n, in_features, generator=g)
    teacher = torch.randn(in_features, classes, generator=g) / in_features**0.5
    y = (x @ teacher + 0.5 * torch.randn(n, classes, generator=g)).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def _hvp_counter(monitor):
    """A callback (placed after ``monitor``) that lists the HVPs of each measurement: h0 solve + pre_h0 solve."""
    import lightning as L

    class CountHVPs(L.Callback):
        def __init__(self) -> None:
            self.hvps: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = monitor.last_metrics
            if m and monitor._last_step == trainer.global_step - 1:  # measured at this step
                self.hvps.append(m["hessian/num_hvps"] + m.get("hessian/pre_num_hvps", 0.0))

    return CountHVPs()


def _variants():
    from lyapunov_callbacks.callbacks.hessian_monitor import HessianEigenvalueMonitor
    from lyapunov_callbacks.callbacks.lyapunov_monitor import LyapunovExponentMonitor

    def h0(every: int, pre: bool):
        return lambda: [HessianEigenvalueMonitor(every_n_steps=every, pre_h0=pre)]

    return {
        "plain fit": lambda: [],
        "h0 / 10": h0(10, False),
        "h0 + pre_h0 / 10": h0(10, True),
        "h0 / 50": h0(50, False),
        "h0 + pre_h0 / 50": h0(50, True),
        "λ window=1 / 10": lambda: [LyapunovExponentMonitor(window=1, every_n_steps=10)],
        "λ continuous": lambda: [LyapunovExponentMonitor(window=20)],
    }


def _fit(model_spec, optimizer: str, callbacks: list, seed: int, steps: int) -> float:
    import lightning as L

    in_features, hidden, classes, batch = model_spec[:4]
    model = _module(in_features, hidden, classes, optimizer, seed)
    loader = _loader(in_features, classes, batch, steps, seed)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(model, loader)
    return time.perf_counter() - start


def main(argv=None) -> int:
    def extra(parser):
        parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "adam_overhead.md"))

    args = C.parse_args(__doc__.splitlines()[0], argv, extra)
    if args.threads is None:
        torch.set_num_threads(1)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    variants = _variants()
    lines = [
        "## Monitor overhead under AdamW beside SGD (`benchmarks/adam_overhead.py`)\n",
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads = {torch.get_num_threads()}, "
        f"{'QUICK run' if args.quick else 'full run'}, seed {args.seed}. SGD lr {SGD_LR}; AdamW lr {ADAMW_LR}, "
        f"weight decay {ADAMW_WD}. Monitors at their defaults otherwise (tol 1e-2, current batch).\n",
        f"Load before: `{C.uptime()}`\n",
    ]
    for model_name, spec in MODELS.items():
        steps = spec[5] if args.quick else spec[4]
        repeats = args.repeats or (spec[7] if args.quick else spec[6])
        dim = sum(p.numel() for p in _module(*spec[:3], "SGD", 0).parameters())
        hvps: dict[tuple[str, str], float] = {}
        runs = {}
        for opt in ("SGD", "AdamW"):
            for name, make in variants.items():
                runs[(opt, name)] = (lambda make=make, opt=opt: _fit(spec, opt, make(), args.seed, steps))
            for name in variants:  # warm-up fit of each variant, counting the HVPs of the h0 monitors
                callbacks = variants[name]()
                counters = [_hvp_counter(cb) for cb in callbacks if type(cb).__name__ == "HessianEigenvalueMonitor"]
                _fit(spec, opt, callbacks + counters, args.seed, steps)
                if counters and counters[0].hvps:
                    hvps[(opt, name)] = sum(counters[0].hvps) / len(counters[0].hvps)
        C.progress(f"{model_name}: {len(runs)} variants × {repeats} interleaved repeats, {steps} steps")
        medians = C.interleaved_medians({f"{o}|{n}": f for (o, n), f in runs.items()}, repeats, warmup=0)
        rows = []
        for name in variants:
            row = [name]
            for opt in ("SGD", "AdamW"):
                base = medians[f"{opt}|plain fit"]
                row.append(f"{base / steps * 1e3:.2f} ms/step" if name == "plain fit" else medians[f"{opt}|{name}"] / base)
            row += [hvps.get(("SGD", name), float("nan")), hvps.get(("AdamW", name), float("nan"))]
            rows.append(row)
        lines.append(f"### {model_name}: {dim:,} parameters, {steps} steps, median of {repeats}\n")
        lines.append(C.table(["variant", "SGD fit / plain", "AdamW fit / plain", "HVPs/estimate SGD",
                              "HVPs/estimate AdamW"], rows))
        lines.append("")
    lines.append(f"Load after: `{C.uptime()}`\n")
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Quasi-Newton LR (1/h0) against constant learning rates: training loss after a fixed number of steps, and cost.

For the MLP and LeNet-1 on the synthetic two-class CIFAR stand-in (``CIFAR10DataModule(synthetic=True,
classes=[3, 5])``, no files needed), trains the same initial weights with plain SGD for ``--steps`` steps at
constant LR 0.05, 0.1, 0.3 and with :class:`~lyapunov_callbacks.callbacks.quasi_newton.QuasiNewtonLR` (warm-up, then h0
re-estimated on the current batch every 10 steps as in the configs, or every 2 steps), all in one process, one
after the other. Reports the full training-set loss at the end, the last LR, the fit wall-clock time and its
ratio to the constant-LR 0.1 fit of the same model (the quasi-Newton overhead: warm-up plus a few HVPs per
re-estimate). Prints a markdown table and, for a full run, writes it to ``--out`` (default
``benchmarks/results/quasi_newton_training.md``, the file the READMEs quote). About 1-3 minutes on a 2-core CPU
with the defaults.

Usage::

    python benchmarks/quasi_newton_training.py [--quick] [--threads N] [--steps 150] [--batch-size 128] [--loss ce]
        [--out FILE]

``--quick``: 30 steps, constant LR 0.1 and quasi-Newton every 10 steps only (a smoke run of a minute; no file
unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import _common as C
import lightning as L
import torch
from torch.utils.data import DataLoader

from lyapunov_callbacks.datamodules import CIFAR10DataModule
from lyapunov_callbacks.callbacks.quasi_newton import QuasiNewtonLR
from lyapunov_callbacks.models import MLP, LeNet1

CONSTANT_LRS = (0.05, 0.1, 0.3)
#: The constant LR whose fit time is the denominator of the time ratio.
REFERENCE_LR = 0.1
#: Re-estimation periods of the quasi-Newton runs: the configs' 10, and 2 (less lag behind a fast-moving h0).
QN_EVERY_N_STEPS = (10, 2)


def _full_train_loss(model: torch.nn.Module, dataset) -> float:
    loader = DataLoader(dataset, batch_size=1024, shuffle=False)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for images, labels in loader:
            total += float(model.training_loss((images, labels))) * len(labels)
            count += len(labels)
    return total / count


def _fit(build, lr: float | None, steps: int, batch_size: int, every_n_steps: int = 10):
    """Train a fresh ``build()`` model (seeded init); ``lr=None`` means quasi-Newton re-estimating h0 every
    ``every_n_steps`` steps. Returns (full training loss, last LR, fit seconds, callbacks)."""
    L.seed_everything(0, verbose=False)
    model = build()
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=lr if lr is not None else 0.1)
    dm = CIFAR10DataModule(synthetic=True, classes=[3, 5], batch_size=batch_size, download=False)
    callbacks = [QuasiNewtonLR(every_n_steps=every_n_steps)] if lr is None else []
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    dm.setup("fit")
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    elapsed = time.perf_counter() - start
    last_lr = trainer.optimizers[0].param_groups[0]["lr"]
    return _full_train_loss(model, dm.train_set), last_lr, elapsed, callbacks


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="optimiser steps per fit (default 150)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--loss", choices=("ce", "mse"), default="ce", help="loss of both models (default ce)")
    parser.add_argument("--quick", action="store_true", help="30 steps, LR 0.1 and quasi-Newton every 10 only")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) before measuring")
    parser.add_argument("--out", default=None,
                        help="also write the table here (default for a full run: benchmarks/results/quasi_newton_training.md)")
    args = parser.parse_args(argv)
    out = C.out_path(args, "quasi_newton_training.md")
    started = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    steps = 30 if args.quick and args.steps == 150 else args.steps
    constant_lrs = (REFERENCE_LR,) if args.quick else CONSTANT_LRS
    qn_periods = QN_EVERY_N_STEPS[:1] if args.quick else QN_EVERY_N_STEPS
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|LeafSpec|max_epochs=-1).*")

    models = {
        "MLP [512, 512]": lambda: MLP(num_classes=2, loss=args.loss),
        "LeNet-1": lambda: LeNet1(num_classes=2, loss=args.loss),
    }
    rows = [
        "| model | LR rule | train loss after {} steps | last LR | fit time (s) | time / constant {} |".format(
            steps, REFERENCE_LR
        ),
        "|---|---|---|---|---|---|",
    ]
    for name, build in models.items():
        results = {}
        for lr in constant_lrs:
            results[f"constant {lr}"] = _fit(build, lr, steps, args.batch_size)
        for every in qn_periods:
            results[f"quasi-Newton 1/h0 every {every} steps"] = _fit(build, None, steps, args.batch_size, every)
        reference_time = results[f"constant {REFERENCE_LR}"][2]
        for rule, (loss, last_lr, elapsed, callbacks) in results.items():
            if callbacks:
                qn = callbacks[0]
                rule += f" (warm-up {qn.rule.warmup_hvps} HVPs, {qn.total_hvps} in all)"
            loss_text = f"{loss:.4f}" if math.isfinite(loss) else "diverged (nan)"
            rows.append(
                f"| {name} | {rule} | {loss_text} | {last_lr:.4g} | {elapsed:.1f} | {elapsed / reference_time:.2f} |"
            )
    table = "\n".join(rows)
    header = (f"Synthetic two-class CIFAR (classes [3, 5]), loss {args.loss}, batch {args.batch_size}, "
              f"{torch.get_num_threads()} torch threads, torch {torch.__version__}.")
    print(header + "\n")
    print(table)
    if out:
        C.write_results(out, "quasi_newton_training.py", argv, "Quasi-Newton LR against constant LRs",
                        f"{header}\n\n{table}\n", f" ({time.perf_counter() - started:.0f} s)")
    return table


if __name__ == "__main__":
    main()

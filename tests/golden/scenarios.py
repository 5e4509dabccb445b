"""Short seeded fits that cover every callback and the options users set, for the golden record.

Each scenario trains a small float64 network on fixed data and returns every scalar the loggers were given, as
``[[step, {tag: value}], ...]`` in logging order. ``records.json`` beside this file holds the values of the code
the record was made with; ``tests/test_golden.py`` runs each scenario again and compares. Regenerate (only when a
change of behaviour is intended, in a commit that names it) with::

    .venv/bin/python tests/golden/scenarios.py --write          # all scenarios
    .venv/bin/python tests/golden/scenarios.py --write adam_qn  # one
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lyapunov_callbacks import HessianEigenvalueMonitor, LyapunovExponentMonitor, QuasiNewtonLR

RECORDS = Path(__file__).with_name("records.json")
SAMPLES, BATCH = 48, 8  # 6 optimiser steps per epoch


class FileRecorder(Logger):
    """Every ``log_metrics`` call, in order; with ``path`` also appended to a JSON-lines file (for spawned
    DDP workers, whose loggers live in another process)."""

    def __init__(self, path: str | None = None) -> None:
        super().__init__()
        self.path = path
        self.records: list[list[Any]] = []

    @property
    def name(self) -> str:
        return "golden"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        # Rank zero only, like Lightning's own loggers: two ranks appending to one file would race.
        row = [step, {k: float(v) for k, v in sorted(metrics.items())}]
        self.records.append(row)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


class Net(L.LightningModule):
    """A float64 tanh MLP on fixed data; ``optimizer`` names what ``configure_optimizers`` returns."""

    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        self.optimizer = optimizer

    def training_loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def training_step(self, batch, batch_idx):
        loss = self.training_loss(batch)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        if self.optimizer == "sgd_momentum":
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-2)
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(SAMPLES, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (SAMPLES,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def _trainer(root: str, logger: Logger, callbacks: list, **kwargs: Any) -> L.Trainer:
    settings = dict(
        accelerator="cpu", max_steps=12, logger=logger, callbacks=callbacks, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=root, log_every_n_steps=1,
    )
    settings.update(kwargs)
    return L.Trainer(**settings)


def _fit(callbacks: list, optimizer: str = "sgd", **kwargs: Any) -> list:
    logger = FileRecorder()
    with tempfile.TemporaryDirectory() as root:
        _trainer(root, logger, callbacks, **kwargs).fit(Net(optimizer))
    return logger.records


def sgd_momentum() -> list:
    """SGD with momentum, QN (momentum-aware, Rayleigh trigger) and both monitors with k = 3."""
    return _fit([
        QuasiNewtonLR(every_n_steps=4, momentum_aware=True, rayleigh_every=3, warmup_max_hvps=60),
        HessianEigenvalueMonitor(every_n_steps=3, k=3),
        LyapunovExponentMonitor(window=2),
    ], "sgd_momentum")


def sgd_options() -> list:
    """Plain SGD through the other solvers, finite differences, the probe batch, the edge rule, windows."""
    return _fit([
        QuasiNewtonLR(rule="edge", smoothing=0.3, method="power", hvp="finite_difference", batch="fixed",
                      probe_size=16, every_n_steps=5, warmup_max_hvps=40),
        HessianEigenvalueMonitor(every_n_steps=2, method="power", hvp="finite_difference", batch="fixed",
                                 probe_size=16),
        HessianEigenvalueMonitor(every_n_steps=3, method="lyapunov", prefix="lyap_solver", warm_start=False),
        LyapunovExponentMonitor(window=2, every_n_steps=4, hvp="finite_difference"),
        LyapunovExponentMonitor(window=3, prefix="operator_path", reuse_training_graph=False),
    ])


def adamw() -> list:
    """AdamW with both monitors: pre_h0, the batch sharpness, k = 2, the Adam tangent."""
    return _fit([
        HessianEigenvalueMonitor(every_n_steps=3, k=2, pre_h0=True, batch_sharpness=True),
        LyapunovExponentMonitor(window=3),
    ], "adamw")


def adam_qn() -> list:
    """QN with Adam (its warm-up before Adam has state) beside the monitor's pre_h0."""
    return _fit([
        QuasiNewtonLR(every_n_steps=4, warmup_max_hvps=60),
        HessianEigenvalueMonitor(every_n_steps=1, batch_sharpness=True),
        LyapunovExponentMonitor(window=2),
    ], "adam")


def accumulate() -> list:
    """``accumulate_grad_batches=2``: every measurement is of the mean of the step's two micro-batches."""
    return _fit([
        QuasiNewtonLR(every_n_steps=2, warmup_max_hvps=60),
        HessianEigenvalueMonitor(every_n_steps=2, k=2),
        LyapunovExponentMonitor(window=2),
    ], "sgd_momentum", accumulate_grad_batches=2, max_steps=6)


def resumed() -> list:
    """Fit one epoch with a checkpoint, then resume for a second: what the resumed fit logs."""
    def callbacks():
        return [QuasiNewtonLR(every_n_steps=4, warmup_max_hvps=60), HessianEigenvalueMonitor(every_n_steps=3),
                LyapunovExponentMonitor(window=2)]

    with tempfile.TemporaryDirectory() as root:
        ckpt = ModelCheckpoint(dirpath=root, save_last=True, every_n_epochs=1)
        first = FileRecorder()
        _trainer(root, first, callbacks() + [ckpt], max_steps=-1, max_epochs=1,
                 enable_checkpointing=True).fit(Net("sgd_momentum"))
        second = FileRecorder()
        _trainer(root, second, callbacks(), max_steps=-1, max_epochs=2).fit(
            Net("sgd_momentum"), ckpt_path=ckpt.last_model_path
        )
    return first.records + second.records


def ddp() -> list:
    """Two CPU processes (gloo, spawn), each its own shard of every batch: what rank 0's loggers get."""
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "records.jsonl")
        logger = FileRecorder(path)
        callbacks = [QuasiNewtonLR(every_n_steps=4, warmup_max_hvps=60),
                     HessianEigenvalueMonitor(every_n_steps=3, k=2), LyapunovExponentMonitor(window=2)]
        try:
            _trainer(root, logger, callbacks, strategy="ddp_spawn", devices=2, max_steps=6).fit(
                Net("sgd_momentum")
            )
        finally:  # the launcher leaves MASTER_ADDR/MASTER_PORT behind
            os.environ.clear()
            os.environ.update(env)
        with open(path) as f:
            return [json.loads(line) for line in f]


SCENARIOS: dict[str, Callable[[], list]] = {
    f.__name__: f for f in (sgd_momentum, sgd_options, adamw, adam_qn, accumulate, resumed, ddp)
}


def run(name: str) -> list:
    """The scenario's records, as JSON would give them back (so a fresh run compares with the stored one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order for every reduction, on any core count
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return json.loads(json.dumps(SCENARIOS[name]()))
    finally:
        torch.set_num_threads(threads)  # tests that run after this one keep the process' setting


def differences(stored: list, fresh: list) -> list[str]:
    """Every way ``fresh`` differs from ``stored`` (steps, tags, values bit for bit; NaN equals NaN)."""
    out = []
    if len(stored) != len(fresh):
        out.append(f"{len(fresh)} log calls, stored {len(stored)}")
    for i, ((s_step, s), (f_step, f)) in enumerate(zip(stored, fresh)):
        if s_step != f_step or sorted(s) != sorted(f):
            out.append(f"call {i}: step {f_step} tags {sorted(f)}, stored step {s_step} tags {sorted(s)}")
            continue
        for tag, value in s.items():
            other = f[tag]
            if not (value == other or (math.isnan(value) and math.isnan(other))):
                out.append(f"call {i} step {s_step} {tag}: {other!r}, stored {value!r}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(SCENARIOS))
    parser.add_argument("--write", action="store_true", help="store the fresh records (else: compare)")
    args = parser.parse_args()
    stored = json.loads(RECORDS.read_text()) if RECORDS.exists() else {}
    for name in args.names:
        fresh = run(name)
        if args.write:
            stored[name] = fresh
            print(f"{name}: {len(fresh)} log calls stored")
        else:
            diff = differences(stored[name], fresh)
            print(f"{name}: {'equal bit for bit' if not diff else f'{len(diff)} differences'}")
            for line in diff[:20]:
                print("   ", line)
    if args.write:
        RECORDS.write_text(json.dumps(stored, indent=0, sort_keys=True) + "\n")


if __name__ == "__main__":
    sys.exit(main())

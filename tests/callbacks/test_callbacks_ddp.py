"""The monitors under DDP (2 CPU processes, gloo): h0 of the DDP-averaged Hessian equals one process on the union of
the shards, and every rank logs identical values."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from lyapunov_callbacks.callbacks._lightning import resolve_loss_fn
from lyapunov_callbacks.core.eigen import top_hessian_eigenvalues
from lyapunov_callbacks.callbacks.hessian_monitor import HessianEigenvalueMonitor
from lyapunov_callbacks.callbacks.lyapunov_monitor import LyapunovExponentMonitor

WORLD_SIZE = 2
PER_RANK_BATCH = 4


def _dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    return TensorDataset(x, torch.randint(0, 3, (16,), generator=g))


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()

    def training_loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def training_step(self, batch, batch_idx):
        return self.training_loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        # Built in the worker, where the process group exists: unshuffled interleaved shards that differ by rank
        # (Lightning's own injected sampler would shuffle; use_distributed_sampler=False keeps this one).
        data = _dataset()
        return DataLoader(data, batch_size=PER_RANK_BATCH, sampler=DistributedSampler(data, shuffle=False))


class Dump(L.Callback):
    """After the monitors: writes this rank's weights, batch and the monitors' latest values to ``out``."""

    def __init__(self, out: str, hessian: HessianEigenvalueMonitor, lyapunov: LyapunovExponentMonitor) -> None:
        self.out, self.hessian, self.lyapunov = out, hessian, lyapunov

    def _find(self, trainer):
        # the callbacks were pickled into this worker: find this process' copies by type
        return (
            next(c for c in trainer.callbacks if isinstance(c, HessianEigenvalueMonitor)),
            next(c for c in trainer.callbacks if isinstance(c, LyapunovExponentMonitor)),
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        hessian, _ = self._find(trainer)
        step = trainer.global_step
        self.pending = None
        if step % hessian.every_n_steps == 0:  # the pre-step weights; the monitor measures before the step
            self.pending = {
                "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                "batch": [t.detach().clone() for t in batch],
            }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        hessian, lyapunov = self._find(trainer)
        step = trainer.global_step - 1
        if self.pending is not None:
            self.pending["metrics"] = dict(hessian.last_metrics)
            torch.save(self.pending, Path(self.out) / f"hessian_rank{trainer.global_rank}_step{step}.pt")
        torch.save(
            {"metrics": dict(lyapunov.last_metrics), "delta": lyapunov.tangent.delta_theta.clone()},
            Path(self.out) / f"lyapunov_rank{trainer.global_rank}_step{step}.pt",
        )


@pytest.mark.slow
def test_ddp_h0_equals_single_process_on_union_and_ranks_agree(tmp_path):
    env = dict(os.environ)
    hessian = HessianEigenvalueMonitor(every_n_steps=2, tol=1e-10, max_iter=60)
    lyapunov = LyapunovExponentMonitor(window=2)
    trainer = L.Trainer(
        strategy="ddp_spawn", accelerator="cpu", devices=WORLD_SIZE, max_steps=4,
        callbacks=[hessian, lyapunov, Dump(str(tmp_path), hessian, lyapunov)], use_distributed_sampler=False,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    try:
        trainer.fit(Net())
    finally:  # the launcher leaves MASTER_ADDR/MASTER_PORT behind
        os.environ.clear()
        os.environ.update(env)

    for step in (0, 2):
        r0, r1 = (torch.load(tmp_path / f"hessian_rank{r}_step{step}.pt") for r in range(WORLD_SIZE))
        for k in r0["weights"]:
            assert torch.equal(r0["weights"][k], r1["weights"][k])
        assert not torch.equal(r0["batch"][0], r1["batch"][0])  # the shards differ
        # all ranks logged identical values
        assert r0["metrics"] == r1["metrics"] and r0["metrics"]["hessian/h0"] > 0
        # one process on the union: for equal shard sizes, mean of the per-rank mean losses = mean over the union
        model = Net()
        model.load_state_dict(r0["weights"])
        union = [torch.cat([a, b]) for a, b in zip(r0["batch"], r1["batch"])]
        ref = top_hessian_eigenvalues(model, resolve_loss_fn(model), union, tol=1e-10, max_iter=60)
        assert r0["metrics"]["hessian/h0"] == pytest.approx(float(ref.eigenvalues[0]), rel=1e-5)
        single = top_hessian_eigenvalues(model, resolve_loss_fn(model), r0["batch"], tol=1e-10, max_iter=60)
        assert abs(float(single.eigenvalues[0]) / float(ref.eigenvalues[0]) - 1) > 1e-3  # not one shard's h0

    for step in (1, 3):  # λ logged at the end of each window of 2, identical (and δ identical) on both ranks
        l0, l1 = (torch.load(tmp_path / f"lyapunov_rank{r}_step{step}.pt") for r in range(WORLD_SIZE))
        assert l0["metrics"] == l1["metrics"] and "lyapunov/lambda" in l0["metrics"]
        assert torch.equal(l0["delta"], l1["delta"])

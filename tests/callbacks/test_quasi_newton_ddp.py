"""``QuasiNewtonLR`` under DDP (2 CPU processes, gloo): every rank sets the same LR as one process on the union."""

import json
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lyapunov_callbacks.callbacks.quasi_newton import QuasiNewtonLR

WORLD_SIZE = 2
PER_RANK_BATCH = 8
NUM_STEPS = 5


def _data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(WORLD_SIZE * PER_RANK_BATCH * NUM_STEPS, 6, generator=g, dtype=torch.float64)
    # Targets depend nonlinearly on x, so the shards (interleaved samples) differ in curvature.
    y = torch.sin(2.0 * x[:, 0]) + x[:, 1] ** 2
    return TensorDataset(x, y)


class TanhRegression(L.LightningModule):
    """A small smooth float64 network, MSE; with ``distributed`` each rank reads its own shard (no shuffling)."""

    def __init__(self, batch_size: int, distributed: bool):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        self.batch_size, self.distributed = batch_size, distributed

    def training_loss(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self.net(x).squeeze(-1), y)

    def training_step(self, batch, batch_idx):
        return self.training_loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        data = _data()
        if not self.distributed:
            return DataLoader(data, batch_size=self.batch_size, shuffle=False)
        # DistributedSampler(shuffle=False) gives rank r the samples r, r+2, ...: the union of the step-s batches
        # of both ranks is the contiguous block of the single-process batch s (batch size 2 × per rank).
        sampler = DistributedSampler(
            data, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)


class LRToFile(Callback):
    """Writes ``{step: lr}`` of the optimiser at each step to ``<folder>/lr_rank<r>.json``."""

    def __init__(self, folder: str):
        self.folder = folder
        self.lrs: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs[trainer.global_step] = optimizer.param_groups[0]["lr"]

    def on_train_end(self, trainer, pl_module):
        with open(os.path.join(self.folder, f"lr_rank{trainer.global_rank}.json"), "w") as f:
            json.dump(self.lrs, f)


def _fit(strategy, devices, batch_size, folder):
    qn = QuasiNewtonLR(every_n_steps=1, tol=1e-8, warmup_tol=1e-8, warmup_max_hvps=100, max_iter=100)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=NUM_STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[qn, LRToFile(str(folder))],
    )
    trainer.fit(TanhRegression(batch_size, distributed=devices > 1))


@pytest.mark.slow
def test_ddp_ranks_set_identical_lr_equal_to_single_process_on_union(tmp_path):
    saved_env = dict(os.environ)
    try:
        ddp_dir = tmp_path / "ddp"
        ddp_dir.mkdir()
        _fit("ddp_spawn", WORLD_SIZE, PER_RANK_BATCH, ddp_dir)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    single_dir = tmp_path / "single"
    single_dir.mkdir()
    _fit("auto", 1, WORLD_SIZE * PER_RANK_BATCH, single_dir)

    ranks = [json.loads((ddp_dir / f"lr_rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    single = json.loads((single_dir / "lr_rank0.json").read_text())
    assert sorted(map(int, single)) == list(range(NUM_STEPS))
    assert ranks[0] == ranks[1]  # bit-identical LR on every rank at every step
    for step, lr in single.items():
        assert ranks[0][step] == pytest.approx(lr, rel=1e-4), step
    # The LR really follows h0 along the trajectory (it is not a constant that would pass trivially).
    assert len(set(single.values())) == NUM_STEPS

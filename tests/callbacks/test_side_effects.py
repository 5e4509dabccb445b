"""Measuring must not change training: with the monitors attached a seeded fit ends bit-for-bit where it ends without."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lyapunov_callbacks.callbacks.hessian_monitor import HessianEigenvalueMonitor
from lyapunov_callbacks.callbacks.lyapunov_monitor import LyapunovExponentMonitor


class SmallCNN(L.LightningModule):
    """Conv-BatchNorm-ReLU-Dropout-Linear on 1×6×6 images: BatchNorm running statistics and dropout RNG both in play."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(), nn.Linear(48, 3)
        )

    def training_loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def training_step(self, batch, batch_idx):
        loss = self.training_loss(batch)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _fit(callbacks) -> tuple[SmallCNN, L.Trainer, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(40, 1, 6, 6, generator=g), torch.randint(0, 3, (40,), generator=g))
    torch.manual_seed(123)
    model = SmallCNN()
    trainer = L.Trainer(
        max_epochs=3, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, log_every_n_steps=1,
    )
    trainer.fit(model, DataLoader(data, batch_size=4, shuffle=True))  # 10 shuffled steps per epoch
    return model, trainer, torch.get_rng_state()


def _tensors(model: nn.Module, trainer: L.Trainer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in model.state_dict().items()}  # parameters AND buffers
    out.update({f"grad.{n}": p.grad for n, p in model.named_parameters() if p.grad is not None})
    opt = trainer.optimizers[0]
    for i, p in enumerate(opt.param_groups[0]["params"]):
        for k, v in opt.state[p].items():
            out[f"optim.{i}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return out


@pytest.fixture(scope="module")
def baseline():
    return _fit([])


@pytest.mark.parametrize("hessian_batch", ["fixed", "current"])
def test_monitors_leave_training_bitwise_unchanged(baseline, hessian_batch):
    ref_model, ref_trainer, ref_rng = baseline
    hessian = HessianEigenvalueMonitor(every_n_steps=3, k=2, batch=hessian_batch, probe_size=8)
    lyapunov = LyapunovExponentMonitor(window=4, every_n_steps=None if hessian_batch == "fixed" else 5)
    model, trainer, rng = _fit([hessian, lyapunov])

    # the monitors did measure
    assert hessian.state_dict()["tracker"]["num_estimates"] == 10  # steps 0, 3, ..., 27
    assert lyapunov.tangent.num_steps == (30 if hessian_batch == "fixed" else 24)
    assert "hessian/h1" in trainer.callback_metrics and "lyapunov/lambda" in trainer.callback_metrics

    ref, got = _tensors(ref_model, ref_trainer), _tensors(model, trainer)
    assert ref.keys() == got.keys()
    assert any("running_mean" in k for k in ref) and any("momentum_buffer" in k for k in ref)
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    assert trainer.global_step == ref_trainer.global_step == 30
    assert torch.equal(rng, ref_rng)  # the global RNG stream too

"""First-days papercuts: two writers of one tag or of the LR refused at setup, the parameters an optimiser lacks
named, the LR a LearningRateMonitor logs under QuasiNewtonLR, and the step pairing that scores checkpoints by h0."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, StochasticWeightAveraging
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lyapunov_callbacks import HessianEigenvalueMonitor, LyapunovExponentMonitor, QuasiNewtonLR
from recording_logger import RecordingLogger


class RecordingSGD(torch.optim.SGD):
    """SGD that records the LR of its first param group at each ``step()``: the LR each step really used."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.used: list[float] = []

    def step(self, closure=None):
        loss = super().step(closure)
        self.used.append(float(self.param_groups[0]["lr"]))
        return loss


class TanhMLP(L.LightningModule):
    """Float64 tanh MLP with mean cross-entropy; ``optimise`` picks the layers the optimiser holds."""

    def __init__(self, lr: float = 0.1, optimise: str = "all") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()
        self.lr, self.optimise = lr, optimise

    def training_loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def training_step(self, batch, batch_idx):
        return self.training_loss(batch)

    def configure_optimizers(self):
        params = self.net[2].parameters() if self.optimise == "last" else self.parameters()
        self.opt = RecordingSGD(params, lr=self.lr)
        return self.opt


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 4, generator=g, dtype=torch.float64)
    return TensorDataset(x, torch.randint(0, 3, (48,), generator=g))


def _trainer(callbacks, logger=False, max_steps=6, **kw) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps, callbacks=callbacks, logger=logger, enable_checkpointing=kw.pop("checkpointing", False),
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
        num_sanity_val_steps=0, log_every_n_steps=kw.pop("log_every_n_steps", 1000), **kw,
    )


# ------------------------------------------------------------------------------------------ one writer per tag


@pytest.mark.parametrize(
    "callbacks, match",
    [
        ([HessianEigenvalueMonitor(), HessianEigenvalueMonitor(k=2)],
         r"HessianEigenvalueMonitor\(prefix='hessian'\) and HessianEigenvalueMonitor\(prefix='hessian'\) would both "
         r"write the tags 'hessian/\.\.\.'.*different `prefix`"),
        ([LyapunovExponentMonitor(window=2), LyapunovExponentMonitor(window=3)],
         r"LyapunovExponentMonitor\(prefix='lyapunov'\) and LyapunovExponentMonitor.*different `prefix`"),
        # a monitor under QuasiNewtonLR's prefix would log quasi_newton/h0 beside QuasiNewtonLR's own
        ([QuasiNewtonLR(), HessianEigenvalueMonitor(prefix="quasi_newton")],
         r"QuasiNewtonLR\(prefix='quasi_newton'\) and HessianEigenvalueMonitor\(prefix='quasi_newton'\)"),
        ([QuasiNewtonLR(), QuasiNewtonLR(prefix="qn_b")],
         r"Two QuasiNewtonLR callbacks.*one owner: keep one QuasiNewtonLR"),
        ([QuasiNewtonLR(), StochasticWeightAveraging(swa_lrs=0.05)],
         r"QuasiNewtonLR and StochasticWeightAveraging both set the learning rate.*one owner"),
    ],
    ids=["two-hessian-monitors", "two-lyapunov-monitors", "monitor-on-quasi-newton-prefix", "two-quasi-newton",
         "quasi-newton-and-swa"],
)
def test_second_writer_of_a_tag_or_of_the_lr_is_refused_at_setup(callbacks, match):
    model = TanhMLP()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = _trainer(callbacks)
    with pytest.raises(ValueError, match=match):
        trainer.fit(model, DataLoader(_data(), batch_size=8))
    assert trainer.global_step == 0  # refused before any step
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_distinct_prefixes_run_side_by_side():
    rec = RecordingLogger()
    monitors = [HessianEigenvalueMonitor(every_n_steps=2, tol=1e-10, dtype="float64"),
                HessianEigenvalueMonitor(every_n_steps=2, tol=1e-10, dtype="float64", prefix="hessian_b")]
    _trainer(monitors, logger=rec, max_steps=3).fit(TanhMLP(), DataLoader(_data(), batch_size=8))
    a, b = rec.series("hessian/h0"), rec.series("hessian_b/h0")
    assert sorted(a) == sorted(b) == [0, 2]
    assert [a[s] for s in a] == pytest.approx([b[s] for s in a], rel=1e-8)  # same weights, same batch


# ------------------------------------------------------------------------------------------ λ monitor message


def test_lyapunov_monitor_names_the_parameters_the_optimiser_lacks():
    trainer = _trainer([LyapunovExponentMonitor(window=2)])
    with pytest.raises(ValueError) as err:
        trainer.fit(TanhMLP(optimise="last"), DataLoader(_data(), batch_size=8))
    message = str(err.value)
    assert "does not update 2 of them: net.0.weight, net.0.bias." in message
    assert "Use torch.optim.SGD, Adam or AdamW" not in message  # the optimiser is SGD: its type is not the problem
    assert "requires_grad_(False)" in message and "self.parameters()" in message


# ------------------------------------------------------------------------------------------ LearningRateMonitor


@pytest.mark.parametrize("interval", [None, "step"])
def test_learning_rate_monitor_logs_the_lr_each_step_used(interval):
    rec = RecordingLogger()
    model = TanhMLP(lr=0.1)
    lr_monitor = LearningRateMonitor(logging_interval=interval)
    qn = QuasiNewtonLR(every_n_steps=2, warmup_tol=1e-6, dtype="float64")
    _trainer([lr_monitor, qn], logger=rec, max_steps=7, log_every_n_steps=1).fit(
        model, DataLoader(_data(), batch_size=8)  # 6 batches an epoch: epoch 1 starts at step 6
    )
    logged = [(step, m["lr-RecordingSGD"]) for step, m in rec.records if "lr-RecordingSGD" in m]
    used = model.opt.used
    assert len(used) == 7 and used[0] != 0.1  # the configured LR is never used
    assert {step for step, _ in logged} == set(range(7))
    for step, lr in logged:
        assert lr == used[step], (step, lr, used[step])
    assert [s for s, _ in logged].count(0) == (2 if interval is None else 1)  # epoch start and batch start
    # the monitor's hooks are the class's again after the fit
    assert "on_train_batch_start" not in vars(lr_monitor) and "on_train_epoch_start" not in vars(lr_monitor)


# ------------------------------------------------------------------------------------------ checkpoints by h0


def _exact_h0(state: dict, batch) -> float:
    """Top eigenvalue of the dense Hessian of the mean cross-entropy at the weights of ``state``."""
    model = TanhMLP()
    model.load_state_dict(state)
    named = list(model.net.named_parameters())
    flat = torch.cat([p.detach().flatten() for _, p in named])

    def loss_of(v):
        chunks, i = {}, 0
        for name, p in named:
            chunks[name] = v[i : i + p.numel()].view(p.shape)
            i += p.numel()
        return nn.functional.cross_entropy(torch.func.functional_call(model.net, chunks, (batch[0],)), batch[1])

    return float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat))[-1])


def test_checkpoint_by_h0_recipe_pairs_each_file_with_its_weights(tmp_path):
    n = 3
    data = _data()
    rec = RecordingLogger()
    monitor = HessianEigenvalueMonitor(every_n_steps=n, batch="fixed", probe_size=16, tol=1e-10, dtype="float64")
    recipe = ModelCheckpoint(dirpath=tmp_path / "all", every_n_train_steps=n, save_top_k=-1, filename="{step}")
    scored = ModelCheckpoint(dirpath=tmp_path / "scored", monitor="hessian/h0", mode="min",
                             every_n_train_steps=n, save_top_k=-1, filename="{step}")
    trainer = _trainer([monitor, recipe, scored], logger=rec, max_steps=10, checkpointing=True)
    with pytest.warns(UserWarning, match=r"ModelCheckpoint\(monitor='hessian/h0'\).*earlier weights"):
        trainer.fit(TanhMLP(lr=0.5), DataLoader(data, batch_size=8, shuffle=True))

    probe = [data[i] for i in monitor._probe.indices]
    batch = (torch.stack([p[0] for p in probe]), torch.stack([p[1] for p in probe]))
    logged = rec.series("hessian/h0")
    assert sorted(logged) == [0, 3, 6, 9]
    files = sorted((tmp_path / "all").glob("step=*.ckpt"))
    assert [f.name for f in files] == ["step=3.ckpt", "step=6.ckpt", "step=9.ckpt"]
    exact = {}
    for f in files:
        ckpt = torch.load(f, weights_only=False)
        exact[ckpt["global_step"]] = _exact_h0(ckpt["state_dict"], batch)
    # the recipe: the h0 logged at step s is the h0 of the weights in step=s.ckpt
    for step in (3, 6, 9):
        assert logged[step] == pytest.approx(exact[step], rel=1e-8)
    best = min((s for s in logged if s > 0), key=logged.get)
    assert exact[best] == min(exact[s] for s in (3, 6, 9))
    # the lag it avoids: ModelCheckpoint(monitor=...) scored step=s.ckpt with the h0 logged at s - n
    scores = {int(p.rsplit("step=", 1)[1].split(".")[0]): float(v) for p, v in scored.best_k_models.items()}
    assert sorted(scores) == [3, 6, 9]
    for step, score in scores.items():
        assert score == pytest.approx(logged[step - n], rel=1e-6)  # callback_metrics holds float32
        assert abs(score - exact[step]) > 1e-3 * exact[step]  # not the h0 of the weights it holds

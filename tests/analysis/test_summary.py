"""Tests of lyapunov_callbacks.analysis.summary: statistics and verdicts computed from logs written by short real fits."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lyapunov_callbacks.analysis import summary
from lyapunov_callbacks.analysis.tb_reader import Scalar, read_scalars

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

N_SAMPLES, N_FEATURES, N_OUT = 64, 6, 2
STEPS = 12


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_SAMPLES, N_FEATURES, generator=g, dtype=torch.float64)
    x[:, 0] *= 3.0  # a well-separated top eigenvalue
    y = torch.randint(0, N_OUT, (N_SAMPLES,), generator=g)
    return x, y


def _mse(out, y):
    return ((out - torch.nn.functional.one_hot(y, N_OUT).to(out.dtype)) ** 2).sum(dim=1).mean()


def exact_h0() -> float:
    """Top eigenvalue of the full-batch MSE Hessian of a linear model: constant in the weights (a quadratic)."""
    x, y = _data()
    params = torch.zeros(N_OUT * N_FEATURES + N_OUT, dtype=torch.float64)

    def loss(p):
        w, b = p[: N_OUT * N_FEATURES].view(N_OUT, N_FEATURES), p[N_OUT * N_FEATURES:]
        return _mse(x @ w.T + b, y)

    return float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, params))[-1])


def fit(tmp_path: Path, name: str, lr: float) -> tuple[Path, "torch.nn.Module", list[float]]:
    """A full-batch linear least-squares fit with the figure runs' monitors, logging to tmp_path/name/seed0."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from figures.epoch_loss import FullTrainLoss
    from lyapunov_callbacks import HessianEigenvalueMonitor, LyapunovExponentMonitor

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(N_FEATURES, N_OUT).double()
            self.losses: list[float] = []

        def training_loss(self, batch):
            x, y = batch
            return _mse(self.layer(x), y)

        def training_step(self, batch, batch_idx):
            loss = self.training_loss(batch)
            self.losses.append(loss.item())
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

    torch.manual_seed(0)
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=N_SAMPLES)
    logger = TensorBoardLogger(str(tmp_path), name=name, version="seed0")
    trainer = L.Trainer(
        max_steps=STEPS, logger=logger, log_every_n_steps=1, accelerator="cpu", devices=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[HessianEigenvalueMonitor(every_n_steps=2, tol=1e-6, dtype="float64"),
                   LyapunovExponentMonitor(window=2, every_n_steps=4), FullTrainLoss(batch_size=16)],
    )
    model = Tiny()
    trainer.fit(model, loader)
    return Path(logger.log_dir), model, model.losses


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    root = tmp_path_factory.mktemp("logs")
    h0 = exact_h0()
    # α·h0 = 1 (the paper's point) and 1.9 (near the edge of stability); 2.5 diverges
    return root, h0, {ratio: fit(root, f"constant/linear_mse_lr{ratio / h0:.6g}", ratio / h0) for ratio in (1.0, 1.9, 2.5)}


def test_describe_run():
    assert summary.describe_run("constant/mlp_ce_lr0.1") == summary.RunInfo("constant/mlp_ce_lr0.1", "mlp", "ce",
                                                                            "constant", 0.1)
    assert summary.describe_run("cyclic/tinyresnet_mse").schedule == "cyclic"
    assert summary.describe_run("quasi_newton/lenet1_ce").lr is None
    assert summary.describe_run("resnet18_comparison/constant_lr0.05") == summary.RunInfo(
        "resnet18_comparison/constant_lr0.05", "resnet18", "ce", "constant", 0.05)
    assert summary.describe_run("resnet18_comparison/quasi_newton").schedule == "quasi_newton"
    with pytest.raises(ValueError, match="adam/mlp_ce"):
        summary.describe_run("adam/mlp_ce")


def test_divergence_step():
    steps = np.arange(6)
    assert summary.divergence_step(Scalar(steps, np.array([1.0, 0.9, 0.8, 0.7, 0.6, 0.5]))) is None
    assert summary.divergence_step(Scalar(steps, np.array([1.0, 2.0, 11.0, np.nan, 1.0, 1.0]))) == 2
    assert summary.divergence_step(Scalar(steps, np.array([1.0, 2.0, 3.0, np.inf, 1.0, 1.0]))) == 3
    assert summary.divergence_step(None) is None


def test_run_stats_from_a_real_fit(fits):
    root, h0, runs = fits
    log_dir, model, losses = runs[1.0]
    stats = summary.run_stats(read_scalars(log_dir))
    assert stats["steps"] == STEPS  # FullTrainLoss logs the end of fit at step 12
    assert stats["diverged_at"] is None
    assert stats["loss_first"] == pytest.approx(losses[0], rel=1e-6)
    # α·h0 = 1 at every estimate: h0 is that of the quadratic, the exact eigvalsh value
    assert stats["alpha_h0_minibatch"] == pytest.approx(1.0, rel=1e-5)
    assert stats["inv_h0_minibatch"] == pytest.approx(1.0 / h0, rel=1e-5)
    assert stats["n_h0_minibatch"] == 1  # estimates at steps 0, 2, .., 10; the late window is steps >= 8.4
    assert math.isnan(stats["alpha_h0_probe"]) and stats["n_h0_probe"] == 0
    # the share of rising mini-batch losses, from the losses the model saw (full batch: a decreasing quadratic)
    d = np.diff(np.float32(losses))
    assert stats["loss_rise_frac"] == pytest.approx(float((d > 0).mean()))
    # the full-training-set loss at every epoch start (full batch: one step an epoch) equals the loss the step
    # after it saw, and at the end the trained model's loss
    x, y = _data()
    with torch.no_grad():
        final = float(_mse(model.layer(x), y))
    assert stats["full_loss_steps"] == list(range(STEPS + 1))
    np.testing.assert_allclose(stats["full_loss"][:STEPS], np.float32(losses), rtol=1e-6)
    assert stats["full_loss"][-1] == pytest.approx(final, rel=1e-6)
    assert stats["full_loss_rises"] == 0
    lam = read_scalars(log_dir)["lyapunov/lambda"]
    # λ: every estimate kept for the distribution, the statistics from the late window (steps >= 8.4) only
    assert stats["lambda_values"] == pytest.approx(lam.values.tolist())
    assert stats["lambda_steps"] == lam.steps.tolist()
    assert stats["lambda_n"] == int((lam.steps >= 0.7 * STEPS).sum())


def test_diverging_fit_and_verdicts(fits, tmp_path, monkeypatch):
    root, h0, runs = fits
    div = summary.run_stats(read_scalars(runs[2.5][0]))
    # α·h0 = 2.5 on a quadratic: the error grows by |1 - 2.5| = 1.5 a step, the loss by 2.25: > 10x at step 3
    losses = runs[2.5][2]
    first_over = next(i for i, v in enumerate(np.float32(losses)) if v > 10 * np.float32(losses[0]))
    assert div["diverged_at"] == first_over
    records = summary.collect([(f"constant/linear_mse_lr{r / h0:.6g}", root / f"constant/linear_mse_lr{r / h0:.6g}")
                               for r in (1.0, 1.9, 2.5)] + [("constant/linear_mse_lr9", root / "absent")])
    assert len(records) == 3 and {r.seed for r in records} == {"seed0"}
    verdicts = {(v["claim"][0], v["h0"]): v for v in summary.verdicts(summary.aggregate(records),
                                                                      {records[0].info.name: "fig4"})}
    a, b = verdicts[("A", "minibatch")], verdicts[("B", "minibatch")]
    # α·h0 = 1 sides with A only, 1.9 with B only (boundary √2); but one late estimate each (12 steps, h0 every
    # 2): neither is settled, so neither claim is judged on them
    assert a["verdict"] == b["verdict"] == "not settled"
    assert "1 [1 seed; late q10–q90 1–1; n=1] → not settled (1 late estimates < 10)" in a["evidence"]
    assert "1.9 [1 seed; late q10–q90 1.9–1.9; n=1] → not settled" in a["evidence"]
    assert a["counts"] == {"not settled": 2, "diverged": 1}
    assert "diverged at step" in a["diverged"] and a["figures"] == "fig4"
    assert verdicts[("A", "probe")]["verdict"] == "no data"
    rows = {r["name"]: r for r in summary.aggregate(records)}
    assert summary.ab_side(rows[records[0].info.name]["alpha_h0_minibatch"]) == "A"
    assert summary.ab_side(rows[records[1].info.name]["alpha_h0_minibatch"]) == "B"

    paths = summary.write_summary(records, tmp_path / "results", "synthetic", meta={"mode": "test"})
    payload = json.loads(paths["json"].read_text())
    assert payload["thresholds"] == summary.THRESHOLDS and len(payload["runs"]) == 3
    assert paths["csv"].read_text().splitlines()[0].startswith("name,seeds,steps,alpha,alpha_h0_minibatch")
    md = paths["md"].read_text()
    assert "| A: α·h0 ≈ 1 (paper) | linear | mse | minibatch | not settled |" in md
    page = summary.render_results_page(tmp_path / "results", tmp_path / "figures", tmp_path / "results.md")
    text = page.read_text()
    assert "## Data set: synthetic" in text and "| linear | mse | not settled | no data | not settled |" in text
    assert ("- **A (α·h0 ≈ 1, the paper)**, minibatch h0: architecture/loss pairs: 1 not settled; runs: "
            "2 not settled, 1 diverged.") in text
    assert summary.NOT_RUN.format(data="digits") in text and summary.NOT_RUN.format(data="cifar") in text
    # the page recomputes the verdicts from the per-seed records with the current rules
    assert summary.verdicts(summary.payload_rows(payload)) == payload["verdicts"]

    # make_figures passes the page as a relative path and the figures root as an absolute one: the image links
    # must still be relative to the page (an absolute /home/... link is broken everywhere else).
    (tmp_path / "figures" / "synthetic").mkdir(parents=True)
    (tmp_path / "figures" / "synthetic" / "fig1.png").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    text = summary.render_results_page("results", tmp_path / "figures", "results.md").read_text()
    assert "![fig1](figures/synthetic/fig1.png)" in text


def test_full_train_loss_rejects_bad_arguments():
    from figures.epoch_loss import FullTrainLoss

    with pytest.raises(ValueError, match="max_batches=0"):
        FullTrainLoss(max_batches=0)
    with pytest.raises(ValueError, match="batch_size=1.5"):
        FullTrainLoss(batch_size=1.5)


def test_divergence_evidence_counts_the_seeds():
    # near the edge of stability one seed can diverge and another not: the evidence says how many did, and where
    assert summary._divergence({"name": "cyclic/x", "diverged_at": [12]}) == "cyclic/x diverged at step 12"
    assert (summary._divergence({"name": "cyclic/x", "diverged_at": [None, 854, 84]})
            == "cyclic/x diverged in 2 of 3 seeds, at steps 84, 854")
    assert (summary._divergence({"name": "cyclic/x", "diverged_at": [None, 7, None]})
            == "cyclic/x diverged in 1 of 3 seeds, at step 7")

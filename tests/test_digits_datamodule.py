"""Tests of lyapunov_callbacks.datamodules.DigitsDataModule: scikit-learn's real 8x8 digits shaped as 3x32x32 images."""

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from lyapunov_callbacks.datamodules import DIGITS_MEAN, DIGITS_STD, DigitsDataModule
from lyapunov_callbacks.datamodules.digits import load_digits_images


def _setup(**kwargs):
    dm = DigitsDataModule(**kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _epoch_labels(loader):
    return torch.cat([y for _, y in loader]).tolist()


def test_images_are_the_upsampled_digits():
    images, labels = load_digits_images()
    raw = load_digits()
    assert images.shape == (1797, 3, 32, 32) and images.dtype == torch.float32
    assert labels.tolist() == raw.target.tolist()
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    # Reference: separable linear interpolation at source coordinates (i + 0.5) / 4 - 0.5, clamped to the
    # image (bilinear with align_corners=False), with np.interp along rows, then columns.
    src = np.clip((np.arange(32) + 0.5) / 4.0 - 0.5, 0.0, 7.0)
    for index in (0, 5, 1796):
        small = raw.images[index] / 16.0
        rows = np.stack([np.interp(src, np.arange(8), small[r]) for r in range(8)])  # [8, 32]
        ref = np.stack([np.interp(src, np.arange(8), rows[:, c]) for c in range(32)], axis=1)  # [32, 32]
        np.testing.assert_allclose(images[index, 0].numpy(), ref, atol=1e-6)
    # The normalisation constants are the statistics of these images.
    assert images.mean().item() == pytest.approx(DIGITS_MEAN[0], abs=1e-4)
    assert images.std().item() == pytest.approx(DIGITS_STD[0], abs=1e-4)


def test_shapes_split_and_normalisation():
    dm = _setup(batch_size=64)
    assert dm.num_classes == 10
    assert (len(dm.train_set), len(dm.val_set)) == (1438, 359)  # round(0.2 * 1797) = 359 held out
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    everything = torch.cat([x for x, _ in dm.train_dataloader()] + [x for x, _ in dm.val_dataloader()])
    assert everything.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert everything.std().item() == pytest.approx(1.0, abs=1e-3)
    assert sorted(len(b[1]) for b in dm.train_dataloader()) == [30] + [64] * 22  # drop_last=False
    raw = _setup(normalize=False)
    assert raw.train_set[0][0].min() >= 0 and raw.train_set[0][0].max() <= 1
    assert _epoch_labels(dm.test_dataloader()) == dm.val_set.labels.tolist()  # held-out set, fixed order
    assert _setup(val_fraction=0.0).val_dataloader() == []


def test_split_is_seeded_and_partitions_the_data():
    a, b, c = _setup(seed=0), _setup(seed=0), _setup(seed=1)
    assert torch.equal(a.val_set.images, b.val_set.images) and torch.equal(a.train_set.labels, b.train_set.labels)
    assert not torch.equal(a.val_set.labels, c.val_set.labels)
    union = torch.cat([a.train_set.images, a.val_set.images]).flatten(1)
    images, _ = load_digits_images()
    key = lambda t: sorted(map(bytes, t.numpy()))  # noqa: E731
    assert key(union) == key(images.flatten(1))


def test_class_selection_relabels_in_given_order():
    images, labels = load_digits_images()
    dm = _setup(classes=[7, 1], val_fraction=0.0)
    assert dm.num_classes == 2
    keep = (labels == 7) | (labels == 1)
    assert torch.equal(dm.train_set.images, images[keep])
    assert torch.equal(dm.train_set.labels, (labels[keep] == 1).long())  # 7 -> 0, 1 -> 1
    assert torch.bincount(dm.train_set.labels).tolist() == [179, 182]


@pytest.mark.parametrize("noise", [0.1, 0.3])
def test_label_noise_flips_the_stated_fraction_of_training_labels(noise):
    clean = _setup(classes=[3, 5, 8])
    noisy = _setup(classes=[3, 5, 8], label_noise=noise)
    assert torch.equal(clean.train_set.images, noisy.train_set.images)
    changed = noisy.train_set.labels != clean.train_set.labels
    n = len(clean.train_set)
    assert int(changed.sum()) == round(noise * n)
    assert torch.equal(changed, noisy.flipped)
    assert set(noisy.train_set.labels.tolist()) == {0, 1, 2}
    assert torch.equal(noisy.val_set.labels, clean.val_set.labels)  # validation labels stay clean
    again = _setup(classes=[3, 5, 8], label_noise=noise)
    assert torch.equal(again.train_set.labels, noisy.train_set.labels)  # seeded
    other = _setup(classes=[3, 5, 8], label_noise=noise, seed=1)
    assert int((other.train_set.labels != _setup(classes=[3, 5, 8], seed=1).train_set.labels).sum()) == round(
        noise * n
    )
    assert not torch.equal(other.flipped, noisy.flipped)
    assert int(_setup(classes=[3, 5, 8]).flipped.sum()) == 0


def test_shuffle_order_is_a_function_of_seed_and_epoch_and_global_rng_untouched():
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    dm = _setup(classes=[0, 1], batch_size=50, label_noise=0.2)
    loader = dm.train_dataloader()
    orders = [_epoch_labels(loader) for _ in range(3)]
    assert orders[0] != orders[1]
    fresh = _setup(classes=[0, 1], batch_size=50, label_noise=0.2).train_dataloader()
    fresh.sampler.set_epoch(2)
    assert _epoch_labels(fresh) == orders[2]
    for _ in dm.val_dataloader():
        pass
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(classes=[3, 10]), ValueError, "classes"),
        (dict(classes=[3]), ValueError, "classes"),
        (dict(classes=[3, 3]), ValueError, "classes"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(label_noise=1.0), ValueError, "label_noise"),
        (dict(label_noise=-0.1), ValueError, "label_noise"),
        (dict(label_noise="0.1"), TypeError, "label_noise"),
        (dict(val_fraction=1.0), ValueError, "val_fraction"),
        (dict(seed=0.5), TypeError, "seed"),
    ],
)
def test_invalid_arguments_raise_at_construction(kwargs, error, pattern):
    with pytest.raises(error, match=f"`{pattern}`"):
        DigitsDataModule(**kwargs)


def test_trainer_fit_learns_real_digits(tmp_path):
    class Linear(L.LightningModule):
        def __init__(self, num_classes):
            super().__init__()
            self.layer = torch.nn.Linear(3072, num_classes)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm = DigitsDataModule(classes=[0, 1, 2], batch_size=32, data_dir="ignored")
    torch.manual_seed(0)
    model = Linear(dm.num_classes)
    L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
              default_root_dir=tmp_path).fit(model, datamodule=dm)
    x, y = zip(*dm.val_dataloader())
    with torch.no_grad():
        acc = (model.layer(torch.cat(x).flatten(1)).argmax(1) == torch.cat(y)).float().mean().item()
    # Real digits 0/1/2 are easy for a linear model: measured 1.0 after two epochs (0.33 is chance).
    assert acc > 0.9
    assert dm.hparams.classes == [0, 1, 2] and "data_dir" not in dm.hparams


@pytest.mark.filterwarnings("ignore:.*does not have many workers", "ignore::DeprecationWarning")
def test_any_run_file_trains_on_digits_through_the_cli(tmp_path, monkeypatch):
    """What `make train DATA=digits` runs: the run file, then configs/data/digits.yaml swapped in."""
    from pathlib import Path

    from lyapunov_callbacks.cli import run_cli

    monkeypatch.setattr("sys.argv", ["lyapunov-cli"])
    root = Path(__file__).resolve().parents[1] / "configs"
    cli = run_cli([
        "fit", "--config", str(root / "constant" / "linear_ce_lr0.1.yaml"),
        "--data", str(root / "data" / "digits.yaml"), "--data.init_args.data_dir", "data",
        "--trainer.fast_dev_run", "true", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
    ])  # fmt: skip
    assert isinstance(cli.datamodule, DigitsDataModule)
    assert cli.datamodule.classes == [3, 5] and cli.model.num_classes == 2  # the run file's cat/dog -> digits 3/5
    assert cli.trainer.global_step == 1

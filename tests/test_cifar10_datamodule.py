"""Tests of datamodules.CIFAR10DataModule on fake CIFAR-10 files and on the synthetic stand-in."""

import hashlib
import os
import pickle
import re
import urllib.error
import warnings

import lightning as L
import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
from torch.utils.data import DataLoader

import datamodules.cifar10 as cifar_module
from cifar_files import read_images, read_labels, write_fake_cifar10
from datamodules import CIFAR10_MEAN, CIFAR10_STD, CIFAR10DataModule, synthetic_cifar10

MEAN = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
STD = torch.tensor(CIFAR10_STD).view(3, 1, 1)
MD5_WARNING = "not the official CIFAR-10 files"


def _setup(stage="fit", **kwargs):
    """A set-up DataModule; the md5 warning of the fake files is expected and silenced here."""
    dm = CIFAR10DataModule(**kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*" + MD5_WARNING)
        dm.prepare_data()
        dm.setup(stage)
    return dm


def _raw(dataset):
    """The stored uint8 images and labels of one of the DataModule's datasets."""
    return dataset.images, dataset.labels


def _all_batches(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


# ------------------------------------------------------------------------------------------ real-format files
def test_fake_files_load_through_torchvision(cifar_dir):
    dm = CIFAR10DataModule(cifar_dir, download=False, val_fraction=0.0, batch_size=64)
    with pytest.warns(UserWarning, match=MD5_WARNING):
        dm.setup("fit")
    images, labels = _raw(dm.train_set)
    np.testing.assert_array_equal(images.numpy(), read_images(cifar_dir, train=True))
    assert labels.tolist() == read_labels(cifar_dir, train=True)
    assert images.shape == (200, 3, 32, 32) and images.dtype == torch.uint8
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.int64
    assert sorted(len(b[1]) for b in dm.train_dataloader()) == [8, 64, 64, 64]  # drop_last=False
    assert dm.val_dataloader() == []  # val_fraction=0: no validation
    # The narrow md5 bypass is undone after construction.
    assert tv_cifar.check_integrity is cifar_module.check_integrity


def test_class_selection_relabels_in_given_order(cifar_dir):
    dm = _setup("fit", data_dir=cifar_dir, download=False, classes=[5, 3], val_fraction=0.0)
    dm.setup("test")
    assert dm.num_classes == 2
    for dataset, train in ((dm.train_set, True), (dm.test_set, False)):
        written = np.array(read_labels(cifar_dir, train=train))
        keep = np.isin(written, [5, 3])
        images, labels = _raw(dataset)
        expected = np.where(written[keep] == 5, 0, 1)
        assert labels.tolist() == expected.tolist()
        np.testing.assert_array_equal(images.numpy(), read_images(cifar_dir, train=train)[keep])
    # 40 balanced images per training batch -> 4 per class per batch; 60 test images -> 6 per class.
    assert torch.bincount(dm.train_set.labels).tolist() == [20, 20]
    assert torch.bincount(dm.test_set.labels).tolist() == [6, 6]


def test_normalisation_on_constant_images(tmp_path):
    root = write_fake_cifar10(tmp_path, n_per_batch=10, n_test=10)
    values = [0, 128, 255]
    data = np.repeat(np.array(values, dtype=np.uint8)[:, None], 3072, axis=1)
    with open(os.path.join(root, "cifar-10-batches-py", "test_batch"), "wb") as f:
        pickle.dump({"data": data, "labels": [0, 1, 2], "batch_label": "b", "filenames": ["a", "b", "c"]}, f)
    for normalize in (True, False):
        dm = _setup("test", data_dir=root, download=False, normalize=normalize, batch_size=8)
        x, y = _all_batches(dm.test_dataloader())
        assert y.tolist() == [0, 1, 2]
        for i, v in enumerate(values):
            expected = (v / 255.0 - MEAN) / STD if normalize else torch.full((3, 1, 1), v / 255.0)
            torch.testing.assert_close(x[i], expected.expand(3, 32, 32).float(), rtol=0, atol=1e-6)
    # Pixel value 255 in channel 0: (1 - 0.4914) / 0.2470 = 2.0591...
    dm = _setup("test", data_dir=root, download=False)
    assert dm.test_set[2][0][0, 0, 0].item() == pytest.approx((1 - 0.4914) / 0.2470, abs=1e-6)


def test_validation_split_sizes_and_determinism(cifar_dir):
    all_images = torch.from_numpy(read_images(cifar_dir))
    a = _setup(data_dir=cifar_dir, download=False, val_fraction=0.1, seed=0)
    assert (len(a.train_set), len(a.val_set)) == (180, 20)
    b = _setup(data_dir=cifar_dir, download=False, val_fraction=0.1, seed=0)
    assert torch.equal(a.val_set.images, b.val_set.images) and torch.equal(a.train_set.labels, b.train_set.labels)
    c = _setup(data_dir=cifar_dir, download=False, val_fraction=0.1, seed=1)
    assert not torch.equal(a.val_set.images, c.val_set.images)
    # Train and validation partition the training split: sorted rows of the union equal the written rows.
    union = torch.cat([a.train_set.images, a.val_set.images]).flatten(1)
    key = lambda t: sorted(map(bytes, t.numpy()))  # noqa: E731
    assert key(union) == key(all_images.flatten(1))
    assert len(_setup(data_dir=cifar_dir, download=False, val_fraction=0.25).val_set) == 50
    sel = _setup(data_dir=cifar_dir, download=False, classes=[3, 5], val_fraction=0.1)
    assert (len(sel.train_set), len(sel.val_set)) == (36, 4)
    assert set(sel.val_set.labels.tolist()) <= {0, 1}


def test_use_test_as_val(cifar_dir):
    dm = _setup(data_dir=cifar_dir, download=False, use_test_as_val=True, val_fraction=0.1, batch_size=25)
    assert len(dm.train_set) == 200 and len(dm.val_set) == 60
    x, y = _all_batches(dm.val_dataloader())
    assert y.tolist() == read_labels(cifar_dir, train=False)
    raw = torch.from_numpy(read_images(cifar_dir, train=False)).float() / 255.0
    torch.testing.assert_close(x, (raw - MEAN) / STD)


def test_loaders_order(cifar_dir):
    def epoch_labels(loader):
        return torch.cat([y for _, y in loader]).tolist()

    a = _setup(data_dir=cifar_dir, download=False, seed=0, batch_size=32)
    b = _setup(data_dir=cifar_dir, download=False, seed=0, batch_size=32)
    c = _setup(data_dir=cifar_dir, download=False, seed=3, batch_size=32)
    loader = a.train_dataloader()
    first, second = epoch_labels(loader), epoch_labels(loader)
    assert first == epoch_labels(b.train_dataloader())  # same seed, same shuffle
    assert first != second  # reshuffled every epoch
    assert first != epoch_labels(c.train_dataloader())  # another seed, another split and shuffle
    assert sorted(first) == sorted(a.train_set.labels.tolist())
    assert epoch_labels(a.val_dataloader()) == a.val_set.labels.tolist()  # not shuffled


def test_augmentation_only_on_training_images(cifar_dir):
    dm = _setup(data_dir=cifar_dir, download=False, augment=True, seed=0)
    torch.manual_seed(0)
    plain = (dm.train_set.images.float() / 255.0 - MEAN) / STD
    augmented = torch.stack([dm.train_set[i][0] for i in range(len(dm.train_set))])
    assert augmented.shape == plain.shape
    assert (augmented != plain).flatten(1).any(1).float().mean() > 0.5
    val = torch.stack([dm.val_set[i][0] for i in range(len(dm.val_set))])
    torch.testing.assert_close(val, (dm.val_set.images.float() / 255.0 - MEAN) / STD)


# ------------------------------------------------------------------------------------------ synthetic stand-in
def test_synthetic_shapes_determinism_and_classes():
    kw = dict(synthetic=True, synthetic_train_size=1000, synthetic_val_size=200, batch_size=100)
    a = _setup(**kw)
    b = _setup(**kw)
    assert torch.equal(a.train_set.images, b.train_set.images) and torch.equal(a.val_set.labels, b.val_set.labels)
    assert not torch.equal(a.train_set.images, _setup(seed=1, **kw).train_set.images)
    assert (len(a.train_set), len(a.val_set)) == (1000, 200)
    assert torch.bincount(a.train_set.labels).tolist() == [100] * 10
    assert not torch.equal(a.train_set.images[:200], a.val_set.images)  # independent held-out split
    x, y = next(iter(a.train_dataloader()))
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    sel = _setup(classes=[3, 5], **kw)
    sel.setup("test")
    assert (len(sel.train_set), len(sel.val_set), len(sel.test_set)) == (200, 40, 40)
    assert torch.bincount(sel.train_set.labels).tolist() == [100, 100]
    # Same images as the ten-class data, class 3 -> 0 and class 5 -> 1.
    keep = (a.train_set.labels == 3) | (a.train_set.labels == 5)
    assert torch.equal(sel.train_set.images, a.train_set.images[keep])
    assert torch.equal(sel.train_set.labels, (a.train_set.labels[keep] == 5).long())
    # The function itself is a pure function of the generator.
    im1, lb1 = synthetic_cifar10(20, torch.Generator().manual_seed(7))
    im2, lb2 = synthetic_cifar10(20, torch.Generator().manual_seed(7))
    assert torch.equal(im1, im2) and torch.equal(lb1, lb2) and im1.dtype == torch.uint8


def test_synthetic_two_class_logistic_regression_learns():
    dm = _setup(synthetic=True, classes=[0, 1], synthetic_train_size=5000, synthetic_val_size=1000, batch_size=100)
    x_val, y_val = _all_batches(dm.val_dataloader())
    weight = torch.zeros(2, 3072, requires_grad=True)
    bias = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([weight, bias], lr=0.01)

    def val_loss_acc():
        with torch.no_grad():
            logits = x_val.flatten(1) @ weight.T + bias
            loss = torch.nn.functional.cross_entropy(logits, y_val).item()
            return loss, (logits.argmax(1) == y_val).float().mean().item()

    loss0, acc0 = val_loss_acc()
    history = []
    for epoch in range(3):
        for step, (x, y) in enumerate(dm.train_dataloader()):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(x.flatten(1) @ weight.T + bias, y).backward()
            opt.step()
            if epoch == 0 and step == 0:
                history.append(val_loss_acc())
        history.append(val_loss_acc())
    # Measured (seed 0): ln 2 -> 0.653 after one step (acc 0.67) -> 0.526, 0.449, 0.393 after epochs 1-3 (acc 0.86).
    assert loss0 == pytest.approx(np.log(2.0), abs=1e-6) and acc0 == 0.5  # zero weights: chance
    one_step_loss, one_step_acc = history[0]
    assert one_step_loss > 0.6 and one_step_acc < 0.75  # not solved by one step
    losses = [h[0] for h in history[1:]]
    assert losses[0] > losses[1] > losses[2]  # keeps improving over the epochs
    assert losses[2] < 0.65 * loss0 and history[-1][1] > 0.8


# ------------------------------------------------------------------------------------------ validation errors
@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(classes=[3, 10]), ValueError, "classes"),
        (dict(classes=[-1, 2]), ValueError, "classes"),
        (dict(classes=[3, 3]), ValueError, "classes"),
        (dict(classes=[3]), ValueError, "classes"),
        (dict(classes=[3, "5"]), TypeError, "classes"),
        (dict(classes=[3.0, 5]), TypeError, "classes"),
        (dict(classes="35"), TypeError, "classes"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(batch_size=2.5), TypeError, "batch_size"),
        (dict(num_workers=-1), ValueError, "num_workers"),
        (dict(val_fraction=1.0), ValueError, "val_fraction"),
        (dict(val_fraction=-0.1), ValueError, "val_fraction"),
        (dict(synthetic_train_size=0), ValueError, "synthetic_train_size"),
        (dict(synthetic_val_size=-5), ValueError, "synthetic_val_size"),
        (dict(seed=1.5), TypeError, "seed"),
    ],
)
def test_invalid_arguments_raise_at_construction(kwargs, error, pattern):
    with pytest.raises(error, match=f"`{pattern}`"):
        CIFAR10DataModule(**kwargs)


def test_val_fraction_too_small_for_the_data(cifar_dir):
    dm = CIFAR10DataModule(cifar_dir, download=False, classes=[3, 5], val_fraction=0.01)
    with pytest.warns(UserWarning, match=MD5_WARNING), pytest.raises(ValueError, match="val_fraction"):
        dm.setup("fit")


def test_num_classes_and_hparams_right_after_init():
    assert CIFAR10DataModule().num_classes == 10
    dm = CIFAR10DataModule(classes=[3, 5], batch_size=32)
    assert dm.num_classes == 2
    assert dm.hparams.classes == [3, 5] and dm.hparams.batch_size == 32 and dm.hparams.synthetic is False
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()


# ------------------------------------------------------------------------------------------ missing / odd files
def test_missing_data_offline_error_names_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar_module, "download_and_extract_archive", _no_network)
    dm = CIFAR10DataModule(tmp_path / "nowhere", download=False)
    folder = os.path.join(str(tmp_path), "nowhere", "cifar-10-batches-py")
    for call in (dm.prepare_data, lambda: dm.setup("fit")):
        with pytest.raises(FileNotFoundError, match=re.escape(folder)) as info:
            call()
        assert "download=True" in str(info.value) and "synthetic=True" in str(info.value)


def _no_network(*args, **kwargs):
    raise AssertionError("no download may be attempted here")


def test_failed_download_error(tmp_path, monkeypatch):
    calls = []

    def fail(url, root, **kwargs):
        calls.append((url, root, kwargs))
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(cifar_module, "download_and_extract_archive", fail)
    dm = CIFAR10DataModule(tmp_path, download=True)
    with pytest.raises(RuntimeError, match="network") as info:
        dm.prepare_data()
    assert "synthetic=True" in str(info.value)
    assert os.path.join(str(tmp_path), "cifar-10-batches-py") in str(info.value)
    expected_kwargs = {"filename": "cifar-10-python.tar.gz", "md5": tv_cifar.CIFAR10.tgz_md5}
    assert calls == [(tv_cifar.CIFAR10.url, str(tmp_path), expected_kwargs)]


def test_existing_files_never_download(cifar_dir, monkeypatch):
    monkeypatch.setattr(cifar_module, "download_and_extract_archive", _no_network)
    dm = CIFAR10DataModule(cifar_dir, download=True)
    dm.prepare_data()  # would raise through _no_network
    with pytest.warns(UserWarning, match=MD5_WARNING):
        dm.setup("fit")
    assert len(dm.train_set) == 180
    CIFAR10DataModule(synthetic=True, download=True).prepare_data()


def test_official_checksums_load_without_warning(cifar_dir, monkeypatch):
    def md5(name):
        with open(os.path.join(cifar_dir, "cifar-10-batches-py", name), "rb") as f:
            return hashlib.md5(f.read()).hexdigest()

    cls = tv_cifar.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[n, md5(n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5(n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", dict(cls.meta, md5=md5("batches.meta")))
    dm = CIFAR10DataModule(cifar_dir, download=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 200


def test_malformed_files_fail_clearly(tmp_path):
    root = write_fake_cifar10(tmp_path / "garbage", n_per_batch=10, n_test=10)
    with open(os.path.join(root, "cifar-10-batches-py", "data_batch_3"), "wb") as f:
        f.write(b"this is not a pickle")
    dm = CIFAR10DataModule(root, download=False)
    with pytest.warns(UserWarning, match=MD5_WARNING), pytest.raises(RuntimeError, match="not readable CIFAR-10"):
        dm.setup("fit")

    root = write_fake_cifar10(tmp_path / "shape", n_per_batch=10, n_test=10)
    with open(os.path.join(root, "cifar-10-batches-py", "test_batch"), "wb") as f:
        pickle.dump({"data": np.zeros((10, 100), dtype=np.uint8), "labels": [0] * 10}, f)
    dm = CIFAR10DataModule(root, download=False)
    with pytest.warns(UserWarning, match=MD5_WARNING), pytest.raises(RuntimeError, match="not readable CIFAR-10"):
        dm.setup("test")
    assert tv_cifar.check_integrity is cifar_module.check_integrity


# ------------------------------------------------------------------------------------------ global RNG
@pytest.mark.parametrize("synthetic", [False, True])
def test_global_rng_untouched(cifar_dir, synthetic):
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    kw = dict(synthetic=True, synthetic_train_size=300, synthetic_val_size=50) if synthetic else {}
    dm = _setup(data_dir=cifar_dir, download=False, batch_size=16, **kw)
    dm.setup("test")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        for _ in loader:
            pass
    assert torch.equal(torch.random.get_rng_state(), before)
    # The check can fail: a shuffling loader without its own generator does draw from the global RNG.
    for _ in DataLoader(dm.train_set, batch_size=16, shuffle=True):
        break
    assert not torch.equal(torch.random.get_rng_state(), before)


# ------------------------------------------------------------------------------------------ Lightning
def test_trainer_fit_and_validate(cifar_dir, tmp_path):
    class Tiny(L.LightningModule):
        def __init__(self, num_classes):
            super().__init__()
            self.layer = torch.nn.Linear(3072, num_classes)
            self.seen = {"train": 0, "val": 0}

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.seen["train"] += len(y)
            return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

        def validation_step(self, batch, batch_idx):
            self.seen["val"] += len(batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm = CIFAR10DataModule(cifar_dir, download=False, classes=[0, 1, 2], batch_size=16)
    model = Tiny(dm.num_classes)
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*" + MD5_WARNING)
        trainer.fit(model, datamodule=dm)
    # classes 0, 1, 2: 60 training images, 10 % (6) held out.
    assert model.seen == {"train": 54, "val": 6}

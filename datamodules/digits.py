"""scikit-learn's bundled handwritten digits as a LightningDataModule shaped like CIFAR-10 (3 x 32 x 32)."""

from __future__ import annotations

from typing import Optional, Union

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lyapunov_callbacks.datamodules._common import (
    ImageTensorDataset,
    check_fraction,
    check_int,
    make_loader,
    relabel,
    split_train_val,
    validate_classes,
)

__all__ = ["DigitsDataModule", "DIGITS_MEAN", "DIGITS_STD", "load_digits_images"]

NUM_DIGIT_CLASSES = 10
IMAGE_SIZE = 32
#: Mean and standard deviation of the 1797 upsampled images (pixels in [0, 1]), the same in the three channels;
#: ``tests/test_digits_datamodule.py`` recomputes them.
DIGITS_MEAN = (0.3053, 0.3053, 0.3053)
DIGITS_STD = (0.3236, 0.3236, 0.3236)
# Separates the label-noise stream from the validation split's, both seeded by `seed`.
_NOISE_SEED_OFFSET = 7919


def load_digits_images() -> tuple[Tensor, Tensor]:
    """All 1797 digits as float32 ``[N, 3, 32, 32]`` in [0, 1] and int64 labels, in scikit-learn's order.

    The 8 x 8 images (values 0..16) are divided by 16, upsampled to 32 x 32 by bilinear interpolation
    (``align_corners=False``) and copied into three identical channels. No download: the data ships with
    scikit-learn.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.from_numpy(digits.images).to(torch.float32).div_(16.0).unsqueeze(1)
    big = F.interpolate(small, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = big.clamp_(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()
    return images, torch.from_numpy(digits.target).to(torch.int64)


def flip_labels(labels: Tensor, fraction: float, num_classes: int, generator: torch.Generator) -> Tensor:
    """A copy of ``labels`` with ``round(fraction * n)`` of them, chosen at random, set to another class.

    The new label is uniform over the ``num_classes - 1`` other classes, so exactly that many labels change.
    """
    n = labels.numel()
    n_flip = int(round(fraction * n))
    out = labels.clone()
    if n_flip == 0:
        return out
    which = torch.randperm(n, generator=generator)[:n_flip]
    shift = torch.randint(1, num_classes, (n_flip,), generator=generator)
    out[which] = (labels[which] + shift) % num_classes
    return out


class DigitsDataModule(L.LightningDataModule):
    """The 1797 real 8 x 8 handwritten digits of scikit-learn, shaped for the CIFAR models (3 x 32 x 32).

    ``load_digits`` ships with scikit-learn: no download, no files. Images are upsampled to 32 x 32 and copied
    into three channels (:func:`load_digits_images`), normalised with ``DIGITS_MEAN`` / ``DIGITS_STD`` unless
    ``normalize=False``. ``classes`` selects and relabels classes ``0..k-1`` in the given order, as
    :class:`~lyapunov_callbacks.datamodules.CIFAR10DataModule` does. A seeded ``val_fraction`` of the (class-selected) images is
    held out; it serves as the validation and the test set (the data set has no official test split).
    ``label_noise`` flips a seeded random ``round(label_noise * n_train)`` of the *training* labels to another
    class (validation labels stay clean). The training loader's order in epoch ``e`` depends on ``(seed, e)``
    only (an ``EpochShuffleSampler``; Lightning calls ``set_epoch``), so a resumed run sees the same order as an
    uninterrupted one from the next epoch start. Nothing draws from the global RNG unless ``augment=True``.

    Args:
        classes: ``None`` for all ten digits, or a list of distinct digits in 0..9 (at least two), relabelled
            ``0..k-1`` in the given order. Default ``None``.
        batch_size: Images per batch for every loader. Default 128.
        num_workers: ``DataLoader`` worker processes (0 loads in the main process). Default 0.
        val_fraction: Fraction in [0, 1) held out for validation (0 disables validation). Default 0.2.
        label_noise: Fraction in [0, 1) of training labels flipped to a different class. Default 0.
        seed: Seed of the validation split, the label noise and the training shuffle. Default 0.
        augment: Random crop (padding 4) and horizontal flip on training images. Default ``False``.
        normalize: Apply the normalisation (``False`` leaves pixels in [0, 1]). Default ``True``.
        data_dir: Ignored (the data ships with scikit-learn); accepted so that commands written for
            :class:`~lyapunov_callbacks.datamodules.CIFAR10DataModule` (``make train`` passes it) run unchanged. Default ``None``.

    Raises:
        TypeError: If ``classes``, ``batch_size``, ``num_workers``, ``seed``, ``val_fraction`` or
            ``label_noise`` has the wrong type.
        ValueError: If ``classes`` has an entry outside 0..9, a duplicate or fewer than two entries;
            ``batch_size <= 0``; ``num_workers < 0``; ``val_fraction`` or ``label_noise`` outside [0, 1); or
            (in ``setup``) the split leaves no validation or no training image.

    Example::

        dm = DigitsDataModule(classes=[3, 5], batch_size=64, label_noise=0.1)
        model = MLP(num_classes=dm.num_classes)
        L.Trainer(max_epochs=5).fit(model, datamodule=dm)
    """

    def __init__(
        self,
        classes: Optional[list[int]] = None,
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.2,
        label_noise: float = 0.0,
        seed: int = 0,
        augment: bool = False,
        normalize: bool = True,
        data_dir: Optional[Union[str, object]] = None,
    ) -> None:
        super().__init__()
        classes = validate_classes(classes, NUM_DIGIT_CLASSES)
        check_int("batch_size", batch_size, 1)
        check_int("num_workers", num_workers, 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int, got {seed!r}.")
        check_fraction("val_fraction", val_fraction, " (0 = no validation split)")
        check_fraction("label_noise", label_noise, " (the fraction of training labels flipped; 0 = clean)")
        self.save_hyperparameters(ignore=["data_dir"])
        self.classes = classes
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = float(val_fraction)
        self.label_noise = float(label_noise)
        self.seed = seed
        self.augment = bool(augment)
        self.normalize = bool(normalize)
        self.train_set: Optional[ImageTensorDataset] = None
        self.val_set: Optional[ImageTensorDataset] = None
        #: Boolean mask over the training set: True where ``label_noise`` changed the label.
        self.flipped: Optional[Tensor] = None

    @property
    def num_classes(self) -> int:
        """Number of labels the model must output: ``len(classes)``, or 10."""
        return NUM_DIGIT_CLASSES if self.classes is None else len(self.classes)

    def _dataset(self, images: Tensor, labels: Tensor, augment: bool) -> ImageTensorDataset:
        return ImageTensorDataset(images, labels, DIGITS_MEAN, DIGITS_STD, normalize=self.normalize, augment=augment)

    def setup(self, stage: Optional[str] = None) -> None:
        """Build the training and held-out sets (the same for every stage)."""
        if self.train_set is not None:
            return
        images, labels = relabel(*load_digits_images(), self.classes, NUM_DIGIT_CLASSES)
        (tr_x, tr_y), (va_x, va_y) = split_train_val(images, labels, self.val_fraction, self.seed)
        noise_gen = torch.Generator().manual_seed(self.seed + _NOISE_SEED_OFFSET)
        noisy = flip_labels(tr_y, self.label_noise, self.num_classes, noise_gen)
        self.flipped = noisy != tr_y
        self.train_set = self._dataset(tr_x, noisy, augment=self.augment)
        self.val_set = self._dataset(va_x, va_y, augment=False) if va_y.numel() else None

    def _require(self, dataset: Optional[Dataset], name: str) -> Dataset:
        if dataset is None:
            raise RuntimeError(f"{name} is not built; call `setup('fit')` first (the Trainer does this).")
        return dataset

    def train_dataloader(self) -> DataLoader:
        """Shuffled training loader: the order of epoch ``e`` is a function of ``(seed, e)`` only."""
        train = self._require(self.train_set, "The training set")
        return make_loader(train, self.batch_size, self.num_workers, self.seed, shuffle=True)

    def val_dataloader(self) -> Union[DataLoader, list]:
        """Held-out loader in a fixed order; an empty list when ``val_fraction=0``."""
        if self.train_set is not None and self.val_set is None:
            return []
        val = self._require(self.val_set, "The validation set")
        return make_loader(val, self.batch_size, self.num_workers, self.seed, shuffle=False)

    def test_dataloader(self) -> Union[DataLoader, list]:
        """The held-out split again (digits has no separate test split)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> Union[DataLoader, list]:
        """The held-out split, as :meth:`test_dataloader`, for ``trainer.predict`` (``lyapunov-cli predict``)."""
        return self.val_dataloader()

"""scikit-learn's bundled handwritten digits as a LightningDataModule shaped like CIFAR-10 (3 x 32 x 32)."""

from __future__ import annotations

from collections.abc import Sequence
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
    split_train_val,
    validate_classes,
)

__all__ = ["DigitsDataModule", "DIGITS_MEAN", "DIGITS_STD", "load_digits_images", "class_groups"]

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


def class_groups(classes) -> Optional[list[list[int]]]:
    """``classes`` as groups of digits, one group per label: ``None`` stays ``None`` (all ten digits, each its own
    label); ``[3, 5]`` becomes ``[[3], [5]]``; ``[[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]`` is checked and kept.

    Raises:
        TypeError: a group that is not a list of ints, or a mix of digits and groups.
        ValueError: a digit outside 0..9, a digit in two groups (or twice in one), an empty group, or fewer than
            two groups.
    """
    if classes is None or isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        return None if classes is None else [[c] for c in validate_classes(classes, NUM_DIGIT_CLASSES)]
    nested = [isinstance(c, Sequence) and not isinstance(c, (str, bytes)) for c in classes]
    if not any(nested):
        return [[c] for c in validate_classes(classes, NUM_DIGIT_CLASSES)]
    if not all(nested):
        raise TypeError(f"`classes` must be a list of digits such as [3, 5] or a list of digit groups such as "
                        f"[[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]], not a mix of both; got {classes!r}.")
    if len(classes) < 2:
        raise ValueError(f"`classes` must give at least two groups of digits (one per label), got {classes!r}.")
    groups, seen = [], []
    for group in classes:
        if not group:
            raise ValueError(f"`classes` has an empty group in {classes!r}; every label needs at least one digit.")
        for d in group:
            if isinstance(d, bool) or not isinstance(d, int):
                raise TypeError(f"`classes` groups must hold ints in 0..9, got {d!r} in {classes!r}.")
            if not 0 <= d < NUM_DIGIT_CLASSES:
                raise ValueError(f"`classes` digits must lie in 0..9, got {d} in {classes!r}.")
        seen += list(group)
        groups.append([int(d) for d in group])
    if len(set(seen)) != len(seen):
        raise ValueError(f"`classes` must not put a digit in two groups (or twice in one), got {classes!r}.")
    return groups


def relabel_groups(images: Tensor, labels: Tensor, groups: Optional[list[list[int]]]) -> tuple[Tensor, Tensor]:
    """Keep the images whose digit is in one of ``groups`` and label them with the index of their group."""
    if groups is None:
        return images, labels
    lookup = torch.full((NUM_DIGIT_CLASSES,), -1, dtype=torch.int64)
    for label, group in enumerate(groups):
        lookup[torch.tensor(group)] = label
    keep = lookup[labels] >= 0
    return images[keep], lookup[labels[keep]]


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
    :class:`~lyapunov_callbacks.datamodules.CIFAR10DataModule` does, or takes groups of digits as one class each
    (``[[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]``: even against odd, 1,438 training images, each class made of several
    shapes as cat and dog are). A seeded ``val_fraction`` of the (class-selected) images is
    held out; it serves as the validation and the test set (the data set has no official test split).
    ``label_noise`` flips a seeded random ``round(label_noise * n_train)`` of the *training* labels to another
    class (validation labels stay clean). The training loader's order in epoch ``e`` depends on ``(seed, e)``
    only (an ``EpochShuffleSampler``; Lightning calls ``set_epoch``), so a resumed run sees the same order as an
    uninterrupted one from the next epoch start. Nothing draws from the global RNG unless ``augment=True``.

    Args:
        classes: ``None`` for all ten digits; a list of distinct digits in 0..9 (at least two), relabelled
            ``0..k-1`` in the given order; or a list of at least two disjoint groups of digits, group ``i``
            becoming label ``i``. Default ``None``.
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
        ValueError: If ``classes`` has an entry outside 0..9, a duplicate (also across groups), an empty group or
            fewer than two entries;
            ``batch_size <= 0``; ``num_workers < 0``; ``val_fraction`` or ``label_noise`` outside [0, 1); or
            (in ``setup``) the split leaves no validation or no training image.

    Example::

        dm = DigitsDataModule(classes=[3, 5], batch_size=64, label_noise=0.1)
        model = MLP(num_classes=dm.num_classes)
        L.Trainer(max_epochs=5).fit(model, datamodule=dm)
    """

    def __init__(
        self,
        classes: Optional[Union[list[int], list[list[int]]]] = None,
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
        groups = class_groups(classes)
        check_int("batch_size", batch_size, 1)
        check_int("num_workers", num_workers, 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int, got {seed!r}.")
        check_fraction("val_fraction", val_fraction, " (0 = no validation split)")
        check_fraction("label_noise", label_noise, " (the fraction of training labels flipped; 0 = clean)")
        self.save_hyperparameters(ignore=["data_dir"])
        # A list of digits stays one (as CIFAR10DataModule keeps it); groups of several digits stay groups.
        self.classes = groups if groups is None or any(len(g) > 1 for g in groups) else [g[0] for g in groups]
        #: One list of digits per label (``None``: all ten digits, each its own label).
        self.groups = groups
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
        return NUM_DIGIT_CLASSES if self.groups is None else len(self.groups)

    def _dataset(self, images: Tensor, labels: Tensor, augment: bool) -> ImageTensorDataset:
        return ImageTensorDataset(images, labels, DIGITS_MEAN, DIGITS_STD, normalize=self.normalize, augment=augment)

    def setup(self, stage: Optional[str] = None) -> None:
        """Build the training and held-out sets (the same for every stage)."""
        if self.train_set is not None:
            return
        images, labels = relabel_groups(*load_digits_images(), self.groups)
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

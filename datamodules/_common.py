"""Pieces the DataModules share: the in-memory image dataset, the per-epoch shuffle sampler, argument checks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

# Standard CIFAR augmentation (He et al. 2016): pad by 4 pixels, random 32x32 crop, horizontal flip.
_CROP_PADDING = 4
# Separates the shuffle streams of successive epochs: epoch e of seed s draws from s * stride + e.
_EPOCH_SEED_STRIDE = 1_000_003


class ImageTensorDataset(Dataset):
    """Stored ``[N, 3, H, W]`` images and int64 labels; yields ``(float32 [3, H, W], int64 scalar)``.

    uint8 images become ``x / 255``; float images (already in [0, 1]) are used as they are. Then an optional
    augmentation (random crop with zero padding 4 and horizontal flip, on the stored image) and an optional
    per-channel normalisation ``(x - mean) / std``.
    """

    def __init__(
        self, images: Tensor, labels: Tensor, mean: Sequence[float], std: Sequence[float], normalize: bool, augment: bool
    ) -> None:
        self.images = images
        self.labels = labels
        self.normalize = normalize
        self.augment = augment
        self._mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._augmentation = None
        if augment:
            from torchvision.transforms import v2

            self._augmentation = v2.Compose(
                [v2.RandomCrop(images.shape[-1], padding=_CROP_PADDING), v2.RandomHorizontalFlip()]
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        img = self.images[index]
        if self._augmentation is not None:
            img = self._augmentation(img)
        x = img.to(torch.float32).div_(255.0) if img.dtype == torch.uint8 else img.to(torch.float32, copy=True)
        if self.normalize:
            x = x.sub_(self._mean).div_(self._std)
        return x, self.labels[index]


class EpochShuffleSampler(Sampler[int]):
    """A random permutation of ``range(n)`` that is a function of ``(seed, epoch)`` only.

    Lightning calls :meth:`set_epoch` at the start of every training epoch, so a run resumed at epoch ``e``
    sees the order an uninterrupted run sees at epoch ``e``. Without Lightning, each full or partial pass
    advances the epoch by one, so a plain loop still reshuffles every epoch. The global RNG is not used.

    Args:
        n: Number of samples.
        seed: Seed of the shuffle.

    Example::

        sampler = EpochShuffleSampler(len(dataset), seed=0)
        sampler.set_epoch(3)
        order = list(sampler)  # the order of epoch 3, however many epochs ran before
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = int(n)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` for the next pass."""
        self.epoch = int(epoch)

    def permutation(self, epoch: int) -> Tensor:
        """The order of ``epoch`` (int64 ``[n]``)."""
        gen = torch.Generator().manual_seed((self.seed * _EPOCH_SEED_STRIDE + epoch) % (2**63))
        return torch.randperm(self.n, generator=gen)

    def __iter__(self) -> Iterator[int]:
        order = self.permutation(self.epoch)
        self.epoch += 1
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.n


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, seed: int, shuffle: bool) -> DataLoader:
    """A ``DataLoader`` with an :class:`EpochShuffleSampler` when ``shuffle``, a fixed order otherwise."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(len(dataset), seed) if shuffle else None,
        num_workers=num_workers,
        drop_last=False,
        persistent_workers=num_workers > 0,
        # An explicit generator keeps the workers' base seed off the global RNG.
        generator=torch.Generator().manual_seed(seed),
    )


def validate_classes(classes, num_classes: int = 10) -> Optional[list[int]]:
    """``None`` or a list of at least two distinct ints in ``0..num_classes-1``; raises a clear error otherwise."""
    if classes is None:
        return None
    top = num_classes - 1
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise TypeError(
            f"`classes` must be None (all {num_classes} classes) or a list of class indices such as [3, 5], "
            f"got {classes!r}."
        )
    out = []
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, int):
            raise TypeError(f"`classes` must contain ints in 0..{top} such as [3, 5], got element {c!r} in {classes!r}.")
        if not 0 <= c < num_classes:
            raise ValueError(f"`classes` entries must lie in 0..{top} (the labels), got {c} in {list(classes)}.")
        out.append(int(c))
    if len(set(out)) != len(out):
        raise ValueError(f"`classes` must not repeat a class, got {out}; list each class once.")
    if len(out) < 2:
        raise ValueError(f"`classes` must select at least two classes (or be None for all {num_classes}), got {out}.")
    return out


def check_int(name: str, value, minimum: int) -> int:
    """``value`` if it is an int >= ``minimum``; ``TypeError`` / ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value}.")
    return value


def check_fraction(name: str, value, hint: str = "") -> float:
    """``float(value)`` if it lies in [0, 1); ``TypeError`` / ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a float in [0, 1), got {value!r}.")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"`{name}` must lie in [0, 1), got {value}{hint}.")
    return float(value)


def relabel(images: Tensor, labels: Tensor, classes: Optional[list[int]], num_classes: int) -> tuple[Tensor, Tensor]:
    """Keep the images of ``classes`` and relabel them ``0..k-1`` in the order of ``classes``."""
    if classes is None:
        return images, labels
    lookup = torch.full((num_classes,), -1, dtype=torch.int64)
    lookup[torch.tensor(classes)] = torch.arange(len(classes))
    keep = lookup[labels] >= 0
    return images[keep], lookup[labels[keep]]


def split_train_val(
    images: Tensor, labels: Tensor, val_fraction: float, seed: int
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """A seeded held-out split: ``round(val_fraction * n)`` validation images, the rest for training."""
    n = labels.numel()
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n_val == 0:
        raise ValueError(
            f"`val_fraction`={val_fraction} of {n} training images rounds to no validation image; "
            f"increase `val_fraction` or set it to 0 to disable validation."
        )
    if n_val >= n:
        raise ValueError(f"`val_fraction`={val_fraction} leaves no training image out of {n}; lower it.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, _ = perm[:n_val].sort()
    train_idx, _ = perm[n_val:].sort()
    return (images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx])

"""CIFAR-10 as a LightningDataModule: the official files read by torchvision, or a synthetic stand-in."""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Sequence
from typing import Optional, Union
from unittest import mock

import lightning as L
import torch
import torchvision.datasets.cifar as tv_cifar
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.utils import check_integrity, download_and_extract_archive

__all__ = ["CIFAR10DataModule", "CIFAR10_MEAN", "CIFAR10_STD", "synthetic_cifar10"]

#: Per-channel mean and standard deviation of the CIFAR-10 training images (pixel values in [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
NUM_CIFAR10_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)

# Standard CIFAR augmentation (He et al. 2016): pad by 4 pixels, random 32x32 crop, horizontal flip.
_CROP_PADDING = 4

# Synthetic stand-in. Each class is a coloured stripe pattern with its own orientation and frequency; every
# image adds a random stripe phase, a random brightness offset and pixel noise. Amplitudes (0..255 scale) are
# chosen so a linear model learns the task over a few epochs but a single gradient step does not solve it.
_SYN_COLOUR_AMPLITUDE = 8.0
_SYN_STRIPE_AMPLITUDE = 20.0
# The phase jitter is uniform in [-0.8 pi, 0.8 pi]: wide enough that a linear model (which sees only the
# class-mean image, shrunk by sin(0.8 pi) / (0.8 pi) ~ 0.23) plateaus near 60 % on ten classes while an MLP
# reaches ~100 % within a few epochs, yet narrow enough that the class means stay distinct.
_SYN_PHASE_JITTER = 0.8 * math.pi
_SYN_BRIGHTNESS_STD = 15.0
_SYN_NOISE_STD = 40.0
# Fixed seed of the class templates' colours: the templates are part of the task definition, not of `seed`.
_SYN_TEMPLATE_SEED = 20240601
# Separates the generator streams of the synthetic splits: split s of seed k uses k * stride + s.
_SYN_SPLIT_SEED_STRIDE = 1_000_003


class _ImageTensorDataset(Dataset):
    """uint8 ``[N, 3, 32, 32]`` images and int64 labels; yields ``(float32 [3, 32, 32], int64 scalar)``.

    The float image is ``x / 255``, optionally augmented (on the uint8 image, zero padding as in the usual
    PIL pipeline) and normalised per channel: ``(x / 255 - mean) / std``.
    """

    def __init__(self, images: Tensor, labels: Tensor, normalize: bool, augment: bool) -> None:
        self.images = images
        self.labels = labels
        self.normalize = normalize
        self.augment = augment
        self._mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
        self._std = torch.tensor(CIFAR10_STD).view(3, 1, 1)
        self._augmentation = None
        if augment:
            from torchvision.transforms import v2

            self._augmentation = v2.Compose(
                [v2.RandomCrop(IMAGE_SHAPE[1], padding=_CROP_PADDING), v2.RandomHorizontalFlip()]
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        img = self.images[index]
        if self._augmentation is not None:
            img = self._augmentation(img)
        x = img.to(torch.float32).div_(255.0)
        if self.normalize:
            x = x.sub_(self._mean).div_(self._std)
        return x, self.labels[index]


def _class_colours() -> Tensor:
    gen = torch.Generator().manual_seed(_SYN_TEMPLATE_SEED)
    return torch.rand(NUM_CIFAR10_CLASSES, 3, generator=gen, dtype=torch.float64) * 2.0 - 1.0


def synthetic_cifar10(num_images: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Deterministic, learnable CIFAR-shaped images over all ten classes.

    Labels are balanced (``arange(num_images) % 10``, then permuted). Image ``i`` of class ``c`` is, per channel
    ``ch`` and pixel ``(y, x)``::

        128 + 8 colour[c, ch] + 20 cos(2 pi f_c (x cos t_c + y sin t_c) / 32 + 2 pi c ch / 10 + phi_i)
            + b_i + noise[i, ch, y, x]

    with orientation ``t_c = pi c / 10``, frequency ``f_c = 1 + c % 3`` cycles per image, a fixed colour table,
    ``phi_i ~ U(-0.8 pi, 0.8 pi)``, ``b_i ~ N(0, 15^2)`` and ``noise ~ N(0, 40^2)``, rounded and clipped to uint8.
    All randomness comes from ``generator``; the global RNG is untouched.

    Args:
        num_images: Number of images (all ten classes).
        generator: Seeded ``torch.Generator`` for labels, phases, brightness and noise.

    Returns:
        ``(images uint8 [N, 3, 32, 32], labels int64 [N])``.

    Example::

        images, labels = synthetic_cifar10(100, torch.Generator().manual_seed(0))
    """
    n = int(num_images)
    labels = torch.arange(n, dtype=torch.int64) % NUM_CIFAR10_CLASSES
    labels = labels[torch.randperm(n, generator=generator)]
    # Per-class stripe argument a[c, ch, y, x]; the per-image phase enters through
    # cos(a + phi) = cos(a) cos(phi) - sin(a) sin(phi), so only the ten class tables need trigonometry.
    c = torch.arange(NUM_CIFAR10_CLASSES, dtype=torch.float64).view(-1, 1, 1, 1)
    ch = torch.arange(3, dtype=torch.float64).view(1, 3, 1, 1)
    yy = torch.arange(32, dtype=torch.float64).view(1, 1, 32, 1)
    xx = torch.arange(32, dtype=torch.float64).view(1, 1, 1, 32)
    theta = math.pi * c / NUM_CIFAR10_CLASSES
    freq = 1.0 + torch.remainder(c, 3)
    arg = (
        2.0 * math.pi * freq * (xx * torch.cos(theta) + yy * torch.sin(theta)) / 32.0
        + 2.0 * math.pi * c * ch / NUM_CIFAR10_CLASSES
    )
    cos_a, sin_a = torch.cos(arg).to(torch.float32), torch.sin(arg).to(torch.float32)
    phi = (torch.rand(n, 1, 1, 1, generator=generator) * 2.0 - 1.0) * _SYN_PHASE_JITTER
    stripes = cos_a[labels] * torch.cos(phi) - sin_a[labels] * torch.sin(phi)
    colour = _class_colours().to(torch.float32)[labels].view(n, 3, 1, 1)
    brightness = torch.randn(n, 1, 1, 1, generator=generator) * _SYN_BRIGHTNESS_STD
    images = torch.randn(n, 3, 32, 32, generator=generator).mul_(_SYN_NOISE_STD)
    images += stripes.mul_(_SYN_STRIPE_AMPLITUDE)
    images += colour.mul_(_SYN_COLOUR_AMPLITUDE) + brightness + 128.0
    return images.round_().clamp_(0.0, 255.0).to(torch.uint8), labels


def _validate_classes(classes) -> Optional[list[int]]:
    if classes is None:
        return None
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise TypeError(
            f"`classes` must be None (all ten classes) or a list of class indices such as [3, 5], "
            f"got {classes!r}."
        )
    out = []
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, int):
            raise TypeError(f"`classes` must contain ints in 0..9 such as [3, 5], got element {c!r} in {classes!r}.")
        if not 0 <= c < NUM_CIFAR10_CLASSES:
            raise ValueError(f"`classes` entries must lie in 0..9 (the CIFAR-10 labels), got {c} in {list(classes)}.")
        out.append(int(c))
    if len(set(out)) != len(out):
        raise ValueError(f"`classes` must not repeat a class, got {out}; list each class once.")
    if len(out) < 2:
        raise ValueError(f"`classes` must select at least two classes (or be None for all ten), got {out}.")
    return out


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value}.")
    return value


class CIFAR10DataModule(L.LightningDataModule):
    """CIFAR-10 (or a deterministic synthetic stand-in) with class selection and a seeded validation split.

    Real data is read by ``torchvision.datasets.CIFAR10`` from ``data_dir/cifar-10-batches-py`` (the official
    pickled batches). ``prepare_data`` downloads it only when that folder is missing or incomplete;
    ``setup`` builds the datasets. Files that fail torchvision's md5 check (not the official ones) are loaded
    anyway, with a warning. Every batch is ``(images float32 [B, 3, 32, 32], labels int64 [B])``: pixels
    scaled to [0, 1], normalised per channel with ``CIFAR10_MEAN`` / ``CIFAR10_STD``, labels relabelled to
    ``0..k-1`` in the order of ``classes``.

    Splits: the training loader shuffles with a ``torch.Generator`` seeded by ``seed``; validation is a
    held-out ``val_fraction`` of the (class-selected) training split, drawn with a generator seeded by
    ``seed``, or the official test split when ``use_test_as_val=True`` (then ``val_fraction`` is ignored and
    the whole training split is trained on). ``test_dataloader`` serves the official test split. Nothing
    here draws from the global torch RNG, except ``augment=True`` (torchvision's random transforms).

    ``synthetic=True`` replaces the files by :func:`synthetic_cifar10` (no disk, no network): a training split
    of ``synthetic_train_size`` images and an independent held-out split of ``synthetic_val_size`` images,
    both counted over all ten classes *before* class selection (so ``classes=[3, 5]`` keeps about a fifth).
    The held-out split is the validation set and the test set; ``val_fraction`` and ``use_test_as_val`` are
    ignored. Class selection, relabelling, normalisation and augmentation follow the same path as real data.

    Args:
        data_dir: Folder that holds (or will hold) ``cifar-10-batches-py``. Default ``"data"``.
        download: Download the official archive when the folder is missing or incomplete. Default ``True``.
        classes: ``None`` for all ten classes, or a list of distinct labels in 0..9 (at least two), relabelled
            ``0..k-1`` in the given order, e.g. ``[3, 5]`` (cat -> 0, dog -> 1). Default ``None``.
        batch_size: Images per batch for every loader. Default 128.
        num_workers: ``DataLoader`` worker processes (0 loads in the main process). Default 0.
        val_fraction: Fraction in [0, 1) of the training split held out for validation; 0 disables
            validation (``val_dataloader`` returns an empty list). Default 0.1.
        use_test_as_val: Validate on the official test split instead. Default ``False``.
        seed: Seed of the validation split, of the training shuffle and of the synthetic data. Default 0.
        augment: Random crop (padding 4) and horizontal flip on training images. Default ``False``, as the
            paper studies the training dynamics without augmentation.
        synthetic: Use the synthetic stand-in instead of files. Default ``False``.
        synthetic_train_size: Synthetic training images over all ten classes. Default 10000.
        synthetic_val_size: Synthetic held-out images over all ten classes. Default 2000.
        normalize: Apply the per-channel normalisation (``False`` leaves pixels in [0, 1]). Default ``True``.

    Raises:
        TypeError: If ``classes``, ``batch_size``, ``num_workers``, ``seed`` or a synthetic size has the wrong
            type.
        ValueError: If ``classes`` has an entry outside 0..9, a duplicate or fewer than two entries;
            ``batch_size <= 0``; ``num_workers < 0``; ``val_fraction`` outside [0, 1); a synthetic size
            ``<= 0``; or (in ``setup``) the split leaves no validation or no training image.
        FileNotFoundError: In ``prepare_data``/``setup``, if ``cifar-10-batches-py`` is missing or incomplete
            and ``download=False``.
        RuntimeError: If the download fails, or the files exist but cannot be read as CIFAR-10 batches.

    Example::

        dm = CIFAR10DataModule(data_dir="data", classes=[3, 5], batch_size=64, val_fraction=0.1)
        model = LinearModel(num_classes=dm.num_classes)
        L.Trainer(max_epochs=5).fit(model, datamodule=dm)

        dm = CIFAR10DataModule(synthetic=True)  # offline stand-in, same shapes
    """

    def __init__(
        self,
        data_dir: Union[str, os.PathLike] = "data",
        download: bool = True,
        classes: Optional[list[int]] = None,
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        use_test_as_val: bool = False,
        seed: int = 0,
        augment: bool = False,
        synthetic: bool = False,
        synthetic_train_size: int = 10000,
        synthetic_val_size: int = 2000,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        classes = _validate_classes(classes)
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0)
        _check_int("synthetic_train_size", synthetic_train_size, 1)
        _check_int("synthetic_val_size", synthetic_val_size, 1)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int, got {seed!r}.")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
            raise TypeError(f"`val_fraction` must be a float in [0, 1), got {val_fraction!r}.")
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(
                f"`val_fraction` must lie in [0, 1) (0 = no validation split), got {val_fraction}; "
                f"to validate on the official test split use `use_test_as_val=True`."
            )
        self.save_hyperparameters()
        self.data_dir = str(data_dir)
        self.download = bool(download)
        self.classes = classes
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = float(val_fraction)
        self.use_test_as_val = bool(use_test_as_val)
        self.seed = seed
        self.augment = bool(augment)
        self.synthetic = bool(synthetic)
        self.synthetic_train_size = synthetic_train_size
        self.synthetic_val_size = synthetic_val_size
        self.normalize = bool(normalize)
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None

    @property
    def num_classes(self) -> int:
        """Number of labels the model must output: ``len(classes)``, or 10."""
        return NUM_CIFAR10_CLASSES if self.classes is None else len(self.classes)

    @property
    def folder(self) -> str:
        """Absolute path of the ``cifar-10-batches-py`` folder that is read."""
        return os.path.join(os.path.abspath(os.path.expanduser(self.data_dir)), tv_cifar.CIFAR10.base_folder)

    # ----------------------------------------------------------------------------------------- files
    def _expected_files(self) -> list[tuple[str, str]]:
        cls = tv_cifar.CIFAR10
        return [tuple(x) for x in cls.train_list + cls.test_list] + [(cls.meta["filename"], cls.meta["md5"])]

    def _missing_files(self) -> list[str]:
        return [name for name, _ in self._expected_files() if not os.path.isfile(os.path.join(self.folder, name))]

    def _missing_message(self, missing: list[str]) -> str:
        return (
            f"CIFAR-10 not found: the folder {self.folder} is missing or incomplete (missing: "
            f"{', '.join(missing)}). Put the official python-version batches (data_batch_1..5, test_batch, "
            f"batches.meta from cifar-10-python.tar.gz) in {self.folder}, or pass download=True (needs network "
            f"access to {tv_cifar.CIFAR10.url}), or use synthetic=True for the offline synthetic stand-in."
        )

    def prepare_data(self) -> None:
        """Download and extract the official archive into ``data_dir``, only if files are missing."""
        if self.synthetic:
            return
        missing = self._missing_files()
        if not missing:
            return
        if not self.download:
            raise FileNotFoundError(self._missing_message(missing))
        cls = tv_cifar.CIFAR10
        root = os.path.abspath(os.path.expanduser(self.data_dir))
        try:
            download_and_extract_archive(cls.url, root, filename=cls.filename, md5=cls.tgz_md5)
        except Exception as exc:  # network, HTTP, checksum or archive errors all mean "no data here"
            raise RuntimeError(
                f"Downloading CIFAR-10 into {root} failed ({type(exc).__name__}: {exc}). download=True needs "
                f"network access to {cls.url}. Otherwise put the official batches in {self.folder} yourself, "
                f"or use synthetic=True for the offline synthetic stand-in."
            ) from exc
        missing = self._missing_files()
        if missing:
            raise RuntimeError(
                f"After downloading, {self.folder} still lacks {', '.join(missing)}; delete the folder and the "
                f"archive {os.path.join(root, cls.filename)} and retry. " + self._missing_message(missing)
            )

    def _load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        """Read one official split with torchvision's ``CIFAR10`` as uint8 ``[N, 3, 32, 32]`` + int64 labels."""
        missing = self._missing_files()
        if missing:
            raise FileNotFoundError(self._missing_message(missing))
        official = all(check_integrity(os.path.join(self.folder, name), md5) for name, md5 in self._expected_files())
        root = os.path.abspath(os.path.expanduser(self.data_dir))
        try:
            if official:
                ds = tv_cifar.CIFAR10(root, train=train, download=False)
            else:
                if not getattr(self, "_warned_md5", False):
                    rank_zero_warn(
                        f"The files in {self.folder} are not the official CIFAR-10 files (md5 check failed); "
                        f"loading them anyway through torchvision's CIFAR10 with the md5 check bypassed."
                    )
                    self._warned_md5 = True
                original = tv_cifar.check_integrity

                def _exists_only(fpath, md5=None):
                    return original(fpath, None)

                # Narrow bypass: only the md5 comparison, only while this one dataset is constructed.
                with mock.patch.object(tv_cifar, "check_integrity", _exists_only):
                    ds = tv_cifar.CIFAR10(root, train=train, download=False)
            data = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            labels = torch.as_tensor(ds.targets, dtype=torch.int64)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:
            raise RuntimeError(
                f"The files in {self.folder} are not readable CIFAR-10 batches ({type(exc).__name__}: {exc}). "
                f"Each must be a pickled dict with 'data' (uint8 [N, 3072]) and 'labels'; replace them with the "
                f"official files (delete the folder and use download=True)."
            ) from exc
        if data.dtype != torch.uint8 or tuple(data.shape[1:]) != IMAGE_SHAPE or labels.numel() != data.shape[0]:
            raise RuntimeError(
                f"The files in {self.folder} are malformed: got images {tuple(data.shape)} {data.dtype} and "
                f"{labels.numel()} labels, expected uint8 [N, 3, 32, 32] and N labels. Replace them with the "
                f"official files."
            )
        if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CIFAR10_CLASSES):
            raise RuntimeError(f"The files in {self.folder} are malformed: labels outside 0..9.")
        return data, labels

    # ----------------------------------------------------------------------------------------- datasets
    def _select(self, images: Tensor, labels: Tensor, split: str) -> tuple[Tensor, Tensor]:
        """Keep the selected classes and relabel them ``0..k-1`` in the order of ``classes``."""
        if self.classes is not None:
            lookup = torch.full((NUM_CIFAR10_CLASSES,), -1, dtype=torch.int64)
            lookup[torch.tensor(self.classes)] = torch.arange(len(self.classes))
            keep = lookup[labels] >= 0
            images, labels = images[keep], lookup[labels[keep]]
        if labels.numel() == 0:
            raise ValueError(
                f"The {split} split has no image of classes {self.classes}; "
                + ("increase the synthetic sizes." if self.synthetic else f"check the files in {self.folder}.")
            )
        return images, labels

    def _raw_split(self, train: bool) -> tuple[Tensor, Tensor]:
        if self.synthetic:
            size = self.synthetic_train_size if train else self.synthetic_val_size
            split_index = 0 if train else 1
            gen = torch.Generator().manual_seed(self.seed * _SYN_SPLIT_SEED_STRIDE + split_index)
            return synthetic_cifar10(size, gen)
        return self._load_split(train)

    def _dataset(self, images: Tensor, labels: Tensor, augment: bool = False) -> _ImageTensorDataset:
        return _ImageTensorDataset(images, labels, normalize=self.normalize, augment=augment and self.augment)

    def _split_train_val(self, images: Tensor, labels: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        n = labels.numel()
        n_val = int(round(self.val_fraction * n))
        if self.val_fraction > 0 and n_val == 0:
            raise ValueError(
                f"`val_fraction`={self.val_fraction} of {n} training images rounds to no validation image; "
                f"increase `val_fraction` or set it to 0 to disable validation."
            )
        if n_val >= n:
            raise ValueError(f"`val_fraction`={self.val_fraction} leaves no training image out of {n}; lower it.")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        val_idx, _ = perm[:n_val].sort()
        train_idx, _ = perm[n_val:].sort()
        return (images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx])

    def setup(self, stage: Optional[str] = None) -> None:
        """Build the datasets ``stage`` needs (``"fit"``, ``"validate"``, ``"test"``, ``"predict"`` or all)."""
        need_fit = stage in (None, "fit", "validate")
        need_test = stage in (None, "test", "predict") or (
            need_fit and (self.use_test_as_val or self.synthetic)
        )
        if need_test and self.test_set is None:
            self.test_set = self._dataset(*self._select(*self._raw_split(train=False), split="test"))
        if need_fit and self.train_set is None:
            images, labels = self._select(*self._raw_split(train=True), split="training")
            if self.synthetic or self.use_test_as_val:
                self.train_set = self._dataset(images, labels, augment=True)
                self.val_set = self.test_set
            else:
                (tr_x, tr_y), (va_x, va_y) = self._split_train_val(images, labels)
                self.train_set = self._dataset(tr_x, tr_y, augment=True)
                self.val_set = self._dataset(va_x, va_y) if va_y.numel() else None

    # ----------------------------------------------------------------------------------------- loaders
    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            drop_last=False,
            persistent_workers=self.num_workers > 0,
            # An explicit generator keeps the shuffle (and the workers' base seed) off the global RNG.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _require(self, dataset: Optional[Dataset], name: str, stage: str) -> Dataset:
        if dataset is None:
            raise RuntimeError(f"{name} is not built; call `setup({stage!r})` first (the Trainer does this).")
        return dataset

    def train_dataloader(self) -> DataLoader:
        """Shuffled training loader (shuffle seeded by ``seed``)."""
        return self._loader(self._require(self.train_set, "The training set", "fit"), shuffle=True)

    def val_dataloader(self) -> Union[DataLoader, list]:
        """Validation loader in a fixed order; an empty list when ``val_fraction=0`` (no validation)."""
        if self.train_set is not None and self.val_set is None:
            return []
        return self._loader(self._require(self.val_set, "The validation set", "fit"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Loader over the official test split (the synthetic held-out split when ``synthetic=True``)."""
        return self._loader(self._require(self.test_set, "The test set", "test"), shuffle=False)

"""CIFAR-10 as a LightningDataModule: the official files read by torchvision, or an offline stand-in."""

from __future__ import annotations

import os
import pickle
from typing import Optional, Union

import lightning as L
import numpy as np
import torch
import torchvision.datasets.cifar as tv_cifar
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.utils import check_integrity, download_and_extract_archive

from lyapunov_callbacks.datamodules._common import (
    ImageTensorDataset,
    check_fraction,
    check_int,
    make_loader,
    relabel,
    split_train_val,
    validate_classes,
)
from lyapunov_callbacks.datamodules.synthetic import synthetic_cifar10

__all__ = [
    "CIFAR10DataModule",
    "CIFAR10DownloadError",
    "CIFAR10NotFoundError",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DataUnavailableError",
    "synthetic_cifar10",
]


class DataUnavailableError(Exception):
    """The data files are not here and cannot be fetched: the message says where they belong and what to use
    instead. A command line (``lyapunov-cli``) prints it as one line instead of a traceback."""


class CIFAR10NotFoundError(DataUnavailableError, FileNotFoundError):
    """``cifar-10-batches-py`` is missing or incomplete and ``download=False``."""


class CIFAR10DownloadError(DataUnavailableError, RuntimeError):
    """``download=True`` and the download failed (no network, HTTP error, bad checksum)."""


#: Per-channel mean and standard deviation of the CIFAR-10 training images (pixel values in [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
NUM_CIFAR10_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)


class CIFAR10DataModule(L.LightningDataModule):
    """CIFAR-10 (or a deterministic synthetic stand-in) with class selection and a seeded validation split.

    Real data is read by ``torchvision.datasets.CIFAR10`` from ``data_dir/cifar-10-batches-py`` (the official
    pickled batches). ``prepare_data`` downloads it only when that folder is missing or incomplete;
    ``setup`` builds the datasets. Files that fail torchvision's md5 check (not the official ones) are refused
    with a ``RuntimeError`` unless ``allow_unverified_files=True`` (unpickling runs whatever code a file holds;
    the opt-in is for files you wrote yourself, such as the tests' small fakes). Every batch is ``(images float32 [B, 3, 32, 32], labels int64 [B])``: pixels
    scaled to [0, 1], normalised per channel with ``CIFAR10_MEAN`` / ``CIFAR10_STD``, labels relabelled to
    ``0..k-1`` in the order of ``classes``.

    Splits: the training loader shuffles with an ``EpochShuffleSampler``: the order of epoch ``e`` depends on
    ``(seed, e)`` only (Lightning calls its ``set_epoch``), so a run resumed at the start of epoch ``e`` sees the
    same order as an uninterrupted run. A run resumed mid-epoch restarts that epoch's order from its first
    batch (Lightning does not restore a plain ``DataLoader``'s position). Validation is a
    held-out ``val_fraction`` of the (class-selected) training split, drawn with a generator seeded by
    ``seed``, or the official test split when ``use_test_as_val=True`` (then ``val_fraction`` is ignored and
    the whole training split is trained on). ``test_dataloader`` serves the official test split. Nothing
    here draws from the global torch RNG, except ``augment=True`` (torchvision's random transforms).

    ``synthetic=True`` replaces the files by :func:`~lyapunov_callbacks.datamodules.synthetic.synthetic_cifar10` (no disk, no
    network): 1/f colour images with CIFAR-10's channel statistics, whose classes differ only by a faint
    pattern, as hard as real cat vs dog for an MLP (about 65 % validation accuracy on two classes; the
    generative model and measured difficulty are in ``datamodules/synthetic.py`` and ``docs/data.md``). A training
    split of ``synthetic_train_size`` images and an independent held-out split of ``synthetic_val_size``
    images, both counted over all ten classes *before* class selection (the defaults 50000 / 10000 are
    CIFAR-10's: 5000 / 1000 per class). The held-out split is the validation set and the test set;
    ``val_fraction`` and ``use_test_as_val`` are ignored. Class selection, relabelling, normalisation and
    augmentation follow the same path as real data. Only the selected classes are generated (a few seconds
    per 10000 images, cached per process).

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
        synthetic_train_size: Synthetic training images over all ten classes. Default 50000.
        synthetic_val_size: Synthetic held-out images over all ten classes. Default 10000.
        normalize: Apply the per-channel normalisation (``False`` leaves pixels in [0, 1]). Default ``True``.
        allow_unverified_files: Read files that fail torchvision's md5 check (unpickling them runs any code they
            hold; only for files you trust). Default ``False``: such files are refused.

    Raises:
        TypeError: If ``classes``, ``batch_size``, ``num_workers``, ``seed`` or a synthetic size has the wrong
            type.
        ValueError: If ``classes`` has an entry outside 0..9, a duplicate or fewer than two entries;
            ``batch_size <= 0``; ``num_workers < 0``; ``val_fraction`` outside [0, 1); a synthetic size
            ``<= 0``; or (in ``setup``) the split leaves no validation or no training image.
        CIFAR10NotFoundError: (a ``FileNotFoundError``) In ``prepare_data``/``setup``, if
            ``cifar-10-batches-py`` is missing or incomplete and ``download=False``.
        CIFAR10DownloadError: (a ``RuntimeError``) If the download fails.
        RuntimeError: If the files fail the md5 check and ``allow_unverified_files`` is
            ``False``; or if they cannot be read as CIFAR-10 batches.

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
        synthetic_train_size: int = 50000,
        synthetic_val_size: int = 10000,
        normalize: bool = True,
        allow_unverified_files: bool = False,
    ) -> None:
        super().__init__()
        classes = validate_classes(classes)
        check_int("batch_size", batch_size, 1)
        check_int("num_workers", num_workers, 0)
        check_int("synthetic_train_size", synthetic_train_size, 1)
        check_int("synthetic_val_size", synthetic_val_size, 1)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int, got {seed!r}.")
        check_fraction(
            "val_fraction",
            val_fraction,
            " (0 = no validation split); to validate on the official test split use `use_test_as_val=True`",
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
        self.allow_unverified_files = bool(allow_unverified_files)
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
            raise CIFAR10NotFoundError(self._missing_message(missing))
        cls = tv_cifar.CIFAR10
        root = os.path.abspath(os.path.expanduser(self.data_dir))
        try:
            download_and_extract_archive(cls.url, root, filename=cls.filename, md5=cls.tgz_md5)
        except Exception as exc:  # network, HTTP, checksum or archive errors all mean "no data here"
            raise CIFAR10DownloadError(
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
            raise CIFAR10NotFoundError(self._missing_message(missing))
        unverified = [
            name for name, md5 in self._expected_files() if not check_integrity(os.path.join(self.folder, name), md5)
        ]
        if unverified and not self.allow_unverified_files:
            raise RuntimeError(
                f"The files {', '.join(unverified)} in {self.folder} fail torchvision's md5 check: they are not the "
                f"official CIFAR-10 files, and unpickling a file runs whatever code it holds, so they are refused. "
                f"Replace them with the official files (delete the folder and use download=True), or, if you trust "
                f"them (e.g. files your own code wrote), pass allow_unverified_files=True."
            )
        root = os.path.abspath(os.path.expanduser(self.data_dir))
        try:
            if unverified:
                raw, targets = self._read_batches(train)
            else:
                ds = tv_cifar.CIFAR10(root, train=train, download=False)
                raw, targets = ds.data, ds.targets
            data = torch.from_numpy(raw).permute(0, 3, 1, 2).contiguous()
            labels = torch.as_tensor(targets, dtype=torch.int64)
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

    def _read_batches(self, train: bool) -> tuple[np.ndarray, list]:
        """Read the pickled batches as torchvision's ``CIFAR10`` does, without its md5 check (opt-in only)."""
        cls = tv_cifar.CIFAR10
        rows, targets = [], []
        for name, _ in cls.train_list if train else cls.test_list:
            with open(os.path.join(self.folder, name), "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            rows.append(entry["data"])
            targets.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        data = np.vstack(rows).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))  # HWC, as torchvision stores it
        return data, targets

    # ----------------------------------------------------------------------------------------- datasets
    def _select(self, images: Tensor, labels: Tensor, split: str) -> tuple[Tensor, Tensor]:
        """Keep the selected classes and relabel them ``0..k-1`` in the order of ``classes``."""
        images, labels = relabel(images, labels, self.classes, NUM_CIFAR10_CLASSES)
        if labels.numel() == 0:
            raise ValueError(
                f"The {split} split has no image of classes {self.classes}; "
                + ("increase the synthetic sizes." if self.synthetic else f"check the files in {self.folder}.")
            )
        return images, labels

    def _raw_split(self, train: bool) -> tuple[Tensor, Tensor]:
        if self.synthetic:
            size = self.synthetic_train_size if train else self.synthetic_val_size
            return synthetic_cifar10(size, self.seed, "train" if train else "test", self.classes)
        return self._load_split(train)

    def _dataset(self, images: Tensor, labels: Tensor, augment: bool = False) -> ImageTensorDataset:
        return ImageTensorDataset(
            images, labels, CIFAR10_MEAN, CIFAR10_STD, normalize=self.normalize, augment=augment and self.augment
        )

    def _split_train_val(self, images: Tensor, labels: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        return split_train_val(images, labels, self.val_fraction, self.seed)

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
        return make_loader(dataset, self.batch_size, self.num_workers, self.seed, shuffle)

    def _require(self, dataset: Optional[Dataset], name: str, stage: str) -> Dataset:
        if dataset is None:
            raise RuntimeError(f"{name} is not built; call `setup({stage!r})` first (the Trainer does this).")
        return dataset

    def train_dataloader(self) -> DataLoader:
        """Shuffled training loader: the order of epoch ``e`` is a function of ``(seed, e)`` only."""
        return self._loader(self._require(self.train_set, "The training set", "fit"), shuffle=True)

    def val_dataloader(self) -> Union[DataLoader, list]:
        """Validation loader in a fixed order; an empty list when ``val_fraction=0`` (no validation)."""
        if self.train_set is not None and self.val_set is None:
            return []
        return self._loader(self._require(self.val_set, "The validation set", "fit"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Loader over the official test split (the synthetic held-out split when ``synthetic=True``)."""
        return self._loader(self._require(self.test_set, "The test set", "test"), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test split again, in a fixed order, for ``trainer.predict`` (``lyapunov-cli predict``)."""
        return self._loader(self._require(self.test_set, "The test set", "predict"), shuffle=False)

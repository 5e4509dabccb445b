"""Byte-level language-modelling data from text that ships with Python: source files of the standard library."""

from __future__ import annotations

import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lyapunov_callbacks.datamodules._common import check_fraction, check_int, make_loader

__all__ = ["STDLIB_FILES", "ByteSequenceDataset", "TextDataModule", "load_stdlib_bytes"]

#: Standard-library source files (relative to ``sysconfig.get_paths()["stdlib"]``) concatenated in this order:
#: about 0.6 MB of Python, files that exist (as plain modules) in every CPython from 3.9 on. Their bytes differ
#: between Python versions, so the data set is fixed for a given interpreter.
STDLIB_FILES = (
    "argparse.py",
    "inspect.py",
    "typing.py",
    "dataclasses.py",
    "functools.py",
    "collections/__init__.py",
    "enum.py",
    "textwrap.py",
    "random.py",
    "contextlib.py",
    "shutil.py",
    "tempfile.py",
    "fractions.py",
    "heapq.py",
)
#: Number of distinct tokens: one per byte value.
BYTE_VOCAB = 256


def load_stdlib_bytes(files: Sequence[str] = STDLIB_FILES) -> Tensor:
    """The bytes of ``files`` (paths relative to the standard library's directory), concatenated, as uint8 ``[N]``.

    Raises:
        FileNotFoundError: naming a file that this interpreter's standard library does not have.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks = []
    for name in files:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(
                f"`files` entry {name!r} is not a file of this Python's standard library ({root}); list files "
                "relative to that directory, e.g. 'argparse.py' or 'collections/__init__.py'."
            )
        chunks.append(path.read_bytes())
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


class ByteSequenceDataset(Dataset):
    """Fixed-length windows of a byte stream: item ``i`` is ``(x, y)``, int64 ``[T]`` each, ``y`` = ``x`` shifted by one.

    Args:
        windows: uint8 ``[n, T + 1]``, one window per row.
    """

    def __init__(self, windows: Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        w = self.windows[index].to(torch.int64)
        return w[:-1], w[1:]


class TextDataModule(L.LightningDataModule):
    """Next-byte prediction on the source code of Python's standard library: no download, no files to provide.

    The files of ``files`` (default :data:`STDLIB_FILES`, about 0.6 MB) are read from this interpreter's standard
    library (``sysconfig.get_paths()["stdlib"]``) and concatenated. The stream is cut into non-overlapping windows
    of ``block_size + 1`` bytes (the tail that does not fill a window is dropped); each window gives an input
    ``x = w[:-1]`` and a target ``y = w[1:]``, both int64 ``[block_size]``. A permutation seeded by ``seed``
    sends ``round(val_fraction·n)`` windows to validation, ``round(test_fraction·n)`` to test and the rest to
    training (each split in stream order). The training loader's order in epoch ``e`` depends on ``(seed, e)``
    only; nothing draws from the global RNG. ``predict_dataloader`` serves the test windows.

    Args:
        block_size: bytes per input sequence ``T``; must not exceed the model's ``block_size``. Default 64.
        batch_size: sequences per batch for every loader. Default 32.
        num_workers: ``DataLoader`` worker processes (0 loads in the main process). Default 0.
        val_fraction: fraction of windows in [0, 1) held out for validation (0: none). Default 0.05.
        test_fraction: fraction of windows in [0, 1) held out for test and predict (0: none). Default 0.05.
        seed: seed of the split and of the training shuffle. Default 0.
        files: standard-library files to read, relative to its directory. Default :data:`STDLIB_FILES`.

    Raises:
        TypeError: a non-int ``block_size``/``batch_size``/``num_workers``/``seed``, a non-float fraction, or
            ``files`` not a list of strings.
        ValueError: ``block_size``/``batch_size`` < 1, ``num_workers`` < 0, a fraction outside [0, 1) or
            fractions that sum to 1 or more, an empty ``files``; in ``setup``, text too short for one training window.
        FileNotFoundError: in ``setup``, a ``files`` entry that the standard library does not have.

    Example::

        from lyapunov_callbacks.datamodules import TextDataModule
        from lyapunov_callbacks.models import GPT
        dm = TextDataModule(block_size=64, batch_size=32)
        L.Trainer(max_steps=300).fit(GPT(block_size=64), datamodule=dm)
    """

    def __init__(
        self,
        block_size: int = 64,
        batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        seed: int = 0,
        files: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__()
        check_int("block_size", block_size, 1)
        check_int("batch_size", batch_size, 1)
        check_int("num_workers", num_workers, 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int, got {seed!r}.")
        check_fraction("val_fraction", val_fraction, " (0 = no validation split)")
        check_fraction("test_fraction", test_fraction, " (0 = no test split)")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"`val_fraction` + `test_fraction` = {val_fraction + test_fraction} leaves nothing to train on; "
                "keep their sum below 1."
            )
        if files is None:
            files = STDLIB_FILES
        if isinstance(files, (str, bytes)) or not isinstance(files, Sequence) or not all(isinstance(f, str) for f in files):
            raise TypeError(f"`files` must be a list of paths relative to the standard library, got {files!r}.")
        if not files:
            raise ValueError("`files` is empty; name at least one standard-library file, e.g. ['argparse.py'].")
        self.save_hyperparameters()
        self.block_size = block_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.seed = seed
        self.files = tuple(files)
        self.train_set: Optional[ByteSequenceDataset] = None
        self.val_set: Optional[ByteSequenceDataset] = None
        self.test_set: Optional[ByteSequenceDataset] = None

    @property
    def num_classes(self) -> int:
        """The vocabulary size, 256 (the CLI links it to the model's ``num_classes``)."""
        return BYTE_VOCAB

    def setup(self, stage: Optional[str] = None) -> None:
        """Read the files and build the three splits (the same for every stage)."""
        if self.train_set is not None:
            return
        stream = load_stdlib_bytes(self.files)
        span = self.block_size + 1
        n = stream.numel() // span
        windows = stream[: n * span].view(n, span)
        n_val = int(round(self.val_fraction * n))
        n_test = int(round(self.test_fraction * n))
        if n - n_val - n_test < 1:
            raise ValueError(
                f"{stream.numel()} bytes give {n} windows of {span}, none left for training; use more `files`, a "
                "smaller `block_size` or smaller fractions."
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        val_idx = perm[:n_val].sort().values
        test_idx = perm[n_val : n_val + n_test].sort().values
        train_idx = perm[n_val + n_test :].sort().values
        self.train_set = ByteSequenceDataset(windows[train_idx])
        self.val_set = ByteSequenceDataset(windows[val_idx]) if n_val else None
        self.test_set = ByteSequenceDataset(windows[test_idx]) if n_test else None

    def _require(self, dataset: Optional[Dataset], name: str) -> Dataset:
        if dataset is None:
            raise RuntimeError(f"{name} is not built; call `setup('fit')` first (the Trainer does this).")
        return dataset

    def train_dataloader(self) -> DataLoader:
        """Shuffled training loader: the order of epoch ``e`` is a function of ``(seed, e)`` only."""
        train = self._require(self.train_set, "The training set")
        return make_loader(train, self.batch_size, self.num_workers, self.seed, shuffle=True)

    def _held_out(self, dataset: Optional[Dataset], fraction: float, name: str) -> Union[DataLoader, list]:
        if self.train_set is not None and dataset is None and fraction == 0:
            return []
        return make_loader(self._require(dataset, name), self.batch_size, self.num_workers, self.seed, shuffle=False)

    def val_dataloader(self) -> Union[DataLoader, list]:
        """Validation windows in stream order; an empty list when ``val_fraction=0``."""
        return self._held_out(self.val_set, self.val_fraction, "The validation set")

    def test_dataloader(self) -> Union[DataLoader, list]:
        """Test windows in stream order; an empty list when ``test_fraction=0``."""
        return self._held_out(self.test_set, self.test_fraction, "The test set")

    def predict_dataloader(self) -> Union[DataLoader, list]:
        """The test windows again (``predict_step`` reads their inputs)."""
        return self.test_dataloader()

"""LightningDataModules: CIFAR-10 (or its offline stand-in), scikit-learn's digits, the standard library as text."""

from lyapunov_callbacks.datamodules._common import EpochShuffleSampler
from lyapunov_callbacks.datamodules.cifar10 import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10DataModule,
    CIFAR10DownloadError,
    CIFAR10NotFoundError,
    DataUnavailableError,
    synthetic_cifar10,
)
from lyapunov_callbacks.datamodules.digits import DIGITS_MEAN, DIGITS_STD, DigitsDataModule
from lyapunov_callbacks.datamodules.text import STDLIB_FILES, TextDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR10DownloadError",
    "CIFAR10NotFoundError",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "DataUnavailableError",
    "DigitsDataModule",
    "EpochShuffleSampler",
    "STDLIB_FILES",
    "TextDataModule",
    "synthetic_cifar10",
]

"""LightningDataModules (CIFAR-10)."""

from datamodules.cifar10 import CIFAR10_MEAN, CIFAR10_STD, CIFAR10DataModule, synthetic_cifar10

__all__ = ["CIFAR10DataModule", "CIFAR10_MEAN", "CIFAR10_STD", "synthetic_cifar10"]

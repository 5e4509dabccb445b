"""LightningDataModules (CIFAR-10)."""

"""LightningModules for the paper's architectures."""

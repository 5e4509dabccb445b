"""The full-training-set loss at every epoch boundary, for judging whether a schedule decreases the loss monotonically."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lyapunov_callbacks.core.state import preserved_modes, restore_rng, rng_snapshot

__all__ = ["FullTrainLoss"]

#: The tag the loss is logged under.
TAG = "train_full/loss"


class FullTrainLoss(Callback):
    """Log the mean training loss over the whole training set at the start of every epoch and at the end of fit.

    The mini-batch ``train/loss`` mixes the effect of a step with the change of batch, so it cannot tell whether
    the training objective decreased; this callback evaluates ``pl_module.training_loss`` on every training
    sample (in order, without shuffling, under ``torch.no_grad`` and in eval mode so BatchNorm uses its running
    statistics) at the weights reached after ``trainer.global_step`` steps, and logs it as ``train_full/loss`` at
    that step. Measuring leaves training untouched: train/eval modes and the global RNG (which random
    augmentations of the dataset would consume) are restored, nothing is written to parameters or ``.grad``.

    Args:
        max_batches: evaluate only the first ``max_batches`` batches of the unshuffled training set (``None``,
            the default: all of it). A fixed subset still gives a comparable per-epoch series; it exists for
            quick development runs.
        batch_size: evaluation batch size (default 512; memory only, the value does not depend on it).

    Raises:
        ValueError: ``max_batches`` or ``batch_size`` not a positive integer.

    Example::

        trainer = L.Trainer(max_epochs=10, callbacks=[FullTrainLoss()])   # logs train_full/loss per epoch
    """

    def __init__(self, max_batches: int | None = None, batch_size: int = 512) -> None:
        super().__init__()
        for name, value in (("max_batches", max_batches), ("batch_size", batch_size)):
            if value is None and name == "max_batches":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FullTrainLoss({name}={value!r}): must be a positive integer (e.g. {name}=512"
                                 f"{'' if name == 'batch_size' else ', or None for the whole training set'}).")
        self.max_batches = max_batches
        self.batch_size = batch_size
        self._last_step: int | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._measure(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._measure(trainer, pl_module)

    def _loader(self, trainer: pl.Trainer) -> DataLoader:
        source = trainer.train_dataloader
        dataset = getattr(source, "dataset", None)
        if dataset is None:
            raise RuntimeError("FullTrainLoss needs a training DataLoader with a .dataset (a map-style dataset).")
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=0)

    @torch.no_grad()
    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step or trainer.logger is None:
            return
        self._last_step = step
        rng = rng_snapshot()
        total, count = 0.0, 0
        try:
            with preserved_modes(pl_module):
                pl_module.eval()
                for i, batch in enumerate(self._loader(trainer)):
                    if self.max_batches is not None and i >= self.max_batches:
                        break
                    batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                    n = int(batch[1].shape[0])
                    total += float(pl_module.training_loss(batch)) * n
                    count += n
        finally:
            restore_rng(rng)
        if count and trainer.is_global_zero:
            trainer.logger.log_metrics({TAG: total / count}, step=step)

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict.get("last_step")

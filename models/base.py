"""The shared LightningModule of every architecture: loss, metrics, logging and the default optimizer."""

from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

#: The paper's plain SGD default: no momentum, no weight decay, so training is the map θ ← θ − η ∇L(θ).
DEFAULT_LR = 0.1
_LOSSES = ("ce", "mse")


class ImageClassifier(L.LightningModule):
    r"""Base LightningModule for image classification with cross-entropy or mean-squared-error loss.

    A subclass builds its network in ``__init__`` (after ``super().__init__(num_classes, loss)``) and
    implements :meth:`forward` returning logits ``[B, num_classes]``. Everything else — the loss, the
    metrics, the logged tags and the default optimizer — lives here.

    Losses (mean reduction, for a batch of ``B`` examples with logits :math:`f(x_b) \in \mathbb{R}^C`):

    - ``"ce"``: :math:`L = \frac{1}{B}\sum_b -\log \mathrm{softmax}(f(x_b))_{y_b}` (``F.cross_entropy``).
    - ``"mse"``: squared error against one-hot targets, averaged over batch *and* classes,
      :math:`L = \frac{1}{B C}\sum_{b=1}^{B}\sum_{c=1}^{C}\big(f_c(x_b) - [y_b = c]\big)^2`
      (``F.mse_loss(logits, one_hot(y))``; no softmax is applied to the logits).

    Logged tags: ``train/loss`` (every step, progress bar), ``train/acc`` (epoch level, micro accuracy
    over the epoch), ``val/loss`` and ``val/acc`` (epoch level), and under ``trainer.test`` (``lyapunov-cli
    test``) ``test/loss`` and ``test/acc`` (over the whole test set).

    The default :meth:`configure_optimizers` is plain SGD, ``lr=0.1``, no momentum, no weight decay.
    A LightningCLI ``optimizer:`` / ``lr_scheduler:`` section replaces it, the LightningCLI way.

    Args:
        num_classes: number of classes ``C`` (the width of the logits), at least 2. With the
            LightningCLI it is linked from the data module's ``num_classes``.
        loss: ``"ce"`` (cross-entropy) or ``"mse"`` (mean squared error against one-hot targets).

    Raises:
        ValueError: if ``num_classes < 2`` or ``loss`` is not ``"ce"`` or ``"mse"``.

    Example::

        from lyapunov_callbacks.models import MLP
        model = MLP(num_classes=2, loss="mse", hidden_sizes=[256])
        loss = model.training_loss((images, labels))   # scalar, no logging, no metric update
    """

    def __init__(self, num_classes: int = 10, loss: Literal["ce", "mse"] = "ce") -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}.")
        if loss not in _LOSSES:
            raise ValueError(f"`loss` must be one of {_LOSSES}, got {loss!r}; use 'ce' or 'mse'.")
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.loss_name = loss
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x) -> logits.")

    def loss_from_logits(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The scalar loss of ``logits [B, C]`` against integer ``labels [B]`` (see the class docstring)."""
        if self.loss_name == "ce":
            return F.cross_entropy(logits, labels)
        targets = F.one_hot(labels, num_classes=self.num_classes).to(logits.dtype)
        return F.mse_loss(logits, targets)

    def _loss_and_logits(self, batch) -> tuple[Tensor, Tensor]:
        images, labels = batch[0], batch[1]
        logits = self(images)
        return self.loss_from_logits(logits, labels), logits

    def training_loss(self, batch) -> Tensor:
        """The scalar training loss of ``batch = (images, labels)``, mean over the batch.

        This is THE hook the curvature callbacks measure (``loss_fn(model, batch) =
        model.training_loss(batch)``): a user's own LightningModule implements the same method to be
        measured. It is side-effect free — no logging, no metric update, no state change beyond what
        the forward pass itself does (e.g. BatchNorm running statistics in train mode) — and it is the
        very computation :meth:`training_step` differentiates.

        Args:
            batch: ``(images [B, 3, 32, 32], labels int64 [B])``.

        Returns:
            A 0-dim tensor connected to the graph of the parameters.
        """
        return self._loss_and_logits(batch)[0]

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss, logits = self._loss_and_logits(batch)
        labels = batch[1]
        self.train_acc(logits.detach(), labels)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=labels.shape[0])
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=labels.shape[0])
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc, prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc, prog_bar=False)

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        """The logits ``[B, num_classes]`` of ``batch = (images, labels)`` (the labels are not used), so that
        ``trainer.predict`` / ``lyapunov-cli predict`` runs on the data modules' ``(images, labels)`` batches."""
        return self(batch[0])

    def _evaluate(self, batch, stage: str, accuracy: MulticlassAccuracy, prog_bar: bool) -> None:
        """Log ``{stage}/loss`` (the batch-size weighted mean over the epoch, averaged over DDP ranks) and
        ``{stage}/acc`` (micro accuracy, the metric syncs its own counts across ranks)."""
        loss, logits = self._loss_and_logits(batch)
        labels = batch[1]
        accuracy(logits, labels)
        size = labels.shape[0]
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=prog_bar, batch_size=size, sync_dist=True)
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, batch_size=size)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Plain SGD, ``lr=0.1``, ``momentum=0``, ``weight_decay=0`` (overridden by a CLI ``optimizer:``)."""
        return torch.optim.SGD(self.parameters(), lr=DEFAULT_LR, momentum=0.0, weight_decay=0.0)


def num_parameters(module: nn.Module) -> int:
    """The number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)

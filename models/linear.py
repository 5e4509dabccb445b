"""A single linear layer on the flattened image: logistic regression (CE) or linear least squares (MSE)."""

from typing import Literal

from torch import Tensor, nn

from lyapunov_callbacks.models.base import ImageClassifier

#: CIFAR-10 images are 3 x 32 x 32.
IMAGE_FEATURES = 3 * 32 * 32


class LinearModel(ImageClassifier):
    """One ``nn.Linear(3*32*32, num_classes)`` on the flattened image.

    With ``loss="ce"`` this is multinomial logistic regression; with ``loss="mse"`` it is linear least
    squares, whose Hessian is constant (``2/(B C) XᵀX`` per output), a useful exact reference.

    Args:
        num_classes: number of classes (output width), at least 2.
        loss: ``"ce"`` or ``"mse"``, see :class:`~lyapunov_callbacks.models.base.ImageClassifier`.

    Raises:
        ValueError: on a bad ``num_classes`` or ``loss``.

    Example::

        from lyapunov_callbacks.models import LinearModel
        model = LinearModel(num_classes=2, loss="mse")
    """

    def __init__(self, num_classes: int = 10, loss: Literal["ce", "mse"] = "ce") -> None:
        super().__init__(num_classes=num_classes, loss=loss)
        self.linear = nn.Linear(IMAGE_FEATURES, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1))

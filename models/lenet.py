"""LeCun's LeNet-1, adapted to 3 x 32 x 32 colour images."""

from typing import Literal

from torch import Tensor, nn

from lyapunov_callbacks.models.base import ImageClassifier


class LeNet1(ImageClassifier):
    """LeNet-1 (LeCun et al., 1989) on CIFAR-sized input.

    ``conv 5x5 (3 -> 4 maps) -> tanh -> avgpool 2 -> conv 5x5 (4 -> 12 maps) -> tanh -> avgpool 2 ->
    linear (12*5*5 -> num_classes)``. Spatial sizes: 32 -> 28 -> 14 -> 10 -> 5.

    Args:
        num_classes: number of classes (output width), at least 2.
        loss: ``"ce"`` or ``"mse"``, see :class:`~lyapunov_callbacks.models.base.ImageClassifier`.

    Raises:
        ValueError: on a bad ``num_classes`` or ``loss``.

    Example::

        from lyapunov_callbacks.models import LeNet1
        model = LeNet1(num_classes=2, loss="ce")
    """

    def __init__(self, num_classes: int = 10, loss: Literal["ce", "mse"] = "ce") -> None:
        super().__init__(num_classes=num_classes, loss=loss)
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, kernel_size=5),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Conv2d(4, 12, kernel_size=5),
            nn.Tanh(),
            nn.AvgPool2d(2),
        )
        self.head = nn.Linear(12 * 5 * 5, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))

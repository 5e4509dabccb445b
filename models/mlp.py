"""A fully connected ReLU network on the flattened image."""

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from lyapunov_callbacks.models.base import ImageClassifier
from lyapunov_callbacks.models.linear import IMAGE_FEATURES


class MLP(ImageClassifier):
    """Multi-layer perceptron: ``Linear -> ReLU`` per hidden layer, then a linear head.

    Args:
        num_classes: number of classes (output width), at least 2.
        loss: ``"ce"`` or ``"mse"``, see :class:`~lyapunov_callbacks.models.base.ImageClassifier`.
        hidden_sizes: widths of the hidden layers, default ``(512, 512)``; ``[]`` gives the linear model.

    Raises:
        ValueError: on a bad ``num_classes`` or ``loss``, or a hidden width that is not a positive integer.

    Example::

        from lyapunov_callbacks.models import MLP
        model = MLP(num_classes=2, loss="ce", hidden_sizes=[512, 512])
    """

    def __init__(
        self,
        num_classes: int = 10,
        loss: Literal["ce", "mse"] = "ce",
        hidden_sizes: Sequence[int] = (512, 512),
    ) -> None:
        hidden_sizes = list(hidden_sizes)
        for width in hidden_sizes:
            if isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise ValueError(f"`hidden_sizes` must be a list of positive integers, got {hidden_sizes!r}.")
        super().__init__(num_classes=num_classes, loss=loss)
        layers: list[nn.Module] = [nn.Flatten()]
        in_features = IMAGE_FEATURES
        for width in hidden_sizes:
            layers += [nn.Linear(in_features, width), nn.ReLU()]
            in_features = width
        layers.append(nn.Linear(in_features, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

"""Residual networks: a narrow three-stage TinyResNet and torchvision's ResNet-18 with the CIFAR stem."""

from typing import Literal

from torch import Tensor, nn
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock

from lyapunov_callbacks.models.base import ImageClassifier

#: Channel widths of TinyResNet's three stages; stages 2 and 3 halve the resolution (32 -> 16 -> 8).
TINY_WIDTHS = (16, 32, 64)


class TinyResNet(ImageClassifier):
    """A narrow ResNet: ``conv 3x3 (16 ch) + BatchNorm + ReLU``, three stages of one ``BasicBlock`` each
    (widths 16/32/64, strides 1/2/2), global average pooling and a linear head.

    Args:
        num_classes: number of classes (output width), at least 2.
        loss: ``"ce"`` or ``"mse"``, see :class:`~lyapunov_callbacks.models.base.ImageClassifier`.

    Raises:
        ValueError: on a bad ``num_classes`` or ``loss``.

    Example::

        from lyapunov_callbacks.models import TinyResNet
        model = TinyResNet(num_classes=2, loss="ce")
    """

    def __init__(self, num_classes: int = 10, loss: Literal["ce", "mse"] = "ce") -> None:
        super().__init__(num_classes=num_classes, loss=loss)
        stem_width = TINY_WIDTHS[0]
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
        )
        blocks = []
        in_ch = stem_width
        for i, width in enumerate(TINY_WIDTHS):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or in_ch != width:
                downsample = nn.Sequential(
                    nn.Conv2d(in_ch, width, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(width)
                )
            blocks.append(BasicBlock(in_ch, width, stride=stride, downsample=downsample))
            in_ch = width
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(in_ch, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.stages(self.stem(x))).flatten(1))


class ResNet18(ImageClassifier):
    """torchvision's ResNet-18 (randomly initialised, never downloaded) with the CIFAR stem:
    ``conv1`` is 3x3, stride 1, padding 1, and the max-pool is removed, so 32x32 inputs keep their
    resolution through the first stage.

    Args:
        num_classes: number of classes (output width), at least 2.
        loss: ``"ce"`` or ``"mse"``, see :class:`~lyapunov_callbacks.models.base.ImageClassifier`.

    Raises:
        ValueError: on a bad ``num_classes`` or ``loss``.

    Example::

        from lyapunov_callbacks.models import ResNet18
        model = ResNet18(num_classes=10, loss="ce")
    """

    def __init__(self, num_classes: int = 10, loss: Literal["ce", "mse"] = "ce") -> None:
        super().__init__(num_classes=num_classes, loss=loss)
        net = resnet18(weights=None, num_classes=num_classes)
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

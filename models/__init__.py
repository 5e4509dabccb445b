"""LightningModules for the paper's architectures."""

from models.base import ImageClassifier
from models.lenet import LeNet1
from models.linear import LinearModel
from models.mlp import MLP
from models.resnet import ResNet18, TinyResNet

__all__ = ["ImageClassifier", "LeNet1", "LinearModel", "MLP", "ResNet18", "TinyResNet"]

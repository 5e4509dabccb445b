"""LightningModules for the paper's architectures and a small byte-level GPT."""

from lyapunov_callbacks.models.base import ImageClassifier
from lyapunov_callbacks.models.gpt import GPT
from lyapunov_callbacks.models.lenet import LeNet1
from lyapunov_callbacks.models.linear import LinearModel
from lyapunov_callbacks.models.mlp import MLP
from lyapunov_callbacks.models.resnet import ResNet18, TinyResNet

__all__ = ["GPT", "ImageClassifier", "LeNet1", "LinearModel", "MLP", "ResNet18", "TinyResNet"]

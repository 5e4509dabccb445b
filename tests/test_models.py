"""Tests of the five LightningModules: shapes, gradients, the loss formulas, side-effect freedom, training."""

import copy
import math

import lightning as L
import pytest
import torch

from lyapunov_callbacks.datamodules import CIFAR10DataModule
from lyapunov_callbacks.models import MLP, ImageClassifier, LeNet1, LinearModel, ResNet18, TinyResNet
from lyapunov_callbacks.models.base import num_parameters

ARCHITECTURES = [LinearModel, MLP, LeNet1, TinyResNet, ResNet18]
LOSSES = ["ce", "mse"]


def _batch(num_classes: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, 32, 32, generator=g)
    labels = torch.arange(size) % num_classes
    return images, labels


def _metric_state(metric) -> dict:
    return {k: v.clone() for k, v in metric.metric_state.items()}


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda c: c.__name__)
def test_forward_backward_and_one_sgd_step(arch, loss):
    torch.manual_seed(0)
    num_classes = 3
    model = arch(num_classes=num_classes, loss=loss)
    batch = _batch(num_classes, size=2 if arch is ResNet18 else 4)
    logits = model(batch[0])
    assert logits.shape == (batch[0].shape[0], num_classes)

    value = model.training_loss(batch)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    params = dict(model.named_parameters())
    for name, p in params.items():
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {name}"
    assert sum(p.grad.abs().sum() for p in params.values()) > 0

    before = {n: p.detach().clone() for n, p in params.items()}
    grads = {n: p.grad.clone() for n, p in params.items()}
    optimizer = model.configure_optimizers()
    optimizer.step()
    # Plain SGD: exactly θ ← θ − 0.1 ∇L(θ) on every parameter (computed as SGD rounds it: one fused add).
    for name, p in params.items():
        assert torch.equal(p.detach(), before[name].add(grads[name], alpha=-0.1)), name
    assert any(not torch.equal(p.detach(), before[n]) for n, p in params.items())


def test_mse_is_mean_over_batch_and_classes_of_squared_error_to_one_hot():
    model = LinearModel(num_classes=2, loss="mse")
    logits = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    labels = torch.tensor([1, 0])
    # one-hot [[0, 1], [1, 0]]: squares 1, 1, 0.25, 1 -> 3.25 / (B=2 * C=2)
    assert model.loss_from_logits(logits, labels).item() == pytest.approx(0.8125, abs=1e-7)

    # Through training_loss: zero weights make the logits equal the bias [0.5, -1] for every image.
    with torch.no_grad():
        model.linear.weight.zero_()
        model.linear.bias.copy_(torch.tensor([0.5, -1.0]))
    images = torch.randn(3, 3, 32, 32)
    labels = torch.tensor([0, 1, 1])
    # label 0: (0.5-1)^2 + (-1-0)^2 = 1.25; label 1: (0.5-0)^2 + (-1-1)^2 = 4.25; (1.25 + 2*4.25) / (3*2)
    assert model.training_loss((images, labels)).item() == pytest.approx(1.625, abs=1e-6)


def test_cross_entropy_matches_hand_computation():
    model = LinearModel(num_classes=2, loss="ce")
    with torch.no_grad():
        model.linear.weight.zero_()
        model.linear.bias.copy_(torch.tensor([0.0, math.log(3.0)]))  # softmax = [1/4, 3/4]
    images = torch.randn(3, 3, 32, 32)
    labels = torch.tensor([0, 1, 1])
    expected = (math.log(4.0) + 2 * math.log(4.0 / 3.0)) / 3
    assert model.training_loss((images, labels)).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("arch", [LinearModel, TinyResNet], ids=lambda c: c.__name__)
def test_training_loss_is_side_effect_free_and_equals_training_step(arch):
    torch.manual_seed(0)
    model = arch(num_classes=2, loss="mse")
    batch = _batch(2, size=4)
    acc_before = _metric_state(model.train_acc)
    params_before = [p.detach().clone() for p in model.parameters()]
    hparams_before = dict(model.hparams)

    value = model.training_loss(batch)

    assert _states_equal(_metric_state(model.train_acc), acc_before)  # no metric update
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params_before))
    assert all(p.grad is None for p in model.parameters())
    assert dict(model.hparams) == hparams_before

    # training_step computes the very same loss, and (unlike training_loss) updates the accuracy state.
    with pytest.warns(UserWarning, match="self.log"):  # no trainer attached: Lightning skips logging
        step_value = model.training_step(batch, 0)
    if arch is LinearModel:  # no BatchNorm: the forward is deterministic, so the values match exactly
        assert torch.equal(step_value, value)
    else:
        torch.testing.assert_close(step_value, value)
    assert not _states_equal(_metric_state(model.train_acc), acc_before)


def test_default_optimizer_is_plain_sgd_lr_0_1():
    model = MLP(num_classes=2, hidden_sizes=[8])
    optimizer = model.configure_optimizers()
    assert type(optimizer) is torch.optim.SGD
    (group,) = optimizer.param_groups
    assert group["lr"] == 0.1
    assert group["momentum"] == 0.0
    assert group["weight_decay"] == 0.0
    assert group["nesterov"] is False
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]


def test_hyperparameters_are_saved_including_subclass_arguments():
    model = MLP(num_classes=4, loss="mse", hidden_sizes=[16, 8])
    assert dict(model.hparams) == {"num_classes": 4, "loss": "mse", "hidden_sizes": [16, 8]}
    assert [m.out_features for m in model.net if isinstance(m, torch.nn.Linear)] == [16, 8, 4]
    assert dict(ResNet18(num_classes=10).hparams) == {"num_classes": 10, "loss": "ce"}


def test_resnet18_has_the_cifar_stem():
    net = ResNet18(num_classes=10).net
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1) and net.conv1.padding == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": 2.0}, "num_classes"),
        ({"num_classes": True}, "num_classes"),
        ({"loss": "l2"}, "loss"),
    ],
)
def test_bad_arguments_raise_naming_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LeNet1(**kwargs)


def test_bad_hidden_sizes_raise():
    with pytest.raises(ValueError, match="hidden_sizes"):
        MLP(hidden_sizes=[16, 0])


def test_base_class_has_no_network():
    with pytest.raises(NotImplementedError, match="forward"):
        ImageClassifier(num_classes=2)(torch.zeros(1, 3, 32, 32))


def _expected_parameter_count(arch, c: int) -> int:
    """Parameter counts derived by hand from the layer shapes (weights + biases / BatchNorm affine)."""
    if arch is LinearModel:
        return 3072 * c + c
    if arch is MLP:
        return (3072 * 512 + 512) + (512 * 512 + 512) + (512 * c + c)
    if arch is LeNet1:
        return (3 * 4 * 25 + 4) + (4 * 12 * 25 + 12) + (12 * 5 * 5 * c + c)
    if arch is TinyResNet:
        stem = 3 * 16 * 9 + 2 * 16
        stage1 = 2 * (16 * 16 * 9) + 2 * 2 * 16
        stage2 = 16 * 32 * 9 + 32 * 32 * 9 + 2 * 2 * 32 + 16 * 32 + 2 * 32
        stage3 = 32 * 64 * 9 + 64 * 64 * 9 + 2 * 2 * 64 + 32 * 64 + 2 * 64
        return stem + stage1 + stage2 + stage3 + 64 * c + c
    # torchvision's ImageNet ResNet-18 has 11,689,512 parameters: replace its 7x7 conv1 (3*64*49) by the
    # 3x3 CIFAR stem (3*64*9) and its 1000-way head (512*1000 + 1000) by a c-way head.
    return 11_689_512 - 3 * 64 * 49 + 3 * 64 * 9 - (512 * 1000 + 1000) + 512 * c + c


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda c: c.__name__)
def test_parameter_counts(arch):
    for c in (2, 10):
        assert num_parameters(arch(num_classes=c)) == _expected_parameter_count(arch, c)


# ------------------------------------------------------------------------------ training on fake files
def _full_training_loss(model: ImageClassifier, dm: CIFAR10DataModule) -> float:
    """Mean training loss over the whole training split, in train mode (batch statistics), on a copy."""
    probe = copy.deepcopy(model).train()
    images, labels = zip(*(dm.train_set[i] for i in range(len(dm.train_set))))
    with torch.no_grad():
        return probe.training_loss((torch.stack(images), torch.stack(labels))).item()


#: (architecture, loss, epochs, SGD learning rate, maximal final/initial training-loss ratio), with seed 0 on
#: cat vs dog of the fake CIFAR-10 files (36 training images, batch 12). The default lr 0.1 is used except for
#: linear least squares: its Hessian 2/(BC)·XᵀX has h0 ≈ 989 on these images, so SGD is only stable for
#: lr < 2/h0 ≈ 0.002 (at lr 0.1 the loss overflows to inf in a few steps). Measured ratios: Linear ce 0.0000,
#: mse 0.056; MLP ce 0.005, mse 0.016; LeNet1 ce 0.018, mse 0.0013; TinyResNet ce 0.022, mse 0.13; ResNet18 ce
#: (2 epochs) ~0.0000 — after 1 epoch (3 steps) its train-mode loss is still transiently above the start.
FIT_CASES = [
    pytest.param(LinearModel, "ce", 4, 0.1, 0.05, id="LinearModel-ce"),
    pytest.param(LinearModel, "mse", 4, 0.001, 0.2, id="LinearModel-mse"),
    pytest.param(MLP, "ce", 4, 0.1, 0.05, id="MLP-ce"),
    pytest.param(MLP, "mse", 4, 0.1, 0.1, id="MLP-mse"),
    pytest.param(LeNet1, "ce", 4, 0.1, 0.1, id="LeNet1-ce"),
    pytest.param(LeNet1, "mse", 4, 0.1, 0.05, id="LeNet1-mse"),
    pytest.param(TinyResNet, "ce", 4, 0.1, 0.1, id="TinyResNet-ce"),
    pytest.param(TinyResNet, "mse", 4, 0.1, 0.4, id="TinyResNet-mse"),
    pytest.param(ResNet18, "ce", 2, 0.1, 0.1, id="ResNet18-ce", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("arch, loss, epochs, lr, max_ratio", FIT_CASES)
def test_fit_lowers_training_loss(cifar_dir, arch, loss, epochs, lr, max_ratio):
    L.seed_everything(0, verbose=False)
    dm = CIFAR10DataModule(
        data_dir=cifar_dir, download=False, allow_unverified_files=True, classes=[3, 5], batch_size=12
    )
    dm.prepare_data()
    dm.setup("fit")
    model = arch(num_classes=dm.num_classes, loss=loss)
    if lr != 0.1:
        model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=lr)
    before = _full_training_loss(model, dm)
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
    )
    trainer.fit(model, datamodule=dm)
    after = _full_training_loss(model, dm)
    print(f"{arch.__name__}-{loss}: training loss {before:.4f} -> {after:.4f} (ratio {after / before:.4f})")
    assert math.isfinite(after)
    assert after < max_ratio * before

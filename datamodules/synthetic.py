"""The offline CIFAR-10 stand-in: 1/f colour images whose classes differ by a faint pattern.

Generative model (pixel values in [0, 1] before rounding to uint8). An image of class ``c`` is, per channel
``ch`` and pixel ``(y, x)``::

    x[ch] = mean[ch] + std[ch] * ( b_i * s_b  +  g_i * s_w * ( L @ (z_i + eps * p_{c, k_i}) )[ch] )

- ``z_i``: three independent Gaussian random fields with a 1/f^alpha_i amplitude spectrum (no DC), each scaled
  to unit standard deviation; ``alpha_i ~ U(0.8, 1.2)`` per image (natural images: alpha about 1).
- ``L``: the Cholesky factor of a fixed channel correlation (R-G 0.92, G-B 0.92, R-B 0.80, about CIFAR-10's),
  so the colour channels are strongly correlated as in photographs.
- ``b_i ~ N(0, 1)``: the image's brightness offset, ``s_b = 0.5``; ``g_i``: log-normal contrast
  (``log g ~ N(-0.045, 0.3^2)``, E g^2 = 1), ``s_w = sqrt(1 - s_b^2)``, so per channel the pixel standard
  deviation is ``std[ch]`` before clipping; ``mean`` / ``std`` are CIFAR-10's (``CIFAR10_MEAN`` / ``CIFAR10_STD``).
- The class signal ``eps * p_{c, k}``: each class owns ``K = 4`` fixed prototypes ``p_{c, k}`` (1/f fields of unit
  standard deviation drawn once from a fixed seed, part of the task's definition); image ``i`` carries one of
  them, ``k_i`` uniform, at the small amplitude ``eps = SEPARATION``. The class is thus a faint pattern hidden in
  an image-like background that is ``1 / eps`` times stronger; with several prototypes per class the best
  decision rule is not linear.

``SEPARATION`` was chosen to match the difficulty of real cat vs dog (an MLP reaches about 60-65 % validation
accuracy there) and nothing else; ``benchmarks/standin_difficulty.py`` measures it, and its output is quoted
in docs/data.md (section "The offline stand-in").

Every image is drawn from a generator seeded by ``(seed, split, class)``, so a class's images do not depend on
which other classes are selected, and the global RNG is never touched.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
import math

import torch
from torch import Tensor

__all__ = ["SEPARATION", "synthetic_cifar10", "NUM_PROTOTYPES"]

NUM_CLASSES = 10
SIZE = 32
# Amplitude of the class pattern relative to the unit-variance background (see the module docstring).
SEPARATION = 0.05
NUM_PROTOTYPES = 4
_ALPHA_RANGE = (0.8, 1.2)
_BRIGHTNESS_SHARE = 0.5
_CONTRAST_LOG_STD = 0.3
_CHANNEL_CORRELATION = ((1.0, 0.92, 0.80), (0.92, 1.0, 0.92), (0.80, 0.92, 1.0))
_MEAN = (0.4914, 0.4822, 0.4465)
_STD = (0.2470, 0.2435, 0.2616)
# The prototypes are part of the task definition, not of `seed`.
_PROTOTYPE_SEED = 20240601
_SPLITS = {"train": 0, "test": 1}


def _radial_frequency() -> Tensor:
    fy = torch.fft.fftfreq(SIZE, dtype=torch.float32).view(-1, 1)
    fx = torch.fft.rfftfreq(SIZE, dtype=torch.float32).view(1, -1)
    f = torch.sqrt(fx**2 + fy**2) * SIZE  # cycles per image
    f[0, 0] = 1.0
    return f


def _one_over_f_fields(n: int, alpha: Tensor, generator: torch.Generator) -> Tensor:
    """``[n, 3, 32, 32]`` float32 Gaussian fields with amplitude spectrum ``1/f^alpha[i]``, zero mean, unit std."""
    white = torch.randn(n, 3, SIZE, SIZE, generator=generator, dtype=torch.float32)
    spectrum = torch.fft.rfft2(white)
    amplitude = _radial_frequency().pow(-alpha.view(-1, 1, 1, 1))
    amplitude[..., 0, 0] = 0.0
    fields = torch.fft.irfft2(spectrum * amplitude, s=(SIZE, SIZE))
    return fields / fields.flatten(2).std(dim=2).view(n, 3, 1, 1)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Generate with one torch thread: the FFTs and reductions round differently with another thread count (at
    1,000 images, one thread and two gave different uint8 images), so the stand-in would depend on the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=1)
@_one_thread()
def _prototypes() -> Tensor:
    """``[10, K, 3, 32, 32]`` float32 class prototypes (1/f fields, unit std per channel)."""
    gen = torch.Generator().manual_seed(_PROTOTYPE_SEED)
    n = NUM_CLASSES * NUM_PROTOTYPES
    return _one_over_f_fields(n, torch.ones(n, dtype=torch.float32), gen).view(
        NUM_CLASSES, NUM_PROTOTYPES, 3, SIZE, SIZE
    )


def _stream_seed(seed: int, split: int, label: int) -> int:
    return ((seed * 1_000_003 + split) * 101 + label) % (2**63)


@functools.lru_cache(maxsize=24)
@_one_thread()
def _class_images(seed: int, split: int, label: int, count: int) -> Tensor:
    """``count`` uint8 ``[count, 3, 32, 32]`` images of class ``label`` (cached per process)."""
    gen = torch.Generator().manual_seed(_stream_seed(seed, split, label))
    out = torch.empty(count, 3, SIZE, SIZE, dtype=torch.uint8)
    chol = torch.linalg.cholesky(torch.tensor(_CHANNEL_CORRELATION, dtype=torch.float32))
    mean = torch.tensor(_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(_STD, dtype=torch.float32).view(1, 3, 1, 1)
    s_b = _BRIGHTNESS_SHARE
    s_w = math.sqrt(1.0 - s_b**2)
    protos = _prototypes()[label]
    chunk = 2048  # bounds the float32 working memory (~50 MB)
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        alpha = torch.empty(n, dtype=torch.float32).uniform_(*_ALPHA_RANGE, generator=gen)
        fields = _one_over_f_fields(n, alpha, gen)
        which = torch.randint(NUM_PROTOTYPES, (n,), generator=gen)
        fields += SEPARATION * protos[which]
        fields = torch.einsum("ij,njyx->niyx", chol, fields)
        brightness = torch.randn(n, 1, 1, 1, generator=gen, dtype=torch.float32)
        contrast = torch.exp(
            torch.randn(n, 1, 1, 1, generator=gen, dtype=torch.float32) * _CONTRAST_LOG_STD
            - _CONTRAST_LOG_STD**2
        )
        x = mean + std * (s_b * brightness + s_w * contrast * fields)
        out[start : start + n] = x.mul_(255.0).round_().clamp_(0.0, 255.0).to(torch.uint8)
    return out


def synthetic_cifar10(
    num_images: int, seed: int = 0, split: str = "train", classes=None
) -> tuple[Tensor, Tensor]:
    """Deterministic CIFAR-shaped stand-in images (see the module docstring for the generative model).

    Labels are balanced over the ten classes (``arange(num_images) % 10``) and shuffled by a generator seeded
    by ``(seed, split)``; the j-th image of class ``c`` in that order is the j-th image of the class's own
    stream. ``classes`` keeps only those labels (unchanged, not relabelled) and generates only their images;
    the result equals the ten-class result filtered by label.

    Args:
        num_images: Number of images over all ten classes, before ``classes`` selects some.
        seed: Seed of the labels' order and of the images.
        split: ``"train"`` or ``"test"``: independent draws for the same ``seed``.
        classes: ``None`` (all ten) or an iterable of labels in 0..9 to keep.

    Returns:
        ``(images uint8 [M, 3, 32, 32], labels int64 [M])``, ``M = num_images`` when ``classes`` is ``None``.

    Example::

        images, labels = synthetic_cifar10(1000, seed=0, split="train", classes=[3, 5])
    """
    if split not in _SPLITS:
        raise ValueError(f"`split` must be 'train' or 'test', got {split!r}.")
    n = int(num_images)
    split_index = _SPLITS[split]
    order_gen = torch.Generator().manual_seed(_stream_seed(seed, split_index, NUM_CLASSES))
    labels = (torch.arange(n, dtype=torch.int64) % NUM_CLASSES)[torch.randperm(n, generator=order_gen)]
    wanted = list(range(NUM_CLASSES)) if classes is None else sorted({int(c) for c in classes})
    keep = torch.isin(labels, torch.tensor(wanted, dtype=torch.int64))
    labels = labels[keep]
    images = torch.empty(labels.numel(), 3, SIZE, SIZE, dtype=torch.uint8)
    for c in wanted:
        where = (labels == c).nonzero().flatten()
        if where.numel():
            images[where] = _class_images(seed, split_index, c, where.numel())
    return images, labels

"""Writes small fake CIFAR-10 folders in the exact pickled format torchvision's ``CIFAR10`` reads."""

from __future__ import annotations

import os
import pickle

import numpy as np

#: The ten real CIFAR-10 class names, in label order (``batches.meta["label_names"]``).
LABEL_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
NUM_CLASSES = 10
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
BASE_FOLDER = "cifar-10-batches-py"

# Pixel noise around each class template; large enough that one gradient step does not separate the
# classes, small enough that a linear model does within a few epochs.
_NOISE_STD = 40.0


def class_template(label: int) -> np.ndarray:
    """The noise-free float64 ``[3, 32, 32]`` image (0..255 range) of class ``label``.

    A low-frequency stripe pattern whose orientation, frequency and per-channel phase depend on the class,
    so that the ten classes are distinct directions in pixel space (linearly separable up to the noise).
    """
    yy, xx = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    fx = 1 + label % 3
    fy = label // 3
    img = np.empty((3, 32, 32))
    for ch in range(3):
        phase = 2.0 * np.pi * ((label * (ch + 1)) % 7) / 7.0
        img[ch] = 128.0 + 70.0 * np.cos(2.0 * np.pi * (fx * xx + fy * yy) / 32.0 + phase)
    return img


def make_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[N, 3072]`` rows (CHW row-major, as in the real files): class template plus Gaussian noise."""
    imgs = np.stack([class_template(int(c)) for c in labels]) if len(labels) else np.empty((0, 3, 32, 32))
    imgs = imgs + rng.normal(0.0, _NOISE_STD, size=imgs.shape)
    return np.clip(np.rint(imgs), 0, 255).astype(np.uint8).reshape(len(labels), 3 * 32 * 32)


def balanced_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` labels cycling through the ten classes (counts differ by at most one), then shuffled."""
    labels = np.arange(n) % NUM_CLASSES
    rng.shuffle(labels)
    return labels


def _dump(path: str, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_fake_cifar10(root, n_per_batch: int = 40, n_test: int = 60, seed: int = 0) -> str:
    """Write ``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``.

    Every batch is a pickled dict with str keys ``"batch_label"``, ``"labels"`` (list of int),
    ``"data"`` (uint8 ``[N, 3072]``, CHW row-major) and ``"filenames"``; ``batches.meta`` holds
    ``"label_names"`` (the ten real names), ``"num_cases_per_batch"`` and ``"num_vis"``. Classes are
    balanced in each file (``n`` a multiple of 10 gives exactly ``n / 10`` per class). The files are not
    the official ones, so they fail torchvision's md5 check.

    Args:
        root: Folder to write into (created if missing).
        n_per_batch: Images in each of the five training batches (default 40, i.e. 200 training images).
        n_test: Images in the test batch (default 60).
        seed: Seed of the numpy generator for labels and pixel noise.

    Returns:
        ``str(root)``, to pass as ``data_dir``.
    """
    root = str(root)
    folder = os.path.join(root, BASE_FOLDER)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, name in enumerate(TRAIN_FILES + [TEST_FILE]):
        n = n_test if name == TEST_FILE else n_per_batch
        labels = balanced_labels(n, rng)
        batch_label = "testing batch 1 of 1" if name == TEST_FILE else f"training batch {i + 1} of 5"
        _dump(
            os.path.join(folder, name),
            {
                "batch_label": batch_label,
                "labels": [int(c) for c in labels],
                "data": make_images(labels, rng),
                "filenames": [f"fake_{name}_{j:05d}.png" for j in range(n)],
            },
        )
    _dump(
        os.path.join(folder, META_FILE),
        {"label_names": list(LABEL_NAMES), "num_cases_per_batch": n_per_batch, "num_vis": 3 * 32 * 32},
    )
    return root


def read_labels(root, train: bool = True) -> list[int]:
    """All labels written under ``root`` for the training (batches 1..5 in order) or test split."""
    names = TRAIN_FILES if train else [TEST_FILE]
    out: list[int] = []
    for name in names:
        with open(os.path.join(str(root), BASE_FOLDER, name), "rb") as f:
            out.extend(pickle.load(f, encoding="latin1")["labels"])
    return out


def read_images(root, train: bool = True) -> np.ndarray:
    """All images written under ``root`` as uint8 ``[N, 3, 32, 32]``, in file order."""
    names = TRAIN_FILES if train else [TEST_FILE]
    rows = []
    for name in names:
        with open(os.path.join(str(root), BASE_FOLDER, name), "rb") as f:
            rows.append(pickle.load(f, encoding="latin1")["data"])
    return np.vstack(rows).reshape(-1, 3, 32, 32)

"""DigitsDataModule with groups of digits as one class (even against odd: several shapes per class)."""

import pytest
import torch
from sklearn.datasets import load_digits

from lyapunov_callbacks.datamodules import DigitsDataModule
from lyapunov_callbacks.datamodules.digits import class_groups, load_digits_images

EVEN_ODD = [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]


def _setup(**kwargs):
    dm = DigitsDataModule(**kwargs)
    dm.setup("fit")
    return dm


def test_even_against_odd_sizes_shapes_and_labels():
    dm = _setup(classes=EVEN_ODD, batch_size=128)
    assert dm.num_classes == 2 and dm.groups == EVEN_ODD
    # Every one of the 1,797 digits is in a group: the split is the ten-class one, round(0.2 * 1797) = 359 held out.
    assert (len(dm.train_set), len(dm.val_set)) == (1438, 359)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (128, 3, 32, 32) and y.dtype == torch.int64 and set(y.tolist()) <= {0, 1}
    assert sorted(len(b[1]) for b in dm.train_dataloader()) == [30] + [128] * 11  # 12 batches an epoch
    # The labels are the parity of the digit: the same split of the ten-class module, relabelled.
    ten = _setup(classes=None)
    assert torch.equal(dm.train_set.images, ten.train_set.images)
    assert dm.train_set.labels.tolist() == [d % 2 for d in ten.train_set.labels.tolist()]
    assert dm.val_set.labels.tolist() == [d % 2 for d in ten.val_set.labels.tolist()]
    parity = torch.bincount(torch.from_numpy(load_digits().target) % 2)
    assert parity.tolist() == [891, 906]  # both classes about half of the 1,797 images
    assert torch.equal(torch.bincount(dm.train_set.labels) + torch.bincount(dm.val_set.labels), parity)


def test_groups_of_one_digit_equal_the_flat_list():
    flat, grouped = _setup(classes=[3, 5]), _setup(classes=[[3], [5]])
    assert flat.classes == grouped.classes == [3, 5]
    assert (len(flat.train_set), len(flat.val_set)) == (292, 73)
    assert torch.equal(flat.train_set.images, grouped.train_set.images)
    assert torch.equal(flat.train_set.labels, grouped.train_set.labels)
    images, labels = load_digits_images()
    assert flat.train_set.images.shape[0] + flat.val_set.images.shape[0] == int(((labels == 3) | (labels == 5)).sum())


def test_a_partial_grouping_keeps_only_its_digits_and_label_noise_flips_within_two_labels():
    dm = _setup(classes=[[0, 1], [7]], label_noise=0.1)
    target = torch.from_numpy(load_digits().target)
    n = int(((target == 0) | (target == 1) | (target == 7)).sum())
    assert len(dm.train_set) + len(dm.val_set) == n
    assert int(dm.flipped.sum()) == round(0.1 * len(dm.train_set))
    assert set(dm.train_set.labels.tolist()) == {0, 1}


@pytest.mark.parametrize("classes, err, match", [
    ([[0, 2], [2, 3]], ValueError, "two groups"),
    ([[0, 1, 2]], ValueError, "at least two groups"),
    ([[0, 1], []], ValueError, "empty group"),
    ([[0, 1], [10]], ValueError, "0..9"),
    ([[0, 1], 3], TypeError, "not a mix"),
    ([[0, 1], ["3"]], TypeError, "ints"),
])
def test_bad_groups_are_refused_at_construction(classes, err, match):
    with pytest.raises(err, match=match):
        DigitsDataModule(classes=classes)
    with pytest.raises(err, match=match):
        class_groups(classes)

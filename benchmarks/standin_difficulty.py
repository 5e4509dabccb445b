"""How hard the offline CIFAR-10 stand-in is: short SGD fits of the repository's MLP and a linear model.

For the two-class problem (classes 3 vs 5, as ``configs/data/cifar2_cat_dog.yaml``) and for all ten classes,
at the default split sizes (5000 training and 1000 held-out images per class), fits ``lyapunov_callbacks.models.MLP`` (3072-512-512)
and the linear model (``hidden_sizes=[]``) with plain SGD, lr 0.1, batch 128, cross-entropy, for ``--steps``
steps (default 1000), and prints the full-training-set CE loss and held-out accuracy after every epoch and at
the end. The target (real cat vs dog: an MLP reaches about 60-65 % validation accuracy; it cannot be memorised in
a few epochs) is what ``lyapunov_callbacks.datamodules.synthetic.SEPARATION`` was chosen for.

Run::

    PYTHONPATH=. python benchmarks/standin_difficulty.py            # ~10 min on 2 CPU cores
    PYTHONPATH=. python benchmarks/standin_difficulty.py --quick    # two-class MLP only
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lyapunov_callbacks.datamodules import CIFAR10DataModule  # noqa: E402
from lyapunov_callbacks.datamodules.synthetic import SEPARATION  # noqa: E402
from lyapunov_callbacks.models.mlp import MLP  # noqa: E402


def _stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(dataset))))
    return x, y


def fit(classes, hidden, steps: int, seed: int) -> list[tuple[int, float, float]]:
    """(step, full training CE, held-out accuracy) after every epoch and at ``steps``."""
    dm = CIFAR10DataModule(synthetic=True, classes=classes, batch_size=128, seed=seed)
    dm.setup("fit")
    x_train, y_train = _stack(dm.train_set)
    x_val, y_val = _stack(dm.val_set)
    torch.manual_seed(seed)
    model = MLP(num_classes=dm.num_classes, loss="ce", hidden_sizes=hidden)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = dm.train_dataloader()
    out, step = [], 0
    while step < steps:
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
            if step == steps:
                break
        with torch.no_grad():
            train_ce = F.cross_entropy(model(x_train), y_train).item()
            acc = (model(x_val).argmax(1) == y_val).float().mean().item()
        out.append((step, train_ce, acc))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="two-class MLP only")
    args = parser.parse_args(argv)
    print(f"stand-in SEPARATION = {SEPARATION}, SGD lr 0.1, batch 128, {args.steps} steps, seed {args.seed}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    runs = [("2 classes [3, 5]", [3, 5], [512, 512], "MLP 512-512")]
    if not args.quick:
        runs += [
            ("2 classes [3, 5]", [3, 5], [], "linear"),
            ("10 classes", None, [512, 512], "MLP 512-512"),
            ("10 classes", None, [], "linear"),
        ]
    print("| data | model | final train CE | final val acc | best val acc (epoch ends) | wall s |")
    print("|---|---|---|---|---|---|")
    for name, classes, hidden, model_name in runs:
        t0 = time.perf_counter()
        history = fit(classes, hidden, args.steps, args.seed)
        step, ce, acc = history[-1]
        best = max(a for _, _, a in history)
        print(f"| {name} | {model_name} | {ce:.3f} | {acc:.3f} | {best:.3f} | {time.perf_counter() - t0:.0f} |",
              flush=True)
        print("  per epoch (step, train CE, val acc): "
              + ", ".join(f"({s}, {c:.3f}, {a:.3f})" for s, c, a in history), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

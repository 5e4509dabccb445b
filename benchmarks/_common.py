"""Shared helpers of the benchmark scripts: argument parsing, synthetic batches, interleaved timing, tables."""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

# The scripts live in benchmarks/ and import the packages of the repository root.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402


def parse_args(description: str, argv: Sequence[str] | None = None, extra: Callable | None = None) -> argparse.Namespace:
    """``--quick`` (smaller run), ``--threads N`` (``torch.set_num_threads``), ``--repeats N``, ``--seed``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions (smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) before measuring")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per variant (median)")
    parser.add_argument("--seed", type=int, default=0, help="seed of model initialisation and data")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


def header(title: str, args: argparse.Namespace) -> None:
    """Print the run's context: what machine, how many threads, which mode."""
    print(f"## {title}\n")
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch threads = {torch.get_num_threads()}"
        f"{' (set with --threads)' if args.threads is not None else ' (default; not pinned)'}, "
        f"{'QUICK run' if args.quick else 'full run'}, seed {args.seed}.\n"
    )


def results_path(name: str) -> str:
    """``benchmarks/results/<name>``: where a full run of a benchmark writes the file the READMEs quote."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)


def write_results(out: str, script: str, argv: Sequence[str] | None, title: str, text: str, details: str = "") -> None:
    """Write a benchmark's markdown to ``out``: ``# title``, the command that produced it (``script`` with
    ``argv``, or this process's arguments) followed by ``details``, then ``text``."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    command = " ".join([f"python benchmarks/{script}", *(argv if argv is not None else sys.argv[1:])])
    with open(out, "w", encoding="utf-8") as fh:
        fh.write(f"# {title}\n\nProduced by `{command}`{details}.\n\n{text}")


def uptime() -> str:
    """The machine's ``uptime`` line (its load averages), printed beside timings; a note where it cannot run."""
    import subprocess

    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uptime unavailable"


def add_out_argument(parser: argparse.ArgumentParser, name: str) -> None:
    """``--out FILE``: where a run's tables are written (default for a full run: ``benchmarks/results/<name>``)."""
    parser.add_argument(
        "--out", default=None, help=f"also write the tables here (default for a full run: benchmarks/results/{name})"
    )


def out_path(args: argparse.Namespace, name: str) -> str | None:
    """The file a run writes: ``--out``, else ``benchmarks/results/<name>`` for a full run, else none."""
    return args.out or (None if args.quick else results_path(name))


class _Tee:
    """Write to several text streams (the terminal and the results buffer)."""

    def __init__(self, *streams: Any) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def recorded(out: str | None, script: str, argv: Sequence[str] | None, title: str):
    """Print as usual and, when ``out`` is given, also write everything printed inside to ``out``
    (:func:`write_results`), with the run's duration and the machine's ``uptime`` load before and after."""
    started, load_before = time.perf_counter(), uptime()
    buffer = io.StringIO()
    with contextlib.redirect_stdout(_Tee(sys.stdout, buffer)):
        yield
    if out:
        write_results(out, script, argv, title, buffer.getvalue(),
                      f" ({time.perf_counter() - started:.0f} s). Load before: `{load_before}`; after: `{uptime()}`")


def progress(message: str) -> None:
    """A progress line on stderr (the tables go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def synthetic_batch(batch_size: int, num_classes: int = 10, seed: int = 0, index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch number ``index`` of the synthetic CIFAR-shaped training loader (``classes=range(num_classes)``)."""
    from lyapunov_callbacks.datamodules import CIFAR10DataModule

    classes = None if num_classes == 10 else list(range(num_classes))
    dm = CIFAR10DataModule(
        synthetic=True, classes=classes, batch_size=batch_size, seed=seed,
        # Sizes count all ten classes before the class selection keeps num_classes/10 of them.
        synthetic_train_size=max(1000, 12 * batch_size * (index + 1) * 10 // num_classes),
        synthetic_val_size=100,
    )
    dm.setup("fit")
    for i, batch in enumerate(dm.train_dataloader()):
        if i == index:
            return batch[0].contiguous(), batch[1].contiguous()
    raise RuntimeError("synthetic training set too small for the requested batch index")


def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """The curvature callbacks' loss: ``model.training_loss(batch)``."""
    return model.training_loss(batch)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds of one call of ``fn`` (and its result)."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def interleaved_medians(
    variants: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds of each variant, timed in rounds that run every variant once (rotating the order).

    Interleaving spreads the noise of a shared machine over all variants alike instead of penalising
    whichever one happened to run during a burst of load.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            gc.collect()
            dt, _ = timed(variants[name])
            times[name].append(dt)
    return {name: statistics.median(ts) for name, ts in times.items()}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats are printed with 3 significant digits."""

    def fmt(x: Any) -> str:
        if isinstance(x, bool):
            return "yes" if x else "no"
        if isinstance(x, float):
            if x != x:
                return "nan"
            if x == 0:
                return "0"
            return f"{x:.3g}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def deep_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An independent copy (PyHessian mutates the model it is given: eval mode, graph-carrying ``.grad``)."""
    return copy.deepcopy(model)


def met(value: float, target: float, lower_is_better: bool = True) -> str:
    """``"yes"``/``"no"``: whether ``value`` meets ``target``."""
    ok = value <= target if lower_is_better else value >= target
    return "yes" if ok else "**no**"


# ---------------------------------------------------------------------------------------------- small model
def small_mlp_module(seed: int = 0, widths: Sequence[int] = (64, 256, 256, 10), lr: float = 0.1):
    """MLP 64-256-256-10 (ReLU, cross-entropy, SGD) as a LightningModule: a model whose training step is ~1.5 ms.

    It has a ``training_loss(batch)`` hook, like the project's models, so the curvature callbacks use it.
    """
    import lightning as L
    from torch import nn

    class SmallMLP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            for a, b in zip(widths[:-1], widths[1:]):
                layers += [nn.Linear(a, b), nn.ReLU()]
            self.net = nn.Sequential(*layers[:-1])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_loss(self, batch: Any) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.training_loss(batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

    torch.manual_seed(seed)
    return SmallMLP()


def digits_8x8_loader(batch_size: int = 64, seed: int = 0) -> torch.utils.data.DataLoader:
    """scikit-learn's 1797 digits as flat 8×8 = 64 features in [0, 1], shuffled by a seeded generator."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    dataset = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                       generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- the two MLPs
#: ``name -> description`` of the two models the cost benchmarks fit (``monitor_overhead.py``, ``cadence.py``).
MODELS = {
    "small": "MLP 64-256-256-10 (85,002 params), 8×8 digits, batch 64",
    "readme": "MLP 3072-512-512-2 (1,837,058 params), synthetic CIFAR stand-in, batch 128",
}


def model_data(which: str, seed: int):
    """``(datamodule or None, train loader or None)`` of the model ``which`` of :data:`MODELS`."""
    if which == "small":
        return None, digits_8x8_loader(64, seed)
    from lyapunov_callbacks.datamodules import CIFAR10DataModule

    # 10000 images over ten classes -> ~2000 of the two kept classes: ~16 batches per epoch.
    return CIFAR10DataModule(synthetic=True, classes=[0, 1], batch_size=128, seed=seed,
                             synthetic_train_size=10000, synthetic_val_size=200), None


def model_module(which: str, seed: int, lr: float = 0.1):
    """The LightningModule of the model ``which`` of :data:`MODELS` (SGD at ``lr`` for ``small``; the README MLP
    keeps its own optimiser)."""
    if which == "small":
        return small_mlp_module(seed, lr=lr)
    from lyapunov_callbacks.models import MLP

    torch.manual_seed(seed)
    return MLP(num_classes=2, hidden_sizes=[512, 512])


def fit_model(trainer, which: str, seed: int, model) -> None:
    """``trainer.fit`` of ``model`` on the data of ``which``."""
    dm, loader = model_data(which, seed)
    if dm is not None:
        trainer.fit(model, datamodule=dm)
    else:
        trainer.fit(model, train_dataloaders=loader)

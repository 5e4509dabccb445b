"""One training run of the figures plan, in a worker process of ``make_figures.py --jobs N``.

Importable by a spawned process (``figures._worker``): the pool's initializer fixes the number of torch threads of
the worker (one per worker by default: two single-threaded runs on two cores are faster than one run on two
threads, whose intra-op synchronisation loses much of the second core, and far faster when the machine is
shared) and silences the per-run Lightning chatter.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Sequence


def init(threads: int) -> None:
    """Pool initializer: ``threads`` torch threads in this process, quiet Lightning loggers."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def fit(args: Sequence[str]) -> tuple[float, float, str | None]:
    """Run ``lyapunov-cli <args>`` in this process; returns (wall seconds, CPU seconds, error or None)."""
    import torch

    from lyapunov_callbacks.cli import main as cli_main

    start, cpu = time.perf_counter(), time.process_time()
    error = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # per-run Lightning chatter (e.g. few batches per epoch)
            cli_main(list(args))
    except (Exception, SystemExit) as err:  # one broken run must not lose the others
        error = f"{type(err).__name__}: {err}"
    finally:
        torch.set_grad_enabled(True)
    return time.perf_counter() - start, time.process_time() - cpu, error

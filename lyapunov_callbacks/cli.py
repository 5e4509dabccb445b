"""The project's LightningCLI: any LightningModule / LightningDataModule by ``class_path``, per-batch cyclic LR."""

import sys
import warnings
from typing import Any, Optional

from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI, LRSchedulerTypeUnion
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CyclicLR, OneCycleLR, ReduceLROnPlateau

# Imported so that jsonargparse's subclass resolution knows them: like Lightning's own classes, ours can then be
# named by their short class name (`--model LeNet1`, `--data CIFAR10DataModule`,
# `--trainer.callbacks+=HessianEigenvalueMonitor`) and `fit --help` lists them among the known subclasses.
from lyapunov_callbacks import datamodules  # noqa: F401
from lyapunov_callbacks import models  # noqa: F401
from lyapunov_callbacks.callbacks.hessian_monitor import HessianEigenvalueMonitor  # noqa: F401
from lyapunov_callbacks.callbacks.lyapunov_monitor import LyapunovExponentMonitor  # noqa: F401
from lyapunov_callbacks.callbacks.quasi_newton import QuasiNewtonLR  # noqa: F401

#: Schedulers whose period is counted in optimizer steps, not epochs: they must be stepped every batch.
PER_STEP_SCHEDULERS: tuple[type, ...] = (CyclicLR, OneCycleLR)


#: The top-level help's note on the one subcommand that is not a LightningCLI one.
PLOT_EPILOG = (
    "Also available: plot  Draws lambda, 1/h0, alpha and the loss of finished runs from their TensorBoard logs "
    "(lyapunov_callbacks.analysis.plotting.main); for details: lyapunov-cli plot --help"
)


class LyapunovCLI(LightningCLI):
    """LightningCLI for the paper's experiments.

    Differences from the stock :class:`~lightning.pytorch.cli.LightningCLI`:

    - ``model`` and ``data`` are given by ``class_path`` (``subclass_mode_model=True``,
      ``subclass_mode_data=True``), so any LightningModule / LightningDataModule can be trained, ours or a
      user's own.
    - ``data.num_classes`` is linked to ``model.init_args.num_classes`` at instantiation, so the number of
      classes is written once (in the data module's ``classes``).
    - A ``CyclicLR`` or ``OneCycleLR`` from ``lr_scheduler:`` is returned with ``interval: "step"``: its
      ``step_size_up`` / ``total_steps`` count batches. The stock CLI steps every scheduler once per epoch,
      which silently stretches the cycle by the number of batches per epoch.
    - The saved ``config.yaml`` overwrites an older one in the same log directory.
    - Our callbacks, models and data module are imported with this module, so, like Lightning's own classes,
      they can be named by their short class name (``--model LeNet1``, ``--data CIFAR10DataModule``,
      ``--trainer.callbacks+=QuasiNewtonLR``) and ``fit --help`` lists them.
    - After ``fit`` rank zero prints where the TensorBoard logs are; the top-level ``--help`` also names the
      ``plot`` subcommand, which :func:`main` dispatches before this parser runs.

    Args:
        *args: forwarded to :class:`~lightning.pytorch.cli.LightningCLI` (e.g. ``args=[...]``, ``run=False``).
        **kwargs: forwarded likewise; ``subclass_mode_model``, ``subclass_mode_data`` and
            ``save_config_kwargs`` default as described above and may be overridden.

    Example::

        # shell: lyapunov-cli fit --config configs/cyclic/mlp_ce.yaml --data.init_args.data_dir data
        cli = LyapunovCLI(args=["--config", "configs/cyclic/mlp_ce.yaml"], run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        if kwargs.get("run", True):
            # `plot` is dispatched by `main` before the LightningCLI parser sees the command line; the top-level
            # help names it beside the LightningCLI subcommands.
            parser_kwargs = dict(kwargs.get("parser_kwargs") or {})
            parser_kwargs.setdefault("epilog", PLOT_EPILOG)
            kwargs["parser_kwargs"] = parser_kwargs
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")

    def after_fit(self) -> None:
        """Tell the user where the run's TensorBoard logs are and how to open them (printed by rank zero only).

        ``trainer.log_dir`` is a collective (a broadcast from rank zero under DDP), so every rank reads it before
        the non-zero ranks return; reading it on rank zero alone leaves rank zero waiting on peers that have
        already exited.
        """
        logger = self.trainer.logger
        if logger is None:
            return
        log_dir = self.trainer.log_dir  # collective: on every rank
        if not self.trainer.is_global_zero or log_dir is None:
            return
        root = getattr(logger, "root_dir", None) or getattr(logger, "save_dir", None) or log_dir
        print(f"\nTensorBoard logs of this run: {log_dir}\n  open them with: tensorboard --logdir {root}")

    @staticmethod
    def configure_optimizers(
        lightning_module: LightningModule, optimizer: Optimizer, lr_scheduler: Optional[LRSchedulerTypeUnion] = None
    ) -> Any:
        """The stock CLI's ``configure_optimizers``, with per-batch schedulers stepped at ``interval: "step"``."""
        if lr_scheduler is None:
            return optimizer
        if isinstance(lr_scheduler, ReduceLROnPlateau):
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": lr_scheduler, "monitor": lr_scheduler.monitor},
            }
        interval = "step" if isinstance(lr_scheduler, PER_STEP_SCHEDULERS) else "epoch"
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": interval}}


def run_cli(args: Optional[list[str]] = None, **kwargs: Any) -> LyapunovCLI:
    """Build (and by default run) a :class:`LyapunovCLI`; what ``main`` does for every non-``plot`` command.

    Args:
        args: the command line without the program name (``["fit", "--config", ...]``); ``None`` reads
            ``sys.argv[1:]``.
        **kwargs: forwarded to :class:`LyapunovCLI`, e.g. ``run=False`` to only parse and instantiate.

    Returns:
        The :class:`LyapunovCLI`, so a caller can inspect ``cli.trainer``, ``cli.model``, ``cli.datamodule``.

    Example::

        cli = run_cli(["fit", "--config", "configs/constant/mlp_ce_lr0.1.yaml", "--trainer.fast_dev_run", "true"])
        print(cli.trainer.callback_metrics)
    """
    with warnings.catch_warnings():
        # Our base module defines a default SGD `configure_optimizers`; a config's `optimizer:` replacing it
        # is the intended LightningCLI behaviour, not something to warn about on every run.
        warnings.filterwarnings("ignore", message=r".*configure_optimizers` will be overridden by")
        # args=None lets LightningCLI read sys.argv itself (it warns when given both).
        return LyapunovCLI(args=None if args is None else list(args), **kwargs)


def main(args: Optional[list[str]] = None, **kwargs: Any) -> int:
    """Console entry ``lyapunov-cli`` and ``python -m lyapunov_callbacks``; returns the exit status.

    ``lyapunov-cli plot ...`` dispatches to :func:`lyapunov_callbacks.analysis.plotting.main` (imported lazily, so
    training never imports matplotlib); anything else is a LightningCLI command line (``fit``, ``validate``,
    ``test``, ``predict``, ``--help``, ``--print_config`` ...) run by :func:`run_cli`.

    Args:
        args: the command line without the program name; ``None`` reads ``sys.argv[1:]``. Tests pass an
            explicit list to run in-process.
        **kwargs: forwarded to :class:`LyapunovCLI` (e.g. ``run=False``).

    Returns:
        0 after a LightningCLI command (LightningCLI itself exits non-zero on a bad command line), or the
        exit status of ``plotting.main`` for ``plot``. It is an int so that the console script's
        ``sys.exit(main())`` exits cleanly.

    Example::

        from lyapunov_callbacks.cli import main
        main(["fit", "--config", "configs/constant/mlp_ce_lr0.1.yaml", "--trainer.fast_dev_run", "true"])
        main(["plot", "logs/constant/mlp_ce_lr0.1/version_0", "--out", "figures/mlp.png"])
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "plot":
        from lyapunov_callbacks.analysis import plotting  # lazy: matplotlib is only needed for figures

        return int(plotting.main(argv[1:]) or 0)
    run_cli(args, **kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

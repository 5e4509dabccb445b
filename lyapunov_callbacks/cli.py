"""The project's LightningCLI: any LightningModule / LightningDataModule by ``class_path``, per-batch cyclic LR."""

import os
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

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
from lyapunov_callbacks.datamodules import DataUnavailableError

#: Schedulers whose period is counted in optimizer steps, not epochs: they must be stepped every batch.
PER_STEP_SCHEDULERS: tuple[type, ...] = (CyclicLR, OneCycleLR)


#: Appended to a data module's "no data here" error: the same choice in command-line terms.
OFFLINE_HINT = (
    " On the command line: --data.init_args.synthetic true (the offline stand-in); with make: "
    "make train DATA=synthetic or make train DATA=digits."
)

#: The top-level help's note on the one subcommand that is not a LightningCLI one.
PLOT_EPILOG = (
    "Also available: plot  Draws lambda, 1/h0, alpha and the loss of finished runs from their TensorBoard logs "
    "(lyapunov_callbacks.analysis.plotting.main); for details: lyapunov-cli plot --help"
)


class CLIArgumentError(ValueError):
    """A class named on the command line refused its arguments; the message is the refusal, on one line."""


def _innermost(exc: BaseException) -> BaseException:
    """The first exception of the chain ``exc`` was raised from (``__cause__``, else ``__context__``)."""
    seen = {id(exc)}
    while True:
        nxt = exc.__cause__ or exc.__context__
        if nxt is None or id(nxt) in seen:
            return exc
        seen.add(id(nxt))
        exc = nxt


def one_line_error(exc: BaseException) -> str:
    """One readable line for a failed instantiation: the innermost error's message, prefixed with the class whose
    ``__init__`` raised it (``HessianEigenvalueMonitor: `every_n_steps` must be ...``)."""
    root = _innermost(exc)
    owner = None
    tb = root.__traceback__
    while tb is not None:  # outermost first: the first __init__ frame is the class that was being built
        frame = tb.tb_frame
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            owner = type(frame.f_locals["self"]).__name__
            break
        tb = tb.tb_next
    message = " ".join(str(root).split()) or type(root).__name__
    return f"{owner}: {message}" if owner else message


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
    - After ``fit`` rank zero prints a summary of the run (validation accuracy, the last h0 and α, the
      quasi-Newton counters), where the TensorBoard logs are and a command that opens them; the top-level
      ``--help`` also names the ``plot`` subcommand, which :func:`main` dispatches before this parser runs.

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

    def instantiate_classes(self) -> None:
        """The stock instantiation; a class that refuses its arguments (a ``ValueError`` or ``TypeError`` at
        construction, such as a callback's check) raises :class:`CLIArgumentError` with that refusal as one line
        (:func:`one_line_error`) instead of jsonargparse's chained report. Any other error (a bug, a missing
        module) keeps its traceback."""
        try:
            super().instantiate_classes()
        except Exception as exc:  # jsonargparse wraps the class's own error in a ValueError of its own
            if not isinstance(_innermost(exc), (ValueError, TypeError)):
                raise
            raise CLIArgumentError(one_line_error(exc)) from exc

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")

    def after_fit(self) -> None:
        """Print the run's summary (:func:`fit_summary_lines`), where its TensorBoard logs are and the command that
        opens them (:func:`tensorboard_command`); rank zero only.

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
        print("\n" + "\n".join(fit_summary_lines(self.trainer)))
        print(f"TensorBoard logs of this run: {log_dir}\n  open them with: {tensorboard_command(root)}")

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


def _metric(metrics: Mapping[str, Any], tag: str) -> Optional[float]:
    value = metrics.get(tag)
    return None if value is None else float(value)


def fit_summary_lines(trainer: Any) -> list[str]:
    """What a finished fit printed last: two lines, and one per :class:`QuasiNewtonLR`.

    1. the final validation accuracy (``val/acc`` of the last validation epoch; without it, every other ``val/``
       metric, e.g. a language model's ``val/loss`` and ``val/bpb``);
    2. the last h0 and the LR α: h0 from ``quasi_newton/h0`` (``quasi_newton/pre_h0``, λ1(P⁻¹H), for Adam) or
       ``hessian/h0``; α from ``quasi_newton/lr`` or the optimiser's first param group;
    3. per ``QuasiNewtonLR``: its estimates, and the rejected, clamped and loss/Rayleigh-triggered ones.

    Args:
        trainer: the ``Trainer`` after ``fit`` (its ``callback_metrics``, ``callbacks`` and ``optimizers``).
    """
    metrics = trainer.callback_metrics
    acc = _metric(metrics, "val/acc")
    others = sorted(tag for tag in metrics if tag.startswith("val/") and _metric(metrics, tag) is not None)
    if acc is not None:
        first = f"final validation accuracy (val/acc): {acc:.4f}"
    elif others:  # a model without accuracy (a language model: val/loss, val/bpb)
        first = "final validation: " + ", ".join(f"{tag} {_metric(metrics, tag):.4g}" for tag in others)
    else:
        first = "final validation accuracy: not logged (no validation loop ran)"
    lines = [first]
    qns = [cb for cb in trainer.callbacks if isinstance(cb, QuasiNewtonLR)]
    h0_tags = [f"{qn.prefix}/{name}" for qn in qns for name in ("h0", "pre_h0")] + ["hessian/h0", "hessian/pre_h0"]
    h0_tag = next((tag for tag in h0_tags if _metric(metrics, tag) is not None), None)
    lr_tag = next((f"{qn.prefix}/lr" for qn in qns if _metric(metrics, f"{qn.prefix}/lr") is not None), None)
    if lr_tag is not None:
        lr_text = f"α = {_metric(metrics, lr_tag):.4g} ({lr_tag})"
    elif trainer.optimizers:
        lr_text = f"α = {trainer.optimizers[0].param_groups[0]['lr']:.4g} (the optimiser's first param group)"
    else:
        lr_text = "α: no optimiser"
    h0_text = (f"last h0 = {_metric(metrics, h0_tag):.4g} ({h0_tag})" if h0_tag is not None
               else "h0: not measured (no QuasiNewtonLR or HessianEigenvalueMonitor)")
    lines.append(f"{h0_text}, {lr_text}")
    for qn in qns:
        triggered = _metric(metrics, f"{qn.prefix}/triggered_estimates")
        lines.append(
            f"{qn.prefix}: {qn.rule.num_estimates} estimates, {qn.rule.rejected_estimates} rejected, "
            f"{qn.rule.clamped_estimates} clamped, {0 if triggered is None else int(triggered)} triggered by a loss jump "
            f"or the Rayleigh check"
        )
    return lines


def tensorboard_command(logdir: Any) -> str:
    """A command that opens ``logdir`` in TensorBoard as printed: the ``tensorboard`` script beside this Python
    (``.venv/bin/tensorboard`` when run from the repository), else ``<python> -m tensorboard.main``."""

    def shown(path: Path) -> str:
        try:
            return os.path.relpath(path) if Path(path).resolve().is_relative_to(Path.cwd().resolve()) else str(path)
        except ValueError:  # another drive (Windows)
            return str(path)

    script = Path(sys.executable).parent / ("tensorboard.exe" if os.name == "nt" else "tensorboard")
    launcher = shown(script) if script.is_file() else f"{shown(Path(sys.executable))} -m tensorboard.main"
    if os.sep not in launcher and not launcher.startswith("."):
        launcher = os.path.join(".", launcher)
    return f"{launcher} --logdir {shown(Path(logdir))}"


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
        0 after a LightningCLI command (LightningCLI itself exits non-zero on a bad command line); 2, after one
        line on stderr, when a class refuses its arguments (:class:`CLIArgumentError`) or the data is neither
        on disk nor downloadable (:class:`~lyapunov_callbacks.datamodules.DataUnavailableError`); or the
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
    try:
        run_cli(args, **kwargs)
    except (CLIArgumentError, DataUnavailableError) as exc:
        hint = OFFLINE_HINT if isinstance(exc, DataUnavailableError) else ""
        print(f"lyapunov-cli: error: {' '.join(str(exc).split())}{hint}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

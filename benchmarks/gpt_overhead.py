"""Time per training step of the byte-level GPT on the standard library's text, without and with the monitors.

The run file ``configs/gpt/adamw_monitors.yaml`` trains :class:`~lyapunov_callbacks.models.GPT` (its
``configs/model/gpt.yaml`` size: 4 blocks, width 64, context 64, 220,544 parameters) on
:class:`~lyapunov_callbacks.datamodules.TextDataModule` (batch 32 windows of 64 bytes) with AdamW (lr 1e-3,
weight decay 0.01) and the callbacks of ``configs/callbacks/adamw_monitors.yaml``. Each variant fits a freshly
initialised model (same seed) for ``--steps`` steps after ``WARMUP_STEPS`` untimed ones (the first h0 estimate is
a cold Lanczos solve, a compiled step compiles there), with ``logger=False``, no validation, no checkpointing, no
progress bar (``--quick``: a 2-block GPT of width 32, context 32, batch 8, to check the pipeline). The timed steps
run from the start of step ``WARMUP_STEPS`` to the end of the last one, so the steady state is compared: with
the h0 monitor every 10 steps (h0, pre_h0, batch sharpness) and λ windows of 10 steps every 50, the default 50
timed steps (steps 10-59) hold 5 estimates and 10 λ steps, the long-run shares.

Variants:

- ``plain``: AdamW alone;
- ``h0 + pre_h0 + batch sharpness / 10``: :class:`HessianEigenvalueMonitor` as in the run file;
- ``λ window 10 / 50``: :class:`LyapunovExponentMonitor` as in the run file;
- ``both (the run file)``: the two monitors;
- ``--compiled`` times, instead, ``plain`` and ``both`` beside ``compiled plain`` and ``compiled, both``: the same
  after ``module.compile()`` (default inductor backend), where the measurements run the eager code
  (``docs/compiled-and-transformers.md``); it writes ``benchmarks/results/gpt_overhead_compiled.md``.

Reported per variant (median over ``--repeats`` interleaved rounds): the CPU time of this process per step
(``time.process_time``; on one thread this is the compute, whatever else the machine runs) and the wall-clock
time per step, each also over the plain fit's; the HVPs per h0 estimate (h0 + pre_h0 + batch sharpness) of the
timed steps; and the machine's ``uptime`` load before and after. Torch runs on one thread unless ``--threads N``
is given (on a 2-core machine shared with other work, two threads make a step up to ten times slower). Writes
``benchmarks/results/gpt_overhead.md`` for a full run (``--out``).

Run: ``python benchmarks/gpt_overhead.py [--quick] [--compiled] [--threads N] [--repeats N] [--steps N]``.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
import warnings

import _common as C
import torch

#: Untimed steps before the timed ones: the cold first estimate (and compilation) happen there.
WARMUP_STEPS = 10
#: The h0 monitor's period in the run file, and the one HVP its batch sharpness adds to each estimate.
EVERY, BATCH_SHARPNESS_HVPS = 10, 1
LR, WEIGHT_DECAY = 1e-3, 0.01
#: The run file's model and batch; ``--quick`` (a pipeline check, not a measurement) fits a smaller GPT.
SIZES = {
    "full": {"block_size": 64, "embed_dim": 64, "num_layers": 4, "num_heads": 4, "batch_size": 32},
    "quick": {"block_size": 32, "embed_dim": 32, "num_layers": 2, "num_heads": 2, "batch_size": 8},
}


class _StepClock:
    """Seconds from the start of step ``first`` to the end of the last step, and the HVPs of the timed estimates."""

    def __init__(self, first: int) -> None:
        import lightning as L

        class Clock(L.Callback):
            def on_train_batch_start(inner, trainer, pl_module, batch, batch_idx):  # noqa: N805
                if trainer.global_step == first:
                    self.start, self.cpu_start = time.perf_counter(), time.process_time()

            def on_before_optimizer_step(inner, trainer, pl_module, optimizer):  # noqa: N805
                # After the monitors (this callback comes last): their values of this step are published.
                metrics = trainer.callback_metrics
                if trainer.global_step >= first and trainer.global_step % EVERY == 0 and "hessian/num_hvps" in metrics:
                    self.hvps.append(sum(float(metrics.get(k, 0.0)) for k in ("hessian/num_hvps", "hessian/pre_num_hvps"))
                                     + BATCH_SHARPNESS_HVPS)

            def on_train_batch_end(inner, trainer, pl_module, outputs, batch, batch_idx):  # noqa: N805
                self.end, self.cpu_end = time.perf_counter(), time.process_time()

        self.callback = Clock()
        self.start = self.end = self.cpu_start = self.cpu_end = None
        self.hvps: list[float] = []

    @property
    def seconds(self) -> tuple[float, float]:
        """(CPU seconds of this process, wall-clock seconds) of the timed steps."""
        return self.cpu_end - self.cpu_start, self.end - self.start


def _model(size: dict):
    from lyapunov_callbacks.models import GPT

    return GPT(**{k: v for k, v in size.items() if k != "batch_size"})


def _fit(callbacks, steps: int, seed: int, compiled: bool, size: dict) -> tuple[float, list]:
    import lightning as L

    from lyapunov_callbacks.datamodules import TextDataModule

    torch.manual_seed(seed)
    model = _model(size)
    model.configure_optimizers = lambda: torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    if compiled:
        torch._dynamo.reset()
        model.compile()
    dm = TextDataModule(block_size=size["block_size"], batch_size=size["batch_size"], seed=seed)
    clock = _StepClock(WARMUP_STEPS)
    trainer = L.Trainer(
        max_steps=WARMUP_STEPS + steps, callbacks=[*callbacks, clock.callback], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        accelerator="cpu", devices=1,
    )
    trainer.fit(model, datamodule=dm)
    cpu, wall = clock.seconds
    return cpu / steps, wall / steps, clock.hvps


def _variants(compiled: bool) -> dict[str, tuple]:
    from lyapunov_callbacks import HessianEigenvalueMonitor, LyapunovExponentMonitor

    def h0():
        return HessianEigenvalueMonitor(every_n_steps=EVERY, pre_h0=True, batch_sharpness=True)

    def lam():
        return LyapunovExponentMonitor(window=10, every_n_steps=50)

    if compiled:
        return {
            "plain": (lambda: [], False),
            "both (the run file)": (lambda: [h0(), lam()], False),
            "compiled plain": (lambda: [], True),
            "compiled, both": (lambda: [h0(), lam()], True),
        }
    return {
        "plain": (lambda: [], False),
        "h0 + pre_h0 + batch sharpness / 10": (lambda: [h0()], False),
        "λ window 10 / 50": (lambda: [lam()], False),
        "both (the run file)": (lambda: [h0(), lam()], False),
    }


def main(argv=None) -> int:
    def extra(parser):
        C.add_out_argument(parser, "gpt_overhead.md or gpt_overhead_compiled.md")
        parser.add_argument("--steps", type=int, default=None, help="timed steps per fit (default 50; quick 20)")
        parser.add_argument("--compiled", action="store_true", help="also time module.compile() (inductor)")

    args = C.parse_args(__doc__.splitlines()[0], argv, extra)
    if args.threads is None:
        torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    steps = args.steps or (20 if args.quick else 50)
    repeats = args.repeats or (1 if args.quick else 2)
    variants = _variants(args.compiled)
    name = "gpt_overhead_compiled.md" if args.compiled else "gpt_overhead.md"
    title = "GPT time per step with the monitors" + (", compiled and eager" if args.compiled else "")
    size = SIZES["quick" if args.quick else "full"]
    params = sum(p.numel() for p in _model(size).parameters())
    with C.recorded(C.out_path(args, name), "gpt_overhead.py", argv, title):
        C.header(f"GPT ({params:,} parameters) on the standard library's text, AdamW, CPU", args)
        print(f"{steps} timed steps after {WARMUP_STEPS} untimed ones, batch {size['batch_size']} × "
              f"{size['block_size']} bytes, median of {repeats} interleaved rounds.\n")
        times: dict[str, list[float]] = {name: [] for name in variants}
        walls: dict[str, list[float]] = {name: [] for name in variants}
        hvps: dict[str, float] = {}
        names = list(variants)
        for r in range(repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                make, compiled = variants[name]
                C.progress(f"round {r + 1}/{repeats}: {name}")
                per_step, wall_per_step, counts = _fit(make(), steps, args.seed, compiled, size)
                times[name].append(per_step)
                walls[name].append(wall_per_step)
                hvps[name] = sum(counts) / len(counts) if counts else float("nan")
        base, wall_base = statistics.median(times["plain"]), statistics.median(walls["plain"])
        rows = []
        for name in names:
            med, wall = statistics.median(times[name]), statistics.median(walls[name])
            rows.append([name, f"{med * 1e3:.0f}", f"{med / base:.2f}", f"{wall * 1e3:.0f}", f"{wall / wall_base:.2f}",
                         hvps[name]])
        print(C.table(["variant", "CPU ms/step", "CPU time / plain", "wall ms/step", "wall / plain",
                       "HVPs per estimate"], rows))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

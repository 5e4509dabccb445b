"""What a curvature estimate costs under FSDP2 (Lightning's ModelParallelStrategy, 2 CPU processes, gloo): time and
peak memory per rank of a monitored training step against an unmonitored one.

Models (float32, both smooth, AdamW lr 1e-3):

- ``gpt``: :class:`~lyapunov_callbacks.models.GPT` at its run-file size (4 blocks, width 64, context 64, 220,544
  parameters; ``configure_model`` shards each block and the model), batches of 16 windows per rank from
  :class:`~lyapunov_callbacks.datamodules.TextDataModule`;
- ``mlp``: a wide tanh MLP 1024 → 2048 → 2048 → 10 (6,316,042 parameters, 25.3 MB; 12.6 MB of shards per rank),
  cross-entropy on 64 random inputs per rank: large enough that a full gather of the parameters would show in the
  peak memory.

:class:`~lyapunov_callbacks.HessianEigenvalueMonitor` measures h0 and ``pre_h0`` (``every_n_steps=EVERY``,
``tol=1e-3``) with central differences of the strategy's gradients. For each step after ``WARMUP`` untimed ones,
each rank records its CPU time (``time.process_time``, one thread per process) and the growth of its peak resident
memory over the memory at the step's start (``VmHWM`` after resetting it through ``/proc/self/clear_refs``). Each
model is fitted twice: with glibc's default allocator for the times, and with glibc told to return freed tensor
memory at once (:data:`MALLOC`; slower) for the memory, so that the resident set follows the live tensors. Reported
per model (rank 0 and rank 1 alike; the larger of the two): the median over unmonitored steps and over monitored
steps, their ratio, the HVPs per estimate, and the extra peak memory of a monitored step in MB and in units of this
rank's shard size.

Run: ``python benchmarks/sharded.py [--quick] [--out PATH]`` (writes ``benchmarks/results/sharded.md`` by default; the
script relaunches itself as rank 1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORLD_SIZE = 2
EVERY = 4
WARMUP = 4
#: glibc serves every allocation of 64 KiB or more by its own mmap and unmaps it when freed, so the resident set
#: follows the live tensors (by default freed memory stays in malloc's arenas, and a later allocation reusing it
#: would not show in the peak).
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _peak_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def _current_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _wide_mlp():
    """The wide tanh MLP as a LightningModule (built here so that Lightning is imported only when a fit runs)."""
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(1024, 2048), nn.Tanh(), nn.Linear(2048, 2048), nn.Tanh(),
                                     nn.Linear(2048, 10))

        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def training_loss(self, batch):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def training_step(self, batch, batch_idx):
            return self.training_loss(batch)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(1 + self.global_rank)
            x, y = torch.randn(64 * 40, 1024, generator=g), torch.randint(0, 10, (64 * 40,), generator=g)
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)

    return Module(), None


def _gpt():
    from lyapunov_callbacks.datamodules import TextDataModule
    from lyapunov_callbacks.models import GPT

    torch.manual_seed(0)
    return GPT(block_size=64, embed_dim=64, num_layers=4, num_heads=4), TextDataModule(batch_size=16, block_size=64)


def _run(model_name: str, steps: int, out: Path) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lyapunov_callbacks import HessianEigenvalueMonitor

    torch.set_num_threads(1)
    module, data = _gpt() if model_name == "gpt" else _wide_mlp()
    monitor = HessianEigenvalueMonitor(every_n_steps=EVERY, tol=1e-3, pre_h0=True)
    rows: list[dict] = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.cpu, self.base = time.process_time(), _current_kb()
            _reset_peak()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step - 1
            if step < WARMUP:
                return
            shard = sum(p.to_local().numel() * p.element_size() for p in pl_module.parameters())
            rows.append({
                "step": step, "monitored": step % EVERY == 0, "cpu_s": time.process_time() - self.cpu,
                "extra_peak_mb": (_peak_kb() - self.base) / 1024, "shard_mb": shard / 2**20,
                "hvps": (monitor.last_metrics.get("hessian/num_hvps", 0) + monitor.last_metrics.get(
                    "hessian/pre_num_hvps", 0)) if step % EVERY == 0 else 0,
            })

        def on_train_end(self, trainer, pl_module):
            (out / f"{model_name}_rank{trainer.global_rank}.json").write_text(json.dumps(rows))

    trainer = pl.Trainer(
        accelerator="cpu", devices=WORLD_SIZE,
        strategy=ModelParallelStrategy(data_parallel_size=WORLD_SIZE, tensor_parallel_size=1),
        max_steps=WARMUP + steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[monitor, Probe()],
    )
    trainer.fit(module, datamodule=data)


def _table(out: Path, models: list[str], memory: Path | None = None) -> str:
    """The table from the ranks' records in ``out`` (times; memory from ``memory`` when given, else ``out``)."""
    memory = out if memory is None else memory
    lines = [
        "| model | parameters | shard per rank (MB) | unmonitored step CPU (s) | monitored step CPU (s) | ratio "
        "| HVPs per estimate (h0 + pre_h0) | extra peak memory of a monitored step (MB) | in shards |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    sizes = {"gpt": 220_544, "mlp": 6_316_042}
    for name in models:
        ranks = [json.loads((out / f"{name}_rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
        memory_ranks = [json.loads((memory / f"{name}_rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
        plain = max(statistics.median(r["cpu_s"] for r in rows if not r["monitored"]) for rows in ranks)
        monitored = max(statistics.median(r["cpu_s"] for r in rows if r["monitored"]) for rows in ranks)
        hvps = statistics.median(r["hvps"] for r in ranks[0] if r["monitored"])
        extra = max(
            statistics.median(r["extra_peak_mb"] for r in rows if r["monitored"])
            - statistics.median(r["extra_peak_mb"] for r in rows if not r["monitored"])
            for rows in memory_ranks
        )
        shard = max(rows[0]["shard_mb"] for rows in ranks)
        lines.append(
            f"| {name} | {sizes[name]:,} | {shard:.2f} | {plain:.3f} | {monitored:.3f} | {monitored / plain:.1f} "
            f"| {hvps:.0f} | {extra:.1f} | {extra / shard:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 timed steps of the GPT only (a pipeline check)")
    parser.add_argument("--steps", type=int, default=16, help="timed steps per model (default 16: 4 estimates)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sharded.md"))
    parser.add_argument("--model", help=argparse.SUPPRESS)  # the child run: one model, results to --workdir
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model:  # one fit (Lightning relaunches this same command line for rank 1)
        _run(args.model, args.steps, Path(args.workdir))
        return
    models = ["gpt"] if args.quick else ["gpt", "mlp"]
    steps = 8 if args.quick else args.steps
    import subprocess

    with tempfile.TemporaryDirectory() as times, tempfile.TemporaryDirectory() as memory:
        for name in models:
            for work, malloc in ((times, {}), (memory, MALLOC)):
                subprocess.run([sys.executable, __file__, "--model", name, "--steps", str(steps), "--workdir", work],
                               check=True, env={**os.environ, **malloc, "PYTHONWARNINGS": "ignore"})
        table = _table(Path(times), models, Path(memory))
    load = os.getloadavg()
    text = (
        "# Curvature estimates under FSDP2 (`python benchmarks/sharded.py`)\n\n"
        f"{WORLD_SIZE} CPU processes (gloo), one thread each; `HessianEigenvalueMonitor(every_n_steps={EVERY}, "
        f"tol=1e-3, pre_h0=True)` with AdamW; {steps} timed steps per model after {WARMUP} untimed ones; medians, "
        f"the larger of the two ranks; times with glibc's default allocator, peak memory from a second fit with glibc "
        f"returning freed blocks of 64 KiB or more at once. "
        f"Load average after the run: {load[0]:.2f}.\n\n{table}\n"
    )
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

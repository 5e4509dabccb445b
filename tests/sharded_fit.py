"""A 2-process fit under Lightning's ModelParallelStrategy (FSDP2, gloo on CPU) with the curvature callbacks.

Run as a script (Lightning relaunches this file for rank 1): ``python tests/sharded_fit.py OUT FIT [FIT ...]``, each
FIT ``MODEL:OPTIMIZER:RULE``, fitted one after the other in the same two processes (the process group is set up
once): MODEL ``linear`` (least squares: a quadratic loss) or ``mlp`` (a tanh network), OPTIMIZER ``sgd``, ``sgdm``
(momentum 0.9) or ``adamw``, RULE QuasiNewtonLR's rule (``newton``, ``batch_sharpness``), or ``monitors`` (the two
monitors, no QuasiNewtonLR) or ``plain`` (no curvature callback: the trajectory the monitors must leave unchanged).
Each rank writes ``OUT/<MODEL>_<OPTIMIZER>_<RULE>/rank<r>.json``: per measured step the monitor's and
QuasiNewtonLR's logged values, the layout of the parameters, and how often a DTensor was gathered while the
callbacks ran. Rank 0 also writes the full weights at each measurement and the union of the ranks' batches
(gathered by this recorder, outside the callbacks), from which ``tests/callbacks/test_sharded_fit.py`` computes exact single-process references.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lightning.pytorch as pl
from lightning.pytorch.strategies import ModelParallelStrategy

from lyapunov_callbacks import HessianEigenvalueMonitor, LyapunovExponentMonitor, QuasiNewtonLR

WORLD_SIZE = 2
PER_RANK_BATCH = 8
STEPS = 3
IN, HIDDEN, OUT_DIM = 6, 5, 3


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(WORLD_SIZE * PER_RANK_BATCH * STEPS, IN, generator=g, dtype=torch.float64)
    y = torch.stack([torch.sin(2.0 * x[:, 0]), x[:, 1] ** 2, x[:, 2] * x[:, 3]], dim=1)
    return TensorDataset(x, y)


def network(model: str) -> nn.Module:
    torch.manual_seed(0)
    if model == "linear":  # least squares: the loss is quadratic in the weights
        return nn.Sequential(Regression()).double()
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT_DIM)).double()


class Regression(nn.Module):
    """``x @ w + b`` with ``w`` of shape ``[IN, 1]``: one output, so the Hessian (XᵀX with the bias) repeats no
    eigenvalue (a multi-output linear layer repeats each once per output), and ``w``'s first dimension is the one
    FSDP2 shards (``nn.Linear(IN, 1)``'s weight has a single row, all on one rank)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(IN, 1) / IN**0.5)
        self.bias = nn.Parameter(torch.zeros(1))  # one entry: rank 1's shard of it is empty

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def loss_of(net: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    prediction = net(x)
    return nn.functional.mse_loss(prediction, y[:, : prediction.shape[1]])


class Sharded(pl.LightningModule):
    def __init__(self, model: str, optimizer: str, sharded: bool = True) -> None:
        super().__init__()
        self.net = network(model)
        self.optimizer, self.sharded = optimizer, sharded

    def configure_model(self) -> None:
        if not self.sharded:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, (nn.Linear, Regression)):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        return loss_of(self.net, batch)

    def configure_optimizers(self):
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.1)
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9 if self.optimizer == "sgdm" else 0.0)

    def train_dataloader(self):
        dataset = data()
        if not self.sharded:
            return DataLoader(dataset, batch_size=WORLD_SIZE * PER_RANK_BATCH, shuffle=False)
        # Rank r gets samples r, r + 2, ...: the union of the ranks' step-s batches is the single process's batch s.
        sampler = DistributedSampler(dataset, num_replicas=WORLD_SIZE, rank=self.global_rank, shuffle=False)
        return DataLoader(dataset, batch_size=PER_RANK_BATCH, sampler=sampler)


class Gathers:
    """Counts DTensor gathers (``full_tensor``, ``redistribute``) made while ``counting`` is on."""

    def __init__(self) -> None:
        from torch.distributed.tensor import DTensor

        self.count, self.counting = 0, True
        for name in ("full_tensor", "redistribute"):
            original = getattr(DTensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.count += int(self.counting)
                return _original(tensor, *args, **kwargs)

            setattr(DTensor, name, counted)


class Recorder(pl.Callback):
    """Last in the callback list: reads what the monitors logged at this step; rank 0 also saves the weights."""

    def __init__(self, out: Path, gathers: Gathers | None, start_delta: list | None = None) -> None:
        self.out, self.gathers, self.steps = out, gathers, {}
        self.weights, self.batches = {}, {}
        self.start_delta, self.delta = start_delta, None

    def on_train_start(self, trainer, pl_module):
        """The λ monitor's start δ: saved (gathered) here, or, for the reference run, replaced by a saved one."""
        monitor = next((cb for cb in trainer.callbacks if isinstance(cb, LyapunovExponentMonitor)), None)
        if monitor is None:
            return
        if self.start_delta is not None:  # the single-process reference starts from the sharded run's δ
            monitor.tangent.delta_theta = torch.tensor(self.start_delta, dtype=monitor.tangent.dtype)
            return
        delta = monitor.tangent.delta_theta
        if trainer.world_size > 1:  # this rank's entries, parameter by parameter: gather each parameter's rows
            pieces, offset = [], 0
            for p in pl_module.net.parameters():
                n = p.to_local().numel()
                local = delta[offset : offset + n].view(p.to_local().shape)
                offset += n
                full = torch.distributed.tensor.DTensor.from_local(local, p.device_mesh, p.placements,
                                                                   shape=p.shape, stride=p.stride())
                self.gathers.counting = False
                pieces.append(full.full_tensor().reshape(-1))
                self.gathers.counting = True
            delta = torch.cat(pieces)
        self.delta = delta.tolist()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch = batch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step
        values = {}
        for cb in trainer.callbacks:
            if isinstance(cb, (HessianEigenvalueMonitor, LyapunovExponentMonitor)) and cb.last_metrics:
                values.update(cb.last_metrics)
        values["lr"] = optimizer.param_groups[0]["lr"]
        self.steps[step] = values
        if self.gathers is not None:
            self.gathers.counting = False
        params = list(pl_module.net.parameters())
        full = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in params]
        x, y = self._batch
        if trainer.world_size > 1:
            xs = [torch.empty_like(x) for _ in range(trainer.world_size)]
            ys = [torch.empty_like(y) for _ in range(trainer.world_size)]
            torch.distributed.all_gather(xs, x.contiguous())
            torch.distributed.all_gather(ys, y.contiguous())
            x, y = torch.cat(xs), torch.cat(ys)
        if self.gathers is not None:
            self.gathers.counting = True
        self.weights[step] = [t.tolist() for t in full]
        self.batches[step] = [x.tolist(), y.tolist()]

    def on_train_end(self, trainer, pl_module):
        params = list(pl_module.net.parameters())
        record = {
            "steps": self.steps,
            "types": sorted({type(p).__name__ for p in params}),
            "local_numel": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params),
            "numel": sum(p.numel() for p in params),
            "gathers_in_callbacks": None if self.gathers is None else self.gathers.count,
            # this rank's shards after the last step, as they are (no gather)
            "final_shards": [(p.to_local() if hasattr(p, "to_local") else p).detach().tolist() for p in params],
        }
        if trainer.global_rank == 0:
            record["weights"], record["batches"], record["start_delta"] = self.weights, self.batches, self.delta
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def callbacks(optimizer: str, rule: str) -> list[pl.Callback]:
    if rule == "plain":
        return []
    monitor = HessianEigenvalueMonitor(every_n_steps=1, k=3, tol=1e-8, max_iter=60, pre_h0=optimizer == "adamw",
                                       batch_sharpness=True)
    qn = QuasiNewtonLR(every_n_steps=1, tol=1e-8, warmup_tol=1e-8, warmup_max_hvps=60, max_iter=60,
                       rule=rule if rule != "monitors" else "newton")
    lyapunov = LyapunovExponentMonitor(window=1)  # λ of every step: one log growth each
    if rule == "monitors":
        return [monitor, lyapunov]
    return [monitor, qn, lyapunov]


def fit(
    out: Path, model: str, optimizer: str, rule: str = "newton", sharded: bool = True, start_delta: list | None = None
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    gathers = Gathers() if sharded else None
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE if sharded else 1,
        strategy=ModelParallelStrategy(data_parallel_size=WORLD_SIZE, tensor_parallel_size=1) if sharded else "auto",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[*callbacks(optimizer, rule), Recorder(out, gathers, start_delta)],
    )
    trainer.fit(Sharded(model, optimizer, sharded=sharded))


def folder(out: Path, spec: str) -> Path:
    return out / spec.replace(":", "_")


if __name__ == "__main__":
    for spec in sys.argv[2:]:
        fit(folder(Path(sys.argv[1]), spec), *spec.split(":"))

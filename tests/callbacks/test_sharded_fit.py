"""The curvature callbacks under Lightning's ModelParallelStrategy (FSDP2, 2 CPU processes, gloo) against exact
single-process references on the union of the ranks' batches, and what is refused under sharding and why."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

import lightning.pytorch as pl

from lyapunov_callbacks import HessianEigenvalueMonitor, LyapunovExponentMonitor
from lyapunov_callbacks.callbacks._setup import check_sharding
from lyapunov_callbacks.core.sharded import ShardingError

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
import sharded_fit  # noqa: E402
from dense_hessian import dense_hessian  # noqa: E402


# The 2-process fits the slow tests read, run one after the other in one launch of two processes (a launch
# costs more than the fits: two interpreters importing Lightning and a gloo process group).
FITS = ["linear:sgd:newton", "mlp:adamw:newton", "mlp:sgdm:batch_sharpness", "mlp:adamw:plain", "mlp:adamw:monitors"]


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("sharded")
    proc = subprocess.run(
        [sys.executable, str(TESTS / "sharded_fit.py"), str(out), *FITS],
        cwd=TESTS.parent, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # The switch from hvp="autograd" is said, not silent (once per process: the first fit says it).
    assert "central finite differences of the strategy's own gradients" in proc.stderr
    return {
        spec: [json.loads((sharded_fit.folder(out, spec) / f"rank{r}.json").read_text())
               for r in range(sharded_fit.WORLD_SIZE)]
        for spec in FITS
    }  # fmt: skip


def _exact_hessian(record: dict, step: str, model: str) -> torch.Tensor:
    net = sharded_fit.network(model)
    with torch.no_grad():
        for p, w in zip(net.parameters(), record["weights"][step]):
            p.copy_(torch.tensor(w, dtype=torch.float64))
    x, y = (torch.tensor(t, dtype=torch.float64) for t in record["batches"][step])
    return dense_hessian(net, sharded_fit.loss_of, (x, y))


def _exact_top(record: dict, step: str, model: str, k: int = 3) -> torch.Tensor:
    return torch.linalg.eigvalsh(_exact_hessian(record, step, model)).flip(0)[:k]


def _check_sharded_and_identical(ranks: list[dict]) -> None:
    assert ranks[0]["steps"] == ranks[1]["steps"]  # every logged value bit-identical on both ranks
    for record in ranks:
        assert record["types"] == ["DTensor"]  # every parameter really is a shard
        assert record["gathers_in_callbacks"] == 0  # nothing was gathered while the callbacks ran
    assert ranks[0]["local_numel"] + ranks[1]["local_numel"] == ranks[0]["numel"]
    assert 0 < ranks[1]["local_numel"] < ranks[0]["numel"]
    assert sorted(map(int, ranks[0]["steps"])) == list(range(sharded_fit.STEPS))


@pytest.mark.slow  # two processes that import Lightning and fit 3 steps, five times
def test_least_squares_h0_top3_lambda_and_the_qn_lr_equal_the_exact_union_hessian(sharded_runs):
    ranks = sharded_runs["linear:sgd:newton"]
    _check_sharded_and_identical(ranks)
    for step, values in ranks[0]["steps"].items():
        exact = _exact_top(ranks[0], step, "linear")
        measured = torch.tensor([values["hessian/h0"], values["hessian/h1"], values["hessian/h2"]], dtype=torch.float64)
        assert measured == pytest.approx(exact, rel=1e-3)  # the stated bound for a quadratic loss
        assert measured == pytest.approx(exact, rel=1e-6)  # and what central differences give in float64
        assert values["lr"] == pytest.approx(1.0 / float(exact[0]), rel=1e-6)  # QN: α = 1/h0 (plain SGD)
    assert len({v["lr"] for v in ranks[0]["steps"].values()}) == sharded_fit.STEPS  # the LR follows h0
    # λ of each step (window 1) is log‖(I − αH)δ‖ of the unit tangent δ, from the start δ the ranks drew.
    delta = torch.tensor(ranks[0]["start_delta"], dtype=torch.float64)
    for step in sorted(ranks[0]["steps"], key=int):
        values = ranks[0]["steps"][step]
        moved = delta - values["lr"] * (_exact_hessian(ranks[0], step, "linear") @ delta)
        growth = float(torch.log(torch.linalg.vector_norm(moved) / torch.linalg.vector_norm(delta)))
        assert values["lyapunov/lambda"] == pytest.approx(growth, rel=1e-6, abs=1e-9), step
        delta = moved / torch.linalg.vector_norm(moved)


@pytest.mark.slow
def test_tanh_mlp_with_adamw_h0_pre_h0_lambda_and_the_qn_lr_equal_one_process_on_the_union(sharded_runs, tmp_path):
    ranks = sharded_runs["mlp:adamw:newton"]
    _check_sharded_and_identical(ranks)
    # One process on the union batch with exact HVPs (autograd), its λ tangent started from the ranks' δ.
    _check_equal_to_one_process(tmp_path, ranks, "mlp", "adamw", "newton")


@pytest.mark.slow
def test_momentum_sgd_with_the_batch_sharpness_rule_equals_one_process_on_the_union(sharded_runs, tmp_path):
    ranks = sharded_runs["mlp:sgdm:batch_sharpness"]
    _check_sharded_and_identical(ranks)
    _check_equal_to_one_process(tmp_path, ranks, "mlp", "sgdm", "batch_sharpness")
    assert len({v["lr"] for v in ranks[0]["steps"].values()}) == sharded_fit.STEPS  # the LR follows the rule


@pytest.mark.slow
def test_the_monitors_leave_a_sharded_adamw_fit_bit_for_bit_unchanged(sharded_runs):
    plain = sharded_runs["mlp:adamw:plain"]
    monitored = sharded_runs["mlp:adamw:monitors"]
    measured = monitored[0]["steps"]["2"]
    assert math.isfinite(measured["lyapunov/lambda"]) and measured["hessian/pre_h0"] > 0  # both monitors measured
    assert "hessian/h0" not in plain[0]["steps"]["2"]
    assert monitored[0]["weights"] == plain[0]["weights"]  # the full weights before every step
    for rank in range(sharded_fit.WORLD_SIZE):  # and each rank's shards after the last one
        assert monitored[rank]["final_shards"] == plain[rank]["final_shards"]


def _check_equal_to_one_process(tmp_path: Path, ranks: list[dict], model: str, optimizer: str, rule: str) -> None:
    sharded_fit.fit(tmp_path / "single", model, optimizer, rule, sharded=False, start_delta=ranks[0]["start_delta"])
    single = json.loads((tmp_path / "single" / "rank0.json").read_text())
    for step, values in ranks[0]["steps"].items():
        reference = single["steps"][step]
        keys = ["hessian/h0", "hessian/h1", "hessian/h2", "hessian/batch_sharpness", "lr", "lyapunov/lambda"]
        if optimizer == "adamw":
            keys += ["hessian/pre_h0", "hessian/pre_stability"]
        for key in keys:
            assert values[key] == pytest.approx(reference[key], rel=1e-6), (step, key)
        exact = _exact_top(ranks[0], step, model)
        assert [values["hessian/h0"], values["hessian/h1"], values["hessian/h2"]] == pytest.approx(
            exact.tolist(), rel=1e-6
        )


class _Module(pl.LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        return self.net(batch).sum()


def _sharded_module(mesh):
    from torch.distributed.fsdp import fully_shard

    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    fully_shard(net, mesh=mesh)
    return _Module(net)


def _trainer(strategy=None):
    return SimpleNamespace(strategy=strategy, optimizers=[], fast_dev_run=False)


def test_refusals_under_sharding_name_what_works(gloo_mesh):
    module = _sharded_module(gloo_mesh)
    trainer = _trainer()
    assert check_sharding(trainer, module, "M", hvp="finite_difference") is True
    assert check_sharding(trainer, _Module(nn.Linear(2, 1)), "M") is False
    with pytest.raises(ShardingError, match=r"method='power'.*Use method='lanczos'"):
        check_sharding(trainer, module, "M", hvp="finite_difference", method="power")
    with pytest.raises(ShardingError, match=r"dtype=torch.float64.*Use dtype=None"):
        check_sharding(trainer, module, "M", hvp="finite_difference", dtype=torch.float64)
    with pytest.raises(ShardingError, match=r"dtype=torch.float64"):
        LyapunovExponentMonitor(dtype="float64").on_fit_start(trainer, module)


def test_fsdp1_is_refused_pointing_to_model_parallel_strategy():
    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(ShardingError, match=r"ModelParallelStrategy.*fully_shard"):
        check_sharding(_trainer(FSDPStrategy()), _Module(nn.Linear(2, 1)), "HessianEigenvalueMonitor")


def test_the_default_hvp_switches_to_finite_differences_and_says_so_once(gloo_mesh, monkeypatch):
    from lyapunov_callbacks.callbacks import _setup

    monkeypatch.setattr(_setup, "_SHARDED_HVP_WARNED", set())
    module = _sharded_module(gloo_mesh)
    with pytest.warns(UserWarning, match=r"central finite differences of the strategy's own gradients"):
        check_sharding(_trainer(), module, "HessianEigenvalueMonitor")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_sharding(_trainer(), module, "HessianEigenvalueMonitor")  # said once
    assert dist.is_initialized()
    assert HessianEigenvalueMonitor().hvp == "autograd"  # the setting itself is unchanged

"""The byte-level GPT and the standard-library text data: shapes, causality, tied embeddings, the loss, the split,
training, and the curvature callbacks' h0 / pre_h0 on a tiny GPT against its dense Hessian."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lyapunov_callbacks import HessianEigenvalueMonitor
from lyapunov_callbacks.datamodules import STDLIB_FILES, TextDataModule
from lyapunov_callbacks.models import GPT
from lyapunov_callbacks.models.base import num_parameters
from lyapunov_callbacks.core.preconditioned import step_preconditioner
from recording_logger import RecordingLogger


@pytest.fixture(autouse=True)
def _one_thread():
    # Two OpenMP threads on a shared 2-core machine run a small model's step ten times slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length + 1), generator=torch.Generator().manual_seed(seed))


def test_default_size_and_parameter_count_formula():
    model = GPT()
    d, t, layers = 64, 64, 4
    # token + position embeddings, per block LN (2d) + qkv (3d²+3d) + proj (d²+d) + LN (2d) + MLP (8d²+5d), final LN
    expected = 256 * d + t * d + layers * (12 * d * d + 13 * d) + 2 * d
    assert num_parameters(model) == expected == 220_544


def test_logits_shape_and_causality():
    torch.manual_seed(0)
    model = GPT(block_size=16, embed_dim=32, num_layers=2, num_heads=4).double()
    x = _tokens(3, 16)[:, :-1]
    logits = model(x)
    assert logits.shape == (3, 16, 256)
    changed = x.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 256  # change the future of position 8
    later = model(changed)
    torch.testing.assert_close(later[:, :9], logits[:, :9], rtol=0, atol=1e-12)
    assert not torch.allclose(later[:, 9:], logits[:, 9:])
    with pytest.raises(ValueError, match="longer than block_size=16"):
        model(_tokens(1, 17)[:, :-1])


def test_read_out_is_the_token_embedding():
    model = GPT(block_size=8, embed_dim=16, num_layers=1, num_heads=2).double()
    x = _tokens(2, 8)[:, :-1]
    h = model.ln_f(model.blocks[0](model.token_embedding(x) + model.position_embedding(torch.arange(8))))
    torch.testing.assert_close(model(x), h @ model.token_embedding.weight.T, rtol=1e-12, atol=1e-12)
    assert not any("head" in n for n, _ in model.named_parameters())  # no second copy of the embedding


def test_training_loss_is_the_mean_next_byte_cross_entropy_near_log_256_at_init():
    torch.manual_seed(0)
    model = GPT(block_size=16, embed_dim=32, num_layers=2, num_heads=2)
    w = _tokens(4, 16)
    x, y = w[:, :-1], w[:, 1:]
    loss = model.training_loss((x, y))
    logp = torch.log_softmax(model(x), dim=-1)
    manual = -logp.gather(-1, y.unsqueeze(-1)).mean()
    torch.testing.assert_close(loss, manual)
    assert loss.item() == pytest.approx(math.log(256), abs=0.05)  # small init: near-uniform predictions


@pytest.mark.parametrize(
    "kwargs, match",
    [({"embed_dim": 30, "num_heads": 4}, "divisible"), ({"num_layers": 0}, "num_layers"), ({"dropout": 1.0}, "dropout"),
     ({"num_classes": 10}, "num_classes"), ({"block_size": 2.5}, "block_size")],
)
def test_bad_model_arguments_are_refused_naming_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPT(**kwargs)


def test_text_data_reads_the_stdlib_and_splits_deterministically():
    dm = TextDataModule(block_size=32, batch_size=16, val_fraction=0.1, test_fraction=0.05, seed=3)
    dm.setup("fit")
    root = Path(sysconfig.get_paths()["stdlib"])
    stream = b"".join((root / f).read_bytes() for f in STDLIB_FILES)
    n = len(stream) // 33
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == n
    assert len(dm.val_set) == round(0.1 * n) and len(dm.test_set) == round(0.05 * n)
    # The documented split: windows at multiples of 33 bytes, a permutation seeded by `seed` sends the first
    # n_val to validation, the next n_test to test, the rest to training, each kept in stream order.
    windows = torch.frombuffer(bytearray(stream[: n * 33]), dtype=torch.uint8).view(n, 33)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    n_val, n_test = len(dm.val_set), len(dm.test_set)
    for ds, idx in ((dm.val_set, perm[:n_val]), (dm.test_set, perm[n_val : n_val + n_test]),
                    (dm.train_set, perm[n_val + n_test :])):
        assert torch.equal(ds.windows, windows[idx.sort().values])
        x, y = ds[0]
        assert x.dtype == torch.int64 and x.shape == (32,) and torch.equal(x, ds.windows[0, :-1].long())
        assert torch.equal(y, ds.windows[0, 1:].long())
    again = TextDataModule(block_size=32, batch_size=16, val_fraction=0.1, test_fraction=0.05, seed=3)
    again.setup("fit")
    assert torch.equal(again.val_set.windows, dm.val_set.windows)
    other = TextDataModule(block_size=32, val_fraction=0.1, test_fraction=0.05, seed=4)
    other.setup("fit")
    assert not torch.equal(other.val_set.windows, dm.val_set.windows)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 32) and y.shape == (16, 32)
    assert len(dm.predict_dataloader().dataset) == len(dm.test_set)
    assert dm.num_classes == 256


@pytest.mark.parametrize(
    "kwargs, error, match",
    [({"block_size": 0}, ValueError, "block_size"), ({"val_fraction": 0.6, "test_fraction": 0.5}, ValueError, "sum"),
     ({"files": "argparse.py"}, TypeError, "files"), ({"files": []}, ValueError, "files"),
     ({"batch_size": 1.5}, TypeError, "batch_size")],
)
def test_bad_data_arguments_are_refused_naming_the_parameter(kwargs, error, match):
    with pytest.raises(error, match=match):
        TextDataModule(**kwargs)


def test_a_file_the_stdlib_lacks_is_named_at_setup():
    dm = TextDataModule(files=["argparse.py", "no_such_module.py"])
    with pytest.raises(FileNotFoundError, match="no_such_module.py"):
        dm.setup("fit")


def test_gpt_learns_on_the_stdlib_text():
    torch.manual_seed(0)
    dm = TextDataModule(block_size=32, batch_size=32, files=["textwrap.py", "heapq.py"])
    model = GPT(block_size=32, embed_dim=32, num_layers=2, num_heads=2)
    rec = RecordingLogger()
    trainer = L.Trainer(max_steps=60, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, limit_val_batches=0,
                        log_every_n_steps=1)
    trainer.loggers = [rec]
    trainer.fit(model, datamodule=dm)
    losses = rec.series("train/loss")
    first, last = losses[0], sum(losses[v] for v in range(50, 60)) / 10
    assert first == pytest.approx(math.log(256), abs=0.1)  # below: repeated bytes (spaces) meet the tied read-out
    assert last < first - 1.5  # 3.45 nats measured: bytes of Python source are far from uniform


class _Snapshot(L.Callback):
    """The batch, weights and Adam preconditioner at every ``on_before_optimizer_step`` (where the monitor measures)."""

    def __init__(self) -> None:
        self.batches, self.states, self.preconditioners = {}, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches[trainer.global_step] = [t.clone() for t in batch]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step
        self.states[step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        # P of the coming step: sqrt(v̂) + eps, and |g| + eps before Adam's first step
        self.preconditioners[step] = step_preconditioner(optimizer, list(pl_module.parameters()), dtype=torch.float64)


def _dense_hessian(model: GPT, batch) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta):
        pieces, offset = {}, 0
        for name, shape in zip(names, shapes):
            pieces[name] = theta[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return _training_loss_at(model, pieces, batch)

    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernel has no double backward
        return torch.autograd.functional.hessian(loss, flat, vectorize=True)


def _training_loss_at(model: GPT, pieces: dict, batch) -> torch.Tensor:
    logits = torch.func.functional_call(model, pieces, (batch[0],))
    return nn.functional.cross_entropy(logits.reshape(-1, 256), batch[1].reshape(-1))


def test_h0_and_pre_h0_of_a_tiny_gpt_equal_the_dense_hessian():
    torch.manual_seed(0)
    # Width 2, two heads of one channel, one block, context 4: 598 parameters (512 of them the byte embedding).
    model = GPT(block_size=4, embed_dim=2, num_layers=1, num_heads=2).double()
    assert num_parameters(model) == 598
    w = _tokens(24, 4, seed=5)
    data = torch.utils.data.TensorDataset(w[:, :-1], w[:, 1:])
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)
    snap = _Snapshot()
    monitor = HessianEigenvalueMonitor(every_n_steps=1, tol=1e-10, max_iter=300, pre_h0=True)
    rec = RecordingLogger()
    trainer = L.Trainer(max_steps=3, callbacks=[snap, monitor], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.loggers = [rec]
    trainer.fit(model, loader)
    h0, pre_h0 = rec.series("hessian/h0"), rec.series("hessian/pre_h0")
    assert sorted(h0) == [0, 1, 2] and sorted(pre_h0) == [0, 1, 2]  # step 0: P = |g| + eps
    reference = GPT(block_size=4, embed_dim=2, num_layers=1, num_heads=2).double()
    for step in (0, 1, 2):
        reference.load_state_dict(snap.states[step])
        hessian = _dense_hessian(reference, snap.batches[step])
        assert h0[step] == pytest.approx(float(torch.linalg.eigvalsh(hessian)[-1]), rel=1e-6), step
        if step in pre_h0:
            scale = snap.preconditioners[step].rsqrt()
            pre = scale[:, None] * hessian * scale[None, :]
            assert pre_h0[step] == pytest.approx(float(torch.linalg.eigvalsh(pre)[-1]), rel=1e-6), step

"""A small GPT-style byte-level language model: causal self-attention, GELU, pre-LayerNorm, tied embeddings."""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Byte-level vocabulary: every byte value is a token, so any text (any file) is a valid input with no tokenizer.
BYTE_VOCAB = 256
#: Standard deviation of the weights at initialisation (GPT-2's); the residual projections are further divided
#: by sqrt(2 * num_layers) so the residual stream's variance does not grow with depth.
INIT_STD = 0.02


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return value


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through :func:`torch.nn.functional.scaled_dot_product_attention`.

    One ``Linear(d, 3d)`` gives queries, keys and values; ``is_causal=True`` masks the future; a
    ``Linear(d, d)`` projects the concatenated heads back into the residual stream.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).split(dim, dim=2)
        # [B, T, d] -> [B, heads, T, d / heads]
        q, k, v = (t.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(batch, length, dim)
        return self.resid_dropout(self.proj(y))


class Block(nn.Module):
    """A pre-LayerNorm Transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` with a GELU MLP of width 4d."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(embed_dim)
        self.attn = CausalSelfAttention(embed_dim, num_heads, dropout)
        self.ln2 = nn.LayerNorm(embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, 4 * embed_dim), nn.GELU(), nn.Linear(4 * embed_dim, embed_dim), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(L.LightningModule):
    r"""A GPT-style decoder-only language model over bytes, sized for a CPU (≈ 0.2 M parameters by default).

    Tokens are bytes (vocabulary 256). A token embedding plus a learned position embedding feed ``num_layers``
    pre-LayerNorm blocks (causal multi-head self-attention through ``scaled_dot_product_attention``, then a
    GELU MLP of width ``4·embed_dim``), a final LayerNorm, and a linear read-out whose weight *is* the token
    embedding (tied input/output embeddings: ``logits = h · Eᵀ``). Every activation is smooth (GELU, softmax,
    LayerNorm), so the loss is twice differentiable everywhere.

    The loss is the next-byte cross-entropy averaged over all ``B·T`` positions of a batch
    ``(x, y) = (bytes[i : i+T], bytes[i+1 : i+T+1])``:
    :math:`L = \frac{1}{BT}\sum_{b,t} -\log \mathrm{softmax}(f(x_b)_t)_{y_{b,t}}`.
    :meth:`training_loss` is that loss with no logging (the hook the curvature callbacks measure).

    Logged tags: ``train/loss`` (every step, progress bar), ``val/loss`` and ``val/bpb`` (bits per byte,
    ``loss / ln 2``; epoch level), and ``test/loss``, ``test/bpb`` under ``trainer.test``.
    :meth:`predict_step` returns the logits ``[B, T, 256]`` of the inputs.

    The default :meth:`configure_optimizers` is AdamW (``lr=1e-3``, betas 0.9/0.999, ``weight_decay=0.01`` on
    every parameter, one parameter group); a LightningCLI ``optimizer:`` section replaces it.

    Args:
        block_size: longest input (the number of position embeddings), default 64.
        embed_dim: width ``d`` of the residual stream, default 64; divisible by ``num_heads``.
        num_layers: number of Transformer blocks, default 4.
        num_heads: attention heads per block, default 4.
        dropout: dropout rate on attention weights, after each residual branch and after the embeddings,
            in [0, 1), default 0 (dropout draws are replayed by the curvature callbacks, but measurements are
            clearest without them).
        num_classes: the vocabulary, 256 (bytes); accepted because the CLI links ``data.num_classes`` here, and
            any other value is refused.

    Raises:
        ValueError: a size that is not a positive integer, ``embed_dim`` not divisible by ``num_heads``,
            ``dropout`` outside [0, 1), or ``num_classes != 256``; from :meth:`forward`, an input longer than
            ``block_size``.

    Example::

        from lyapunov_callbacks.models import GPT
        model = GPT(block_size=64, embed_dim=64, num_layers=4, num_heads=4)
        x = torch.randint(0, 256, (8, 65))
        loss = model.training_loss((x[:, :-1], x[:, 1:]))  # scalar, no logging
    """

    def __init__(
        self,
        block_size: int = 64,
        embed_dim: int = 64,
        num_layers: int = 4,
        num_heads: int = 4,
        dropout: float = 0.0,
        num_classes: int = BYTE_VOCAB,
    ) -> None:
        super().__init__()
        for name, value in (("block_size", block_size), ("embed_dim", embed_dim), ("num_layers", num_layers),
                            ("num_heads", num_heads)):
            _check_positive_int(name, value)
        if embed_dim % num_heads:
            raise ValueError(
                f"`embed_dim`={embed_dim} must be divisible by `num_heads`={num_heads} (each head gets "
                "embed_dim / num_heads channels)."
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be a float in [0, 1), got {dropout!r}.")
        if num_classes != BYTE_VOCAB:
            raise ValueError(
                f"`num_classes` is the byte vocabulary, {BYTE_VOCAB}; got {num_classes!r}. Train on a byte-level "
                "data module (lyapunov_callbacks.datamodules.TextDataModule)."
            )
        self.save_hyperparameters()
        self.block_size = block_size
        self.token_embedding = nn.Embedding(BYTE_VOCAB, embed_dim)
        self.position_embedding = nn.Embedding(block_size, embed_dim)
        self.embed_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, dropout) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(embed_dim)
        self._init_weights(num_layers)

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy`` (FSDP2): shard every block, then the whole model (embeddings,
        final LayerNorm), over the data-parallel mesh with ``fully_shard``. Without a device mesh, or when already
        sharded (a second ``fit``/``test`` on the same module), nothing changes."""
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.blocks[0], FSDPModule):
            return
        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                "GPT shards with FSDP2 only (no tensor-parallel plan): use ModelParallelStrategy(data_parallel_size=N, "
                "tensor_parallel_size=1)."
            )
        dp = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        for block in self.blocks:
            fully_shard(block, mesh=dp)
        fully_shard(self, mesh=dp)

    def _init_weights(self, num_layers: int) -> None:
        for name, p in self.named_parameters():
            if p.dim() < 2:  # biases 0; LayerNorm weights 1, biases 0
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            else:
                residual = name.endswith("proj.weight") or name.endswith("mlp.2.weight")
                nn.init.normal_(p, std=INIT_STD / math.sqrt(2 * num_layers) if residual else INIT_STD)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, T, 256]`` of the next byte at every position of the int64 byte tensor ``x [B, T]``."""
        length = x.shape[1]
        if length > self.block_size:
            raise ValueError(f"input of length {length} is longer than block_size={self.block_size}.")
        positions = torch.arange(length, device=x.device)
        h = self.embed_dropout(self.token_embedding(x) + self.position_embedding(positions))
        for block in self.blocks:
            h = block(h)
        return F.linear(self.ln_f(h), self.token_embedding.weight)  # tied read-out

    def training_loss(self, batch) -> Tensor:
        """The mean next-byte cross-entropy of ``batch = (x [B, T], y [B, T])`` (no logging, no state change).

        THE hook the curvature callbacks measure (``loss_fn(model, batch) = model.training_loss(batch)``), and
        the very computation :meth:`training_step` differentiates.
        """
        x, y = batch[0], batch[1]
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss = self.training_loss(batch)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=batch[0].shape[0])
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val", prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test", prog_bar=False)

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        return self(batch[0] if isinstance(batch, (tuple, list)) else batch)

    def _evaluate(self, batch, stage: str, prog_bar: bool) -> None:
        """``{stage}/loss`` and ``{stage}/bpb`` (bits per byte), batch-size weighted over the epoch, DDP-averaged."""
        loss = self.training_loss(batch)
        size = batch[0].shape[0]
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=prog_bar, batch_size=size, sync_dist=True)
        self.log(f"{stage}/bpb", loss / math.log(2.0), on_step=False, on_epoch=True, batch_size=size, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW, ``lr=1e-3``, betas (0.9, 0.999), ``weight_decay=0.01`` (overridden by a CLI ``optimizer:``)."""
        return torch.optim.AdamW(self.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)

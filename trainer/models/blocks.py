"""Transformer pieces shared by the TiTok encoder/decoder and the generators.

Attention always goes through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels
on GPU, a fused kernel on CPU) on batch-first tensors; the parameter layout follows the modules the
published checkpoints were saved from, so their state dicts load unchanged.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, H*D) -> (B, H, L, D)."""
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> (B, L, H*D)."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)


class PackedSelfAttention(nn.Module):
    """Multi-head self-attention with one packed q/k/v projection (``nn.MultiheadAttention``'s keys).

    Rows ``[0, W)`` of ``in_proj_weight`` project queries, ``[W, 2W)`` keys, ``[2W, 3W)`` values;
    scores are scaled by ``1/sqrt(W / heads)``; no mask, no dropout.
    """

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(batch, length, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.out_proj(merge_heads(out))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm ViT block (open_clip layout): x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    LayerNorm eps 1e-5, exact (erf) GELU, MLP ratio 4.
    """

    def __init__(self, width: int, num_heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = PackedSelfAttention(width, num_heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * mlp_ratio)),
            ("gelu", nn.GELU()),
            ("c_proj", nn.Linear(width * mlp_ratio, width)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GradCheckpointing:
    """Mixin: ``set_grad_checkpointing(True)`` recomputes each transformer block in the backward pass."""

    grad_checkpointing: bool = False

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Checkpoint activations per block (trades one extra forward for activation memory)."""
        for module in self.modules():  # type: ignore[attr-defined]
            if isinstance(module, GradCheckpointing):
                module.grad_checkpointing = enabled

    def run_block(self, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and self.training:  # type: ignore[attr-defined]
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


class SavePretrained:
    """Mixin: ``model.save_pretrained(directory)`` writes the hub format (see trainer.models.hub)."""

    def save_pretrained(self, directory: str, safe_serialization: bool = True) -> None:
        from trainer.models.hub import save_pretrained

        save_pretrained(self, directory, safe_serialization=safe_serialization)  # type: ignore[arg-type]


def autocast_disabled(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context that turns autocast off on ``tensor``'s device (fp32 islands, e.g. quantizers)."""
    if tensor.is_meta:  # shape inference only; autocast has no meta backend
        return contextlib.nullcontext()
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def init_vit_weights(modules: Iterable[nn.Module], std: float = 0.02) -> None:
    """Truncated-normal linears/convs with zero bias, unit LayerNorms (the authors' TiTok init).

    Modules with ``keeps_own_init = True`` keep what their ``reset_parameters`` set."""
    for module in modules:
        if getattr(module, "keeps_own_init", False):
            continue
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.trunc_normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def maybe_compile(model: nn.Module, enabled: bool, **compile_kwargs) -> nn.Module:
    """Compile ``model`` in place with ``torch.compile`` when ``enabled``; returns it.

    In place (``nn.Module.compile``) rather than wrapping, so state dict keys keep no ``_orig_mod.``
    prefix and checkpoints stay in the published layout.
    """
    if enabled:
        model.compile(**compile_kwargs)
    return model

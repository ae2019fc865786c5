"""Class-conditional masked-token generators over TiTok tokens (bidirectional transformers).

Two families, as published by the authors:

* ``ViT`` (TiTok-L-32, B-64): a BERT encoder (post-norm, LayerNorm eps 1e-12, learned absolute
  positions plus the token-type-0 embedding) under ``model.*`` with ``model.lm_head``; the same
  key names as HuggingFace's ``BertModel``, without depending on it.
* ``UViT`` (TiTok-S-128): pre-norm blocks with long skip connections (U-ViT): in-blocks push their
  outputs on a stack, out-blocks pop them (last in, first out) and fuse ``[x, skip]`` linearly.

Token space (both): ids ``0..codebook_size-1`` are image tokens, ``codebook_size`` is the mask token,
``codebook_size + 1 + label`` the class tokens and ``codebook_size + num_classes + 1`` the null
class used for classifier-free guidance. The sequence is ``[class token, K image tokens]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.blocks import GradCheckpointing, SavePretrained, merge_heads, split_heads
from trainer.models.config import GeneratorConfig


class MaskedTokenGenerator(SavePretrained, GradCheckpointing, nn.Module):
    """Shared interface: ids helpers and :meth:`logits` (``forward`` is the same call)."""

    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        self.config = cfg

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    @property
    def null_class_id(self) -> int:
        return self.config.null_class_id

    def class_token_ids(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Class tokens of ``labels`` (B,), the null token where ``drop`` (B,) is True."""
        ids = labels + self.config.codebook_size + 1
        if drop is not None:
            ids = torch.where(drop.to(device=ids.device, dtype=torch.bool), torch.full_like(ids, self.null_class_id), ids)
        return ids

    def _input_ids(self, tokens: torch.Tensor, labels: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        cfg = self.config
        if tokens.dim() != 2 or not 1 <= tokens.shape[1] <= cfg.image_seq_len:
            raise ValueError(f"tokens must be (B, K) with K <= {cfg.image_seq_len}, got {tuple(tokens.shape)}")
        if labels.shape != (tokens.shape[0],):
            raise ValueError(f"labels must be ({tokens.shape[0]},) class indices, got {tuple(labels.shape)}")
        if drop is not None and drop.shape != labels.shape:
            raise ValueError(f"drop must be a ({tokens.shape[0]},) bool tensor, got {tuple(drop.shape)}")
        if tokens.is_floating_point() or labels.is_floating_point():
            raise TypeError("tokens and labels must be integer tensors")
        if not (torch.compiler.is_compiling() or tokens.is_meta):
            bad = ((tokens < 0) | (tokens > cfg.mask_token_id)).any() | \
                ((labels < 0) | (labels >= cfg.condition_num_classes)).any()
            if bad:
                raise ValueError(f"token ids must be in [0, {cfg.mask_token_id}] (mask id {cfg.mask_token_id}) and "
                                 f"labels in [0, {cfg.condition_num_classes})")
        return torch.cat([self.class_token_ids(labels.long(), drop)[:, None], tokens.long()], dim=1)

    def logits(self, tokens: torch.Tensor, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, K, codebook_size) over image tokens at every position.

        ``tokens`` (B, K) hold image ids with masked positions set to :attr:`mask_token_id`;
        ``labels`` (B,) are class indices; rows where ``drop`` (B,) is True get the null class.
        Deterministic in eval mode (label dropout is the caller's, through ``drop``).
        """
        return self.forward(tokens, labels, drop)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.hidden_states(self._input_ids(tokens, labels, drop))
        return self.lm_head(hidden[:, 1:])

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# BERT-style ("ViT")


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.image_seq_len + 1, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(2, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        # Every token has type 0 and position = index (BERT's defaults).
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        x = x + self.position_embeddings.weight[:length]
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        self.num_heads, self.attn_drop = cfg.num_attention_heads, cfg.attn_drop
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(proj(x), self.num_heads) for proj in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return merge_heads(out)


class DenseNorm(nn.Module):
    """Post-norm residual output: LayerNorm(residual + dropout(dense(x)))."""

    def __init__(self, in_features: int, hidden_size: int, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = DenseNorm(cfg.hidden_size, cfg.hidden_size, cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = DenseNorm(cfg.intermediate_size, cfg.hidden_size, cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(x)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


class BertBackbone(nn.Module):
    """Holds ``embeddings``, ``encoder`` and ``lm_head`` under the ``model.`` prefix."""

    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.codebook_size, bias=True)


class BertGenerator(MaskedTokenGenerator):
    """The authors' ImageBert (``model_type="ViT"``)."""

    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__(cfg)
        self.model = BertBackbone(cfg)
        for module in self.modules():  # BERT's init: N(0, 0.02), zero bias, unit LayerNorm
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embeddings(input_ids)
        for layer in self.model.encoder.layer:
            x = self.run_block(layer, x)
        return x


# ---------------------------------------------------------------------------------------------
# U-ViT ("UViT")


class UViTAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(merge_heads(F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])))


class UViTMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class UViTBlock(nn.Module):
    """Pre-norm block (LayerNorm eps 1e-5); with ``skip``, first fuses ``[x, skip]`` -> x."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, skip: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = UViTAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = UViTMlp(dim, mlp_hidden)
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViTGenerator(MaskedTokenGenerator):
    """The authors' UViTBert (``model_type="UViT"``): num_hidden_layers // 2 blocks each side + 1 mid."""

    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__(cfg)
        dim, heads, hidden, half = cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.num_hidden_layers // 2
        self.embeddings = nn.Embedding(cfg.vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.image_seq_len + 1, dim))
        self.in_blocks = nn.ModuleList(UViTBlock(dim, heads, hidden) for _ in range(half))
        self.mid_block = UViTBlock(dim, heads, hidden)
        self.out_blocks = nn.ModuleList(UViTBlock(dim, heads, hidden, skip=True) for _ in range(half))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, cfg.codebook_size, bias=True)
        nn.init.trunc_normal_(self.pos_embed, mean=0.0, std=0.02)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, mean=0.0, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids) + self.pos_embed[:, :input_ids.shape[1]]
        skips = []
        for block in self.in_blocks:
            x = self.run_block(block, x)
            skips.append(x)
        x = self.run_block(self.mid_block, x)
        for block in self.out_blocks:
            x = self.run_block(block, x, skips.pop())
        return self.norm(x)


def build_generator(cfg: GeneratorConfig) -> MaskedTokenGenerator:
    """A randomly initialised generator of ``cfg.model_type`` ("ViT": BERT-style, "UViT": U-ViT)."""
    return BertGenerator(cfg) if cfg.model_type == "ViT" else UViTGenerator(cfg)

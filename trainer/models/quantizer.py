"""TiTok's token bottlenecks: the factorized vector quantizer and the diagonal-Gaussian (VAE) variant.

Latents travel in the authors' layout ``(B, D, 1, K)`` (D = token size, K = number of tokens).
Both run in fp32 with autocast disabled, as the published models were trained.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.blocks import autocast_disabled


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantizer with straight-through gradients.

    With ``use_l2_norm`` latents and codebook rows are both l2-normalised before the lookup, so the
    nearest entry is the one of highest cosine similarity, and the returned vectors are unit length.

    Losses (mean over all elements): ``commitment_loss = commitment_cost * ||sg(q) - z||^2`` pulls
    the encoder towards its codes, ``codebook_loss = ||q - sg(z)||^2`` pulls codes towards the
    encoder; ``quantizer_loss`` is their sum.
    """

    def __init__(self, codebook_size: int, token_size: int, commitment_cost: float = 0.25,
                 use_l2_norm: bool = True) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.commitment_cost = commitment_cost
        self.use_l2_norm = use_l2_norm
        self.embedding = nn.Embedding(codebook_size, token_size)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def codebook(self) -> torch.Tensor:
        weight = self.embedding.weight.float()
        return F.normalize(weight, dim=-1) if self.use_l2_norm else weight

    def nearest(self, vectors: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook row for each row of ``vectors`` (N, D) (already normalised)."""
        codebook = self.codebook()
        # Same expansion and order as the authors' code so argmin ties resolve identically.
        distances = (vectors.pow(2).sum(dim=1, keepdim=True) + codebook.pow(2).sum(dim=1)) - 2 * (vectors @ codebook.T)
        return distances.argmin(dim=1)

    def lookup(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Codebook vectors (normalised when ``use_l2_norm``) of ``token_ids`` (B, K) as (B, D, 1, K)."""
        if token_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token ids must be an integer tensor, got {token_ids.dtype}")
        if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= self.codebook_size):
            raise ValueError(f"token ids must be in [0, {self.codebook_size}), got range "
                             f"[{int(token_ids.min())}, {int(token_ids.max())}]")
        vectors = F.embedding(token_ids, self.embedding.weight).float()
        if self.use_l2_norm:
            vectors = F.normalize(vectors, dim=-1)
        return vectors.permute(0, 2, 1).unsqueeze(2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with autocast_disabled(z):
            batch, dim, height, width = z.shape
            z = z.float().permute(0, 2, 3, 1).reshape(-1, dim)
            if self.use_l2_norm:
                z = F.normalize(z, dim=-1)
            token_ids = self.nearest(z)
            quantized = F.embedding(token_ids, self.embedding.weight).float()
            if self.use_l2_norm:
                quantized = F.normalize(quantized, dim=-1)
            commitment_loss = self.commitment_cost * (quantized.detach() - z).pow(2).mean()
            codebook_loss = (quantized - z.detach()).pow(2).mean()
            quantized = z + (quantized - z).detach()  # straight-through estimator
            quantized = quantized.view(batch, height, width, dim).permute(0, 3, 1, 2).contiguous()
        aux = {
            "quantizer_loss": commitment_loss + codebook_loss,
            "commitment_loss": commitment_loss,
            "codebook_loss": codebook_loss,
            "token_ids": token_ids.view(batch, height * width),
        }
        return quantized, aux


class DiagonalGaussianLatent(nn.Module):
    """Continuous tokens: the encoder emits mean and log-variance, ``(B, 2D, 1, K)``.

    ``forward`` samples ``mean + std * noise`` when ``sample`` (training) and returns the mean
    otherwise. ``kl_loss`` is the KL divergence to N(0, I) summed over tokens and dimensions and
    averaged over the batch; ``quantizer_loss = kl_weight * kl_loss``. No parameters.
    """

    def __init__(self, kl_weight: float = 1e-6) -> None:
        super().__init__()
        self.kl_weight = kl_weight

    def forward(self, moments: torch.Tensor, sample: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with autocast_disabled(moments):
            mean, logvar = moments.float().chunk(2, dim=1)
            logvar = logvar.clamp(-30.0, 20.0)
            latent = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample else mean
            kl_loss = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum() / moments.shape[0]
        return latent, {"quantizer_loss": self.kl_weight * kl_loss, "kl_loss": kl_loss}


def codebook_usage_from_counts(counts: torch.Tensor) -> dict[str, float]:
    """Usage statistics of a histogram of code counts (one entry per codebook row).

    ``codebook_used_fraction``: share of rows used at least once; ``codebook_entropy``: entropy
    (nats) of the empirical code distribution; ``codebook_perplexity``: ``exp(entropy)``, the
    effective number of codes (equal to the codebook size under perfectly uniform use).
    """
    counts = counts.detach().double().flatten()
    total = counts.sum()
    if total <= 0:
        return {"codebook_used_fraction": 0.0, "codebook_entropy": 0.0, "codebook_perplexity": 0.0}
    probs = counts[counts > 0] / total
    entropy = float(-(probs * probs.log()).sum())
    return {
        "codebook_used_fraction": float((counts > 0).sum()) / counts.numel(),
        "codebook_entropy": entropy,
        "codebook_perplexity": math.exp(entropy),
    }


def codebook_usage(token_ids: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Usage statistics (:func:`codebook_usage_from_counts`) of a tensor of token ids."""
    counts = torch.bincount(token_ids.detach().reshape(-1).long().cpu(), minlength=codebook_size)
    if counts.numel() > codebook_size:
        raise ValueError(f"token id {counts.numel() - 1} >= codebook_size {codebook_size}")
    return codebook_usage_from_counts(counts)

"""Quantizers against direct computations: nearest neighbour, losses, straight-through gradients,
the Gaussian KL, codebook usage statistics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.models import codebook_usage, codebook_usage_from_counts
from trainer.models.maskgit_vqgan import ProxyCodebook
from trainer.models.quantizer import DiagonalGaussianLatent, VectorQuantizer


def _quantizer(use_l2_norm: bool, codebook_size: int = 50, dim: int = 6) -> VectorQuantizer:
    quantizer = VectorQuantizer(codebook_size, dim, commitment_cost=0.25, use_l2_norm=use_l2_norm)
    with torch.no_grad():
        quantizer.embedding.weight.normal_()
    return quantizer


def _latents(batch: int = 3, dim: int = 6, tokens: int = 7) -> torch.Tensor:
    return torch.randn(batch, dim, 1, tokens)


def _rows(z: torch.Tensor) -> torch.Tensor:
    """(B, D, 1, K) -> (B*K, D), token-major as the quantizer sees them."""
    return z.squeeze(2).transpose(1, 2).reshape(-1, z.shape[1])


@pytest.mark.parametrize("use_l2_norm", [True, False])
def test_lookup_is_brute_force_nearest_neighbour(use_l2_norm: bool) -> None:
    quantizer = _quantizer(use_l2_norm)
    z = _latents(4, tokens=9)
    _, aux = quantizer(z)
    rows, codebook = _rows(z), quantizer.embedding.weight.detach()
    if use_l2_norm:  # nearest after normalising = highest cosine similarity
        similarity = torch.stack([torch.stack([F.cosine_similarity(r, e, dim=0) for e in codebook]) for r in rows])
        expected = similarity.argmax(dim=1)
    else:
        expected = torch.stack([torch.stack([(r - e).pow(2).sum() for e in codebook]) for r in rows]).argmin(dim=1)
    assert aux["token_ids"].shape == (4, 9)
    assert torch.equal(aux["token_ids"].reshape(-1), expected)


@pytest.mark.parametrize("use_l2_norm", [True, False])
def test_quantized_values_and_losses_match_the_formula(use_l2_norm: bool) -> None:
    quantizer = _quantizer(use_l2_norm)
    z = _latents()
    quantized, aux = quantizer(z)
    rows = _rows(z)
    codebook = quantizer.embedding.weight.detach()
    if use_l2_norm:
        rows, codebook = F.normalize(rows, dim=1), F.normalize(codebook, dim=1)
    chosen = codebook[aux["token_ids"].reshape(-1)]
    mse = ((chosen - rows) ** 2).mean()
    torch.testing.assert_close(aux["commitment_loss"], 0.25 * mse)
    torch.testing.assert_close(aux["codebook_loss"], mse)
    torch.testing.assert_close(aux["quantizer_loss"], 1.25 * mse)
    # Forward value is the (normalised) codebook row, laid out back as (B, D, 1, K).
    torch.testing.assert_close(_rows(quantized), chosen)
    if use_l2_norm:
        torch.testing.assert_close(quantized.norm(dim=1), torch.ones(3, 1, 7))


@pytest.mark.parametrize("use_l2_norm", [True, False])
def test_straight_through_gradient(use_l2_norm: bool) -> None:
    quantizer = _quantizer(use_l2_norm)
    z = _latents().requires_grad_(True)
    weights = torch.randn(3, 6, 1, 7)
    quantized, _ = quantizer(z)
    (quantized * weights).sum().backward()
    # The lookup is skipped in the backward pass: the gradient is that of the identity (or of the
    # l2 normalisation applied before the lookup).
    z2 = z.detach().clone().requires_grad_(True)
    reference = F.normalize(z2, dim=1) if use_l2_norm else z2
    (reference * weights).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad)
    assert quantizer.embedding.weight.grad is None or not quantizer.embedding.weight.grad.any()


def test_loss_gradients_go_where_the_stop_gradients_say() -> None:
    quantizer = _quantizer(True)
    z = _latents().requires_grad_(True)
    _, aux = quantizer(z)
    aux["commitment_loss"].backward(retain_graph=True)
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert quantizer.embedding.weight.grad is None or not quantizer.embedding.weight.grad.any()
    z.grad = None
    aux["codebook_loss"].backward()
    assert z.grad is None or not z.grad.any()
    assert quantizer.embedding.weight.grad.abs().sum() > 0


def test_quantizer_runs_in_fp32_under_autocast() -> None:
    quantizer = _quantizer(True)
    z = _latents()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        quantized, aux = quantizer(z.bfloat16())
    assert quantized.dtype == torch.float32 and aux["quantizer_loss"].dtype == torch.float32
    assert torch.equal(aux["token_ids"], quantizer(z.bfloat16().float())[1]["token_ids"])


def test_lookup_of_ids_equals_the_forward_codes_and_rejects_bad_ids() -> None:
    quantizer = _quantizer(True)
    z = _latents()
    quantized, aux = quantizer(z)
    torch.testing.assert_close(quantizer.lookup(aux["token_ids"]), quantized)
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        quantizer.lookup(torch.tensor([[0, 50]]))
    with pytest.raises(TypeError):
        quantizer.lookup(torch.zeros(1, 2))


def test_proxy_codebook_nearest_is_euclidean_argmin() -> None:
    codebook = ProxyCodebook(40, 8)
    z = torch.randn(2, 8, 3, 3)
    codes = codebook.nearest(z)
    rows = z.permute(0, 2, 3, 1).reshape(-1, 8)
    expected = torch.cdist(rows.double(), codebook.embedding.weight.detach().double()).argmin(dim=1)
    assert torch.equal(codes.reshape(-1), expected)
    torch.testing.assert_close(codebook.lookup(codes), codebook.embedding.weight[codes].permute(0, 3, 1, 2))


def test_gaussian_latent_kl_against_torch_distributions() -> None:
    latent = DiagonalGaussianLatent(kl_weight=1e-3)
    moments = torch.randn(3, 8, 1, 5)
    mean, logvar = moments.chunk(2, dim=1)
    posterior = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    kl = torch.distributions.kl_divergence(posterior, torch.distributions.Normal(0.0, 1.0)).sum() / 3
    value, aux = latent(moments, sample=False)
    torch.testing.assert_close(aux["kl_loss"], kl)
    torch.testing.assert_close(aux["quantizer_loss"], 1e-3 * kl)
    assert torch.equal(value, mean)
    torch.manual_seed(1)
    sampled, _ = latent(moments, sample=True)
    torch.manual_seed(1)
    torch.testing.assert_close(sampled, mean + torch.exp(0.5 * logvar) * torch.randn_like(mean))


def test_codebook_usage_statistics() -> None:
    ids = torch.tensor([[0, 0, 1, 3], [3, 3, 3, 0]])  # counts 3, 1, 0, 4 of 8 entries
    stats = codebook_usage(ids, codebook_size=8)
    probs = [3 / 8, 1 / 8, 4 / 8]
    entropy = -sum(p * math.log(p) for p in probs)
    assert stats["codebook_used_fraction"] == pytest.approx(3 / 8)
    assert stats["codebook_entropy"] == pytest.approx(entropy)
    assert stats["codebook_perplexity"] == pytest.approx(math.exp(entropy))
    uniform = codebook_usage_from_counts(torch.full((16,), 5))
    assert uniform["codebook_used_fraction"] == 1.0 and uniform["codebook_perplexity"] == pytest.approx(16.0)
    assert codebook_usage_from_counts(torch.zeros(4))["codebook_used_fraction"] == 0.0
    with pytest.raises(ValueError, match="codebook_size"):
        codebook_usage(torch.tensor([9]), codebook_size=8)

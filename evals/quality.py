"""Per-image reconstruction quality: PSNR and SSIM of float images in [0, 1] (NCHW).

SSIM is Wang et al. (2004) with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, data
range 1, computed per channel over the positions where the window fits and averaged over channels:
the same numbers as ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=...)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_WINDOW, _SIGMA, _K1, _K2 = 11, 1.5, 0.01, 0.03


def psnr(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """[B] PSNR in dB for data range 1 (identical images give +inf)."""
    mse = (images.double() - references.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse)


def _gaussian_window(device: torch.device) -> torch.Tensor:
    coords = torch.arange(_WINDOW, dtype=torch.float64, device=device) - (_WINDOW - 1) / 2
    g = torch.exp(-(coords**2) / (2 * _SIGMA**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """[B] mean SSIM over channels and valid window positions (images of at least 11x11)."""
    if images.shape != references.shape or images.dim() != 4:
        raise ValueError(f"expected two NCHW batches of the same shape, got {tuple(images.shape)} and {tuple(references.shape)}")
    x, y = images.double(), references.double()
    channels = x.shape[1]
    window = _gaussian_window(x.device).expand(channels, 1, _WINDOW, _WINDOW).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = _K1**2, _K2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)

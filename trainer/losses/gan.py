"""Adversarial loss terms of the tokenizer: hinge discriminator loss, generator loss, LeCam regulariser.

LeCam (Tseng et al. 2021, as the TiTok authors use it): with ``r``, ``f`` the batch means of the
discriminator's logits on real and reconstructed images and ``R``, ``F`` their exponential moving
averages, ``lecam = relu(r - F)**2 + relu(R - f)**2``. The averages are updated after each
discriminator loss, starting from 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``0.5 * (mean relu(1 - real) + mean relu(1 + fake))``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """``-mean(fake logits)``: the generator raises the discriminator's score of its reconstructions."""
    return -logits_fake.mean()


def lecam_regularization(real_mean: torch.Tensor, fake_mean: torch.Tensor, ema_real: torch.Tensor,
                         ema_fake: torch.Tensor) -> torch.Tensor:
    """``relu(real_mean - ema_fake)**2 + relu(ema_real - fake_mean)**2``."""
    return F.relu(real_mean - ema_fake).pow(2) + F.relu(ema_real - fake_mean).pow(2)


class LeCamEMA(nn.Module):
    """Moving averages of the discriminator's mean logits on real and fake images.

    They are buffers, so a checkpoint of the owning module round-trips them exactly. With
    torch.distributed initialised, the batch means are averaged over ranks before the update, so
    every rank holds the same averages (those of the global batch).
    """

    def __init__(self, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_logits_real", torch.zeros((), dtype=torch.float32))
        self.register_buffer("ema_logits_fake", torch.zeros((), dtype=torch.float32))

    @torch.no_grad()
    def update(self, real_mean: torch.Tensor, fake_mean: torch.Tensor) -> None:
        means = torch.stack([real_mean.detach(), fake_mean.detach()]).float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(means)
            means /= dist.get_world_size()
        means = means.to(self.ema_logits_real.device)
        self.ema_logits_real.mul_(self.decay).add_(means[0], alpha=1.0 - self.decay)
        self.ema_logits_fake.mul_(self.decay).add_(means[1], alpha=1.0 - self.decay)

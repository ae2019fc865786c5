"""The tokenizer's pixel-space objective: reconstruction + perceptual + quantizer + adversarial.

Generator side (the tokenizer's engine), with ``g = 1`` from ``discriminator_start`` on, else 0::

    loss = w_rec * L2(x, x') + w_perc * P(x', x) + w_q * quantizer_loss
           + w_disc * factor * g * (-mean D(x'))

Discriminator side (its own engine; call only from ``discriminator_start`` on)::

    loss = factor * hinge(D(x), D(x')) + w_lecam * lecam(D(x), D(x'), EMAs)

Both follow the TiTok authors' ``ReconstructionLoss_Stage2``: everything in float32 with autocast
off, on the reconstructions as the model returns them (not clamped), no adaptive GAN weight.
The only state is the LeCam EMA pair; the perceptual networks stay out of ``state_dict``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from trainer.losses.config import PixelLossConfig, ReconstructionLoss
from trainer.losses.gan import (
    LeCamEMA,
    generator_adversarial_loss,
    hinge_discriminator_loss,
    lecam_regularization,
)
from trainer.losses.perceptual import PerceptualLoss, build_perceptual_loss

Terms = dict[str, torch.Tensor]


class TokenizerPixelLoss(nn.Module):
    """Composed pixel losses of the decoder fine-tune (paper stage 2) and single-stage recipes.

    Term names (detached tensors, for logging): generator side ``loss_l2`` (or ``loss_l1``),
    ``loss_perceptual``, ``loss_quantizer``, ``loss_gan`` (each already weighted; they sum to the loss),
    plus the unweighted ``perceptual_lpips`` / ``perceptual_convnext`` of the networks in use;
    discriminator side ``loss_hinge``, ``loss_lecam`` (weighted), ``d_logits_real``, ``d_logits_fake``,
    ``lecam_ema_real``, ``lecam_ema_fake``.
    """

    def __init__(self, cfg: PixelLossConfig, perceptual: Optional[PerceptualLoss]) -> None:
        super().__init__()
        if (perceptual is None) != (cfg.perceptual_weight == 0):
            raise ValueError("a PerceptualLoss is needed exactly when perceptual_weight > 0")
        self.cfg = cfg
        self.perceptual = perceptual
        self.lecam = LeCamEMA(cfg.lecam_ema_decay)

    def discriminator_active(self, step: int) -> bool:
        """Whether at ``step`` the discriminator trains and the generator gets the adversarial term."""
        return self.cfg.gan_enabled and step >= self.cfg.discriminator_start

    def generator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor,
                       quantizer_aux: Mapping[str, torch.Tensor], step: int,
                       discriminator: nn.Module) -> tuple[torch.Tensor, Terms]:
        """The tokenizer's loss for images ``inputs`` in [0, 1] and their ``reconstructions`` (N, C, H, W).

        ``quantizer_aux`` must hold ``quantizer_loss`` when ``quantizer_weight > 0``. The discriminator
        (module or engine) is evaluated only when active, with its parameters' ``requires_grad`` off
        for the call, so no gradient of this loss reaches them.
        """
        cfg = self.cfg
        with _fp32(inputs):
            inputs, reconstructions = inputs.float(), reconstructions.float()
            terms: Terms = {}
            distance = F.mse_loss if cfg.reconstruction_loss == ReconstructionLoss.l2 else F.l1_loss
            total = cfg.reconstruction_weight * distance(reconstructions, inputs)
            terms[f"loss_{cfg.reconstruction_loss.value}"] = total.detach()
            if self.perceptual is not None:
                perceptual, parts = self.perceptual(reconstructions, inputs)
                weighted = cfg.perceptual_weight * perceptual
                total = total + weighted
                terms["loss_perceptual"] = weighted.detach()
                terms.update({f"perceptual_{name}": value.detach() for name, value in parts.items()})
            if cfg.quantizer_weight > 0:
                if "quantizer_loss" not in quantizer_aux:
                    raise KeyError(f"quantizer_weight={cfg.quantizer_weight} needs 'quantizer_loss' in the model's "
                                   f"aux outputs; got keys {sorted(quantizer_aux)}")
                weighted = cfg.quantizer_weight * quantizer_aux["quantizer_loss"].float()
                total = total + weighted
                terms["loss_quantizer"] = weighted.detach()
            gan = total.new_zeros(())
            if self.discriminator_active(step):
                with _no_param_grads(discriminator):
                    logits_fake = _logits(discriminator, reconstructions)
                gan = cfg.discriminator_weight * cfg.discriminator_factor * generator_adversarial_loss(logits_fake)
                total = total + gan
            terms["loss_gan"] = gan.detach()
        return total, terms

    def discriminator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, step: int,
                           discriminator: nn.Module) -> tuple[torch.Tensor, Terms]:
        """The discriminator's loss (hinge + LeCam) on real ``inputs`` and ``reconstructions``.

        Reconstructions are detached here. Updates the LeCam averages (after computing the loss with
        the previous ones), so call it once per discriminator step, and only while
        :meth:`discriminator_active`.
        """
        if not self.discriminator_active(step):
            raise RuntimeError(f"discriminator_loss at step {step}: the discriminator is not active "
                               f"(start {self.cfg.discriminator_start}, GAN enabled: {self.cfg.gan_enabled})")
        cfg = self.cfg
        with _fp32(inputs):
            logits_real = _logits(discriminator, inputs.detach().float())
            logits_fake = _logits(discriminator, reconstructions.detach().float())
            hinge = cfg.discriminator_factor * hinge_discriminator_loss(logits_real, logits_fake)
            real_mean, fake_mean = logits_real.mean(), logits_fake.mean()
            lecam = hinge.new_zeros(())
            if cfg.lecam_weight > 0:
                lecam = cfg.lecam_weight * lecam_regularization(
                    real_mean, fake_mean, self.lecam.ema_logits_real.clone(), self.lecam.ema_logits_fake.clone())
                self.lecam.update(real_mean, fake_mean)
            terms: Terms = {
                "loss_hinge": hinge.detach(), "loss_lecam": lecam.detach(),
                "d_logits_real": real_mean.detach(), "d_logits_fake": fake_mean.detach(),
                "lecam_ema_real": self.lecam.ema_logits_real.clone(),
                "lecam_ema_fake": self.lecam.ema_logits_fake.clone(),
            }
        return hinge + lecam, terms


def build_pixel_loss(cfg: PixelLossConfig) -> TokenizerPixelLoss:
    """The composed loss with its perceptual networks loaded from ``cfg.perceptual``'s weight files."""
    perceptual = build_perceptual_loss(cfg.perceptual) if cfg.perceptual_weight > 0 else None
    return TokenizerPixelLoss(cfg, perceptual)


def _logits(discriminator: nn.Module, images: torch.Tensor) -> torch.Tensor:
    # The discriminator may hold 16-bit parameters (DeepSpeed without autocast); the loss stays in fp32.
    dtype = next(discriminator.parameters()).dtype
    return discriminator(images.to(dtype)).float()


@contextlib.contextmanager
def _fp32(reference: torch.Tensor) -> Iterator[None]:
    with torch.autocast(device_type=reference.device.type, enabled=False):
        yield


@contextlib.contextmanager
def _no_param_grads(module: nn.Module) -> Iterator[None]:
    params = list(module.parameters())
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)

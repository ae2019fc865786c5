"""Pixel losses and the discriminator of the tokenizer's pixel recipes (plain torch modules).

The trainer builds ``build_pixel_loss(cfg.tokenizer.losses)`` and
``build_discriminator(cfg.tokenizer.discriminator)`` and calls, in each step,
``generator_loss(...)`` for the tokenizer's engine and, while ``discriminator_active(step)``,
``discriminator_loss(...)`` for the discriminator's engine.
"""

from trainer.losses.config import DiscriminatorConfig, PerceptualLossConfig, PixelLossConfig, ReconstructionLoss
from trainer.losses.discriminator import NLayerDiscriminator, build_discriminator
from trainer.losses.perceptual import PerceptualLoss, build_perceptual_loss
from trainer.losses.pixel import TokenizerPixelLoss, build_pixel_loss
from trainer.losses.random_backbones import save_random_backbones

__all__ = [
    "DiscriminatorConfig", "NLayerDiscriminator", "PerceptualLoss", "PerceptualLossConfig", "PixelLossConfig",
    "ReconstructionLoss", "TokenizerPixelLoss", "build_discriminator", "build_perceptual_loss", "build_pixel_loss",
    "save_random_backbones",
]

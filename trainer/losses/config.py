"""Settings of the tokenizer's pixel losses and of its discriminator (plain dataclasses).

The trainer mounts them as ``tokenizer.losses`` (:class:`PixelLossConfig`) and
``tokenizer.discriminator`` (:class:`DiscriminatorConfig`).

Defaults are the authors' paper stage-2 recipe (``configs/training/TiTok/stage2/titok_{l32,b64,s128}.yaml``
in github:bytedance/1d-tokenizer, identical for the three sizes): L2 weight 1, perceptual loss
``convnext_s`` at weight 0.1, quantizer weight 0, discriminator weight 0.01 and factor 1 from step
20k, LeCam 0.001 with EMA decay 0.999 (their code's default; no config sets it). The authors use no
adaptive GAN weight. Their single-stage recipe (the TA-TiTok / VQ-8k configs) differs in:
``perceptual.lpips_weight=1.0 perceptual.convnext_weight=0.1 perceptual_weight=1.1 quantizer_weight=1.0
discriminator_weight=0.1 discriminator_start=200000``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from trainer.config import ConfigError

# torchvision's ImageNet weights (the files torchvision itself downloads for these architectures).
VGG16_IMAGENET_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
CONVNEXT_SMALL_IMAGENET_URL = "https://download.pytorch.org/models/convnext_small-0c510722.pth"

_PREFIX = "tokenizer.losses"


class ReconstructionLoss(str, enum.Enum):
    l2 = "l2"
    l1 = "l1"


@dataclass
class PerceptualLossConfig:
    """Perceptual loss = (lpips_weight * LPIPS + convnext_weight * ConvNeXt) / (lpips_weight + convnext_weight).

    A network whose weight is 0 is not built. The authors' string ``lpips-convnext_s-1.0-0.1`` is
    ``lpips_weight=1.0 convnext_weight=0.1``; ``convnext_s`` alone is ``lpips_weight=0 convnext_weight=1``.
    Weight sources are local paths, ``s3://`` URLs or http(s) URLs (``.pth`` state dicts loaded with
    ``weights_only=True``, or ``.safetensors``).
    """

    lpips_weight: float = 0.0
    convnext_weight: float = 1.0
    # VGG16 backbone of LPIPS: a torchvision vgg16 state dict (only its ``features.*`` keys are used).
    vgg16_weights: str = VGG16_IMAGENET_URL
    # LPIPS linear layers (keys ``lin{0..4}.model.1.weight``); null: the v0.1 VGG file shipped in the lpips package.
    lpips_linear_weights: Optional[str] = None
    # torchvision convnext_small state dict; its ImageNet logits are compared.
    convnext_weights: str = CONVNEXT_SMALL_IMAGENET_URL

    def __post_init__(self) -> None:
        if self.lpips_weight < 0 or self.convnext_weight < 0:
            raise ConfigError(f"{_PREFIX}.perceptual", "lpips_weight and convnext_weight must be >= 0, got "
                                                       f"{self.lpips_weight} and {self.convnext_weight}")


@dataclass
class PixelLossConfig:
    """Generator-side and discriminator-side loss weights (see the module docstring for the sources)."""

    reconstruction_loss: ReconstructionLoss = ReconstructionLoss.l2
    reconstruction_weight: float = 1.0
    perceptual_weight: float = 0.1
    perceptual: PerceptualLossConfig = field(default_factory=PerceptualLossConfig)
    quantizer_weight: float = 0.0
    discriminator_weight: float = 0.01
    discriminator_factor: float = 1.0
    # First step at which the discriminator trains and the generator gets the adversarial term.
    discriminator_start: int = 20_000
    lecam_weight: float = 0.001
    lecam_ema_decay: float = 0.999

    def __post_init__(self) -> None:
        try:
            self.reconstruction_loss = ReconstructionLoss(self.reconstruction_loss)
        except ValueError:
            raise ConfigError(f"{_PREFIX}.reconstruction_loss", f"{self.reconstruction_loss!r} is not a valid choice; "
                                                                "valid: l2, l1") from None
        for name in ("reconstruction_weight", "perceptual_weight", "quantizer_weight", "discriminator_weight",
                     "discriminator_factor", "lecam_weight", "discriminator_start"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_PREFIX}.{name}", f"must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.lecam_ema_decay < 1.0:
            raise ConfigError(f"{_PREFIX}.lecam_ema_decay", f"must be in [0, 1), got {self.lecam_ema_decay}")
        if self.perceptual_weight > 0 and self.perceptual.lpips_weight + self.perceptual.convnext_weight == 0:
            raise ConfigError(f"{_PREFIX}.perceptual",
                              "perceptual_weight > 0 needs lpips_weight or convnext_weight > 0")

    @property
    def gan_enabled(self) -> bool:
        return self.discriminator_weight > 0 and self.discriminator_factor > 0


@dataclass
class DiscriminatorConfig:
    """The authors' NLayerDiscriminator (defaults as in their code; no config of theirs changes them)."""

    num_channels: int = 3
    hidden_channels: int = 128
    num_stages: int = 3
    blur_resample: bool = True   # anti-aliased blur downsampling; false: 2x2 average pooling
    blur_kernel_size: int = 4    # 3, 4 or 5 taps of the binomial blur filter

    def __post_init__(self) -> None:
        key = "tokenizer.discriminator"
        if self.num_channels < 1 or self.num_stages < 1:
            raise ConfigError(key, "num_channels and num_stages must be >= 1")
        # GroupNorm uses 32 groups on every stage's output (hidden_channels * 2**i channels).
        if self.hidden_channels < 32 or self.hidden_channels % 32:
            raise ConfigError(f"{key}.hidden_channels",
                              f"must be a positive multiple of 32, got {self.hidden_channels}")
        if self.blur_kernel_size not in (3, 4, 5):
            raise ConfigError(f"{key}.blur_kernel_size",
                              f"{self.blur_kernel_size!r} is not a valid choice; valid: 3, 4, 5")

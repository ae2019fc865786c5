"""The TiTok authors' patch discriminator (their ``NLayerDiscriminator``), as a plain ``nn.Module``.

Architecture (defaults): 5x5 conv 3->128 + LeakyReLU(0.1); three stages of [3x3 conv, 2x
anti-aliased blur downsampling, GroupNorm(32), LeakyReLU(0.1)] doubling the width (128->128->256->512);
adaptive max-pool to 16x16; 1x1 conv + LeakyReLU; 5x5 conv to one logit map. Input: images in
[0, 1] NCHW; output: logits (N, 1, 16, 16).

Module and parameter names follow the authors' layout (``block_in``, ``blocks.{i}``, ``to_logits``), so
their state dicts load. Their convolutions pad TensorFlow-style ("same"); for the odd kernels and
stride 1 used here that is plain symmetric padding ``k // 2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.losses.config import DiscriminatorConfig

# Binomial filters by number of taps.
BLUR_TAPS = {3: (1.0, 2.0, 1.0), 4: (1.0, 3.0, 3.0, 1.0), 5: (1.0, 4.0, 6.0, 4.0, 1.0)}
LEAKY_SLOPE = 0.1


class BlurDownsample(nn.Module):
    """Depthwise binomial blur with stride 2 and TensorFlow "same" padding (output = ceil(input / 2)).

    The authors pad as for 4 taps whatever the filter; with their 4-tap default that is the same, for
    3 or 5 taps this pads for the filter actually used.
    """

    def __init__(self, taps: int = 4) -> None:
        super().__init__()
        row = torch.tensor(BLUR_TAPS[taps])
        kernel = torch.outer(row, row)
        self.register_buffer("kernel", (kernel / kernel.sum())[None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel.shape[-1]
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad order: last dim first
            total = max((-(-size // 2) - 1) * 2 + k - size, 0)
            pads += [total // 2, total - total // 2]
        x = F.pad(x, pads)
        channels = x.shape[1]
        return F.conv2d(x, self.kernel.to(x.dtype).expand(channels, 1, k, k), stride=2, groups=channels)


def _conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


class NLayerDiscriminator(nn.Module):
    """Patch discriminator of TiTok stage 2 (see the module docstring)."""

    def __init__(self, num_channels: int = 3, hidden_channels: int = 128, num_stages: int = 3,
                 blur_resample: bool = True, blur_kernel_size: int = 4) -> None:
        super().__init__()
        self.block_in = nn.Sequential(_conv(num_channels, hidden_channels, 5), nn.LeakyReLU(LEAKY_SLOPE))
        blocks = []
        out_channels = hidden_channels
        for stage in range(num_stages):
            in_channels = hidden_channels * (2 ** (stage - 1) if stage else 1)
            out_channels = hidden_channels * 2 ** stage
            blocks.append(nn.Sequential(
                _conv(in_channels, out_channels, 3),
                BlurDownsample(blur_kernel_size) if blur_resample else nn.AvgPool2d(kernel_size=2, stride=2),
                nn.GroupNorm(32, out_channels),
                nn.LeakyReLU(LEAKY_SLOPE),
            ))
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveMaxPool2d((16, 16))
        self.to_logits = nn.Sequential(_conv(out_channels, out_channels, 1), nn.LeakyReLU(LEAKY_SLOPE),
                                       _conv(out_channels, 1, 5))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logit map (N, 1, 16, 16) of images (N, C, H, W)."""
        hidden = self.block_in(images)
        for block in self.blocks:
            hidden = block(hidden)
        return self.to_logits(self.pool(hidden))


def build_discriminator(cfg: DiscriminatorConfig) -> NLayerDiscriminator:
    """The discriminator described by ``cfg`` (PyTorch default initialisation, as the authors)."""
    return NLayerDiscriminator(cfg.num_channels, cfg.hidden_channels, cfg.num_stages, cfg.blur_resample,
                               cfg.blur_kernel_size)

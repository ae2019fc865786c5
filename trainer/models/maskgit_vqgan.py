"""MaskGIT-VQGAN: the conv tokenizer whose codes TiTok's stage 1 predicts ("proxy codes").

Same module layout as the published ``maskgit-vqgan-imagenet-f16-256.bin`` (keys ``encoder.*``,
``decoder.*``, ``quantize.embedding.weight``). Its decoder (and codebook) also become TiTok's pixel
decoder (``pixel_decoder.*``, ``pixel_quantize.*``) for stage 2 and the published tokenizers.

Quirks kept for the published weights: ResNet-block convs have no bias; GroupNorm(32, eps 1e-6);
when a block changes the channel count, the 1x1 shortcut is applied to the block's *output*
(the input is dropped); downsampling is 2x2 average pooling, upsampling nearest-neighbour then a
3x3 conv; there is no output clamp inside the decoder.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.blocks import autocast_disabled
from trainer.models.config import PixelDecoderConfig


def _conv(in_channels: int, out_channels: int, kernel_size: int, bias: bool = True) -> nn.Conv2d:
    # Stride 1 and odd kernels: TF "same" padding is symmetric k // 2.
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = _conv(in_channels, out_channels, 3, bias=False)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = _conv(out_channels, out_channels, 3, bias=False)
        self.nin_shortcut = _conv(out_channels, out_channels, 1, bias=False) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        # Published-weights quirk: with a channel change the shortcut sees h, not x.
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(h))


def _res_blocks(in_channels: int, out_channels: int, count: int) -> nn.ModuleList:
    return nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(count))


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, downsample: bool) -> None:
        super().__init__()
        self.block = _res_blocks(in_channels, out_channels, num_res_blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2) if self.downsample else x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, upsample: bool) -> None:
        super().__init__()
        self.block = _res_blocks(in_channels, out_channels, num_res_blocks)
        self.upsample_conv = _conv(out_channels, out_channels, 3) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        if self.upsample_conv is not None:
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class PixelEncoder(nn.Module):
    """Images (B, 3, H, W) -> latents (B, z_channels, H/f, W/f), f = 2**(levels-1)."""

    def __init__(self, cfg: PixelDecoderConfig) -> None:
        super().__init__()
        channels = [cfg.hidden_channels * m for m in cfg.channel_mult]
        self.conv_in = _conv(3, cfg.hidden_channels, 3, bias=False)
        inputs = [cfg.hidden_channels] + channels[:-1]
        last = len(channels) - 1
        self.down = nn.ModuleList(DownBlock(cin, cout, cfg.num_res_blocks, downsample=i != last)
                                  for i, (cin, cout) in enumerate(zip(inputs, channels)))
        self.mid = _res_blocks(channels[-1], channels[-1], cfg.num_res_blocks)
        self.norm_out = _group_norm(channels[-1])
        self.conv_out = _conv(channels[-1], cfg.z_channels, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(images)
        for block in self.down:
            x = block(x)
        for block in self.mid:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class PixelDecoder(nn.Module):
    """Latents (B, z_channels, h, w) -> unclamped images (B, 3, h*f, w*f).

    ``up`` is stored highest resolution first (``up.0``) and run from the last entry to the first.
    """

    def __init__(self, cfg: PixelDecoderConfig) -> None:
        super().__init__()
        channels = [cfg.hidden_channels * m for m in cfg.channel_mult]
        self.conv_in = _conv(cfg.z_channels, channels[-1], 3)
        self.mid = _res_blocks(channels[-1], channels[-1], cfg.num_res_blocks)
        inputs = channels[1:] + channels[-1:]
        self.up = nn.ModuleList(UpBlock(cin, cout, cfg.num_res_blocks, upsample=i != 0)
                                for i, (cin, cout) in enumerate(zip(inputs, channels)))
        self.norm_out = _group_norm(channels[0])
        self.conv_out = _conv(channels[0], 3, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        for block in self.mid:
            x = block(x)
        for block in reversed(self.up):
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class ProxyCodebook(nn.Module):
    """The MaskGIT-VQGAN codebook (``embedding``: codebook_size x z_channels, not normalised)."""

    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) of latents (B, C, h, w): argmin of squared Euclidean distance."""
        batch, dim, height, width = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, dim)
        codebook = self.embedding.weight.to(flat.dtype)
        # ||z||^2 + ||e||^2 - 2 z.e in one addmm, the same expression as the published converter.
        distances = torch.addmm(flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)[None], flat, codebook.T,
                                alpha=-2.0)
        return distances.argmin(dim=1).view(batch, height, width)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) of codes (B, h, w)."""
        return self.embedding(codes).permute(0, 3, 1, 2)

    def expected(self, probs: torch.Tensor) -> torch.Tensor:
        """Soft embedding sum_c p_c e_c of code probabilities (B, codebook_size, h, w) -> (B, C, h, w)."""
        return torch.einsum("nchw,cd->ndhw", probs, self.embedding.weight.to(probs.dtype))


class MaskGITVQGAN(nn.Module):
    """The frozen stage-1 teacher: conv encoder, codebook, conv decoder. Images are in [0, 1]."""

    def __init__(self, cfg: PixelDecoderConfig | None = None) -> None:
        super().__init__()
        self.config = cfg or PixelDecoderConfig()
        self.encoder = PixelEncoder(self.config)
        self.decoder = PixelDecoder(self.config)
        self.quantize = ProxyCodebook(self.config.codebook_size, self.config.z_channels)

    @torch.no_grad()
    def encode_to_codes(self, images: torch.Tensor) -> torch.Tensor:
        """Proxy codes (B, H/f, W/f) of images (B, 3, H, W) in [0, 1] (fed as is, no normalisation)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        with autocast_disabled(images):
            z = self.encoder(images.float())
            return self.quantize.nearest(z)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] of codes (B, h, w) (or (B, h*w) for a square grid)."""
        if codes.dim() == 2:
            side = int(round(codes.shape[1] ** 0.5))
            if side * side != codes.shape[1]:
                raise ValueError(f"flat codes need a square grid, got {codes.shape[1]} codes per image")
            codes = codes.view(codes.shape[0], side, side)
        return self.decoder(self.quantize.lookup(codes.long())).clamp(0.0, 1.0)


def pixel_config_from_state(state: Mapping[str, torch.Tensor]) -> PixelDecoderConfig:
    """The geometry of a MaskGIT-VQGAN state dict (``encoder.*``/``decoder.*``/``quantize.*`` keys).

    Read from tensor shapes: z channels from ``decoder.conv_in``, base width from ``encoder.conv_in``,
    one level per ``decoder.up.{i}``, blocks per level from ``decoder.up.0.block.*``. Falls back to
    the published f16 geometry when the keys are not there (the strict load then names them).
    """
    try:
        hidden = state["encoder.conv_in.weight"].shape[0]
        levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("decoder.up."))
        mult = [state[f"decoder.up.{i}.block.0.conv1.weight"].shape[0] // hidden for i in range(levels)]
        blocks = sum(1 for k in state if k.startswith("decoder.up.0.block.") and k.endswith(".conv1.weight"))
        return PixelDecoderConfig(hidden_channels=hidden, channel_mult=mult, num_res_blocks=blocks,
                                  z_channels=state["decoder.conv_in.weight"].shape[1],
                                  codebook_size=state["quantize.embedding.weight"].shape[0])
    except (KeyError, ValueError, IndexError):
        return PixelDecoderConfig()


def build_maskgit_vqgan(cfg: PixelDecoderConfig | None = None) -> MaskGITVQGAN:
    """A MaskGIT-VQGAN with the given geometry (default: the published f16 model), randomly initialised."""
    return MaskGITVQGAN(cfg)

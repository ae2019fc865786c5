"""Tiny model configs for tests/models: same code paths as the published sizes, seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.models import GeneratorConfig, PixelDecoderConfig, TiTokConfig

# The authors' key/shape listings of their published checkpoints: test data of this repository
# (what they are: docs/checkpoint_format.md).
OFFICIAL_KEYS_DIR = Path(__file__).resolve().parents[1] / "data" / "official_keys"

# f4 MaskGIT-VQGAN (3 levels: one x2 step between each) with 32 channels, so 32x32 images have an
# 8x8 code grid and the TiTok patch size is 4.
TINY_PIXEL = PixelDecoderConfig(hidden_channels=32, channel_mult=[1, 1, 2], num_res_blocks=1, z_channels=32,
                                codebook_size=64)


def tiny_tokenizer_config(**overrides) -> TiTokConfig:
    values = dict(image_size=32, patch_size=4, num_latent_tokens=8, codebook_size=64, token_size=4,
                  vit_enc_model_size=None, vit_dec_model_size=None, vit_enc_width=32, vit_enc_num_layers=2,
                  vit_enc_num_heads=2, vit_dec_width=48, vit_dec_num_layers=2, vit_dec_num_heads=4,
                  pixel_decoder=TINY_PIXEL)
    values.update(overrides)
    return TiTokConfig(**values)


def tiny_generator_config(model_type: str = "ViT", **overrides) -> GeneratorConfig:
    values = dict(model_type=model_type, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=64, image_seq_len=8, condition_num_classes=10, codebook_size=64)
    values.update(overrides)
    return GeneratorConfig(**values)


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter (LayerNorm/GroupNorm too), so no path is an identity by init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return module


def images(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)

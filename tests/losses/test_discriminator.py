"""The authors' discriminator architecture: layout, sizes, and the blur downsampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from trainer.config import ConfigError
from trainer.losses import DiscriminatorConfig, NLayerDiscriminator, build_discriminator
from trainer.losses.discriminator import BlurDownsample


def _conv_params(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + cout


def test_default_discriminator_has_the_authors_layout_and_size():
    disc = build_discriminator(DiscriminatorConfig())
    # Widths 128 -> 128 -> 256 -> 512, GroupNorm affine on each stage, 1x1 and 5x5 heads.
    expected = (_conv_params(3, 128, 5)
                + _conv_params(128, 128, 3) + 2 * 128
                + _conv_params(128, 256, 3) + 2 * 256
                + _conv_params(256, 512, 3) + 2 * 512
                + _conv_params(512, 512, 1) + _conv_params(512, 1, 5))
    assert sum(p.numel() for p in disc.parameters()) == expected
    keys = set(disc.state_dict())
    # Key names of the authors' NLayerDiscriminator (their blur kernel is a persistent buffer too).
    assert {"block_in.0.weight", "blocks.0.0.weight", "blocks.0.1.kernel", "blocks.2.2.weight", "blocks.2.2.bias",
            "to_logits.0.weight", "to_logits.2.weight", "to_logits.2.bias"} <= keys
    logits = disc(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 1, 16, 16)  # adaptive max-pool to 16x16 whatever the image size


def test_small_discriminator_from_yaml_and_bad_widths_fail_clearly():
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DiscriminatorConfig),
                                              OmegaConf.create({"hidden_channels": 32, "num_stages": 2,
                                                                "blur_resample": False})))
    disc = build_discriminator(cfg)
    assert isinstance(disc.blocks[0][1], torch.nn.AvgPool2d)
    assert disc(torch.rand(1, 3, 32, 32)).shape == (1, 1, 16, 16)
    with pytest.raises(ConfigError, match="hidden_channels.*multiple of 32"):
        DiscriminatorConfig(hidden_channels=48)
    with pytest.raises(ConfigError, match="blur_kernel_size.*valid: 3, 4, 5"):
        DiscriminatorConfig(blur_kernel_size=2)


def _blur_reference(image: np.ndarray, taps: list[float]) -> np.ndarray:
    """Stride-2 binomial blur of one channel with TensorFlow "same" padding, by explicit sums."""
    k = len(taps)
    kernel = np.outer(taps, taps) / np.sum(taps) ** 2
    pads = []
    for size in image.shape:
        total = max((-(-size // 2) - 1) * 2 + k - size, 0)
        pads.append((total // 2, total - total // 2))
    padded = np.pad(image, pads)
    out_h, out_w = -(-image.shape[0] // 2), -(-image.shape[1] // 2)
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            out[i, j] = np.sum(padded[2 * i:2 * i + k, 2 * j:2 * j + k] * kernel)
    return out


@pytest.mark.parametrize("taps, size", [((1, 3, 3, 1), (8, 8)), ((1, 3, 3, 1), (7, 9)), ((1, 2, 1), (6, 5)),
                                        ((1, 4, 6, 4, 1), (9, 6))])
def test_blur_downsampling_matches_explicit_sums(taps, size):
    images = torch.rand(2, 3, *size, dtype=torch.float64)
    blurred = BlurDownsample(len(taps)).double()(images)
    for n in range(2):
        for c in range(3):
            np.testing.assert_allclose(blurred[n, c].numpy(), _blur_reference(images[n, c].numpy(), list(taps)),
                                       rtol=1e-12, atol=1e-12)
    # A constant image stays constant away from the zero padding (the filter sums to 1).
    constant = BlurDownsample(len(taps))(torch.full((1, 1, 16, 16), 0.7))
    torch.testing.assert_close(constant[..., 2:-2, 2:-2], torch.full_like(constant[..., 2:-2, 2:-2], 0.7))


def test_discriminator_accepts_unclamped_images_and_trains():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(hidden_channels=32, num_stages=2)
    images = torch.rand(2, 3, 32, 32) * 1.4 - 0.2
    disc(images).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in disc.parameters())

"""Random-weight perceptual backbones, written once for the losses tests (no download)."""

from __future__ import annotations

import pytest
import torch

from trainer.losses import save_random_backbones


@pytest.fixture(scope="session")
def backbone_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``{"vgg16_weights": path, "convnext_weights": path}`` of random same-architecture files."""
    return save_random_backbones(str(tmp_path_factory.mktemp("backbones")), seed=1)


@pytest.fixture
def images() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 64x64 images in [0, 1] and a noisy copy (the "reconstruction"), not clamped."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(2, 3, 64, 64, generator=generator)
    reconstructions = inputs + 0.2 * torch.randn(inputs.shape, generator=generator)
    return inputs, reconstructions

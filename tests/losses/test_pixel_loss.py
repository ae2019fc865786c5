"""The composed pixel loss: formulas, the discriminator start step, gradients, LeCam state."""

from __future__ import annotations

import io
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from torch import nn

from trainer.config import ConfigError
from trainer.losses import (
    NLayerDiscriminator,
    PerceptualLossConfig,
    PixelLossConfig,
    TokenizerPixelLoss,
    build_pixel_loss,
)
from trainer.losses.gan import generator_adversarial_loss, hinge_discriminator_loss, lecam_regularization

START = 5


class FixedLogits(nn.Module):
    """A discriminator whose logits are a known function of the image: 3 * mean(x) - 1 per image."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(3.0))
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return (self.scale * images.mean((1, 2, 3)) - 1.0).view(-1, 1, 1, 1)


def _loss(**overrides) -> TokenizerPixelLoss:
    base = dict(perceptual_weight=0.0, discriminator_start=START)
    return build_pixel_loss(PixelLossConfig(**{**base, **overrides}))


def test_gan_formulas_against_hand_computed_values():
    real = torch.tensor([0.5, 2.0, -0.5, -1.5])
    fake = torch.tensor([-2.0, 0.0, 1.5, -0.5])
    # relu(1 - real) = [0.5, 0, 1.5, 2.5] -> 1.125; relu(1 + fake) = [0, 1, 2.5, 0.5] -> 1.0
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (1.125 + 1.0))
    assert generator_adversarial_loss(fake).item() == pytest.approx(0.25)
    # relu(0.3 - (-0.2))**2 + relu(0.1 - (-0.4))**2 = 0.25 + 0.25
    lecam = lecam_regularization(torch.tensor(0.3), torch.tensor(-0.4), torch.tensor(0.1), torch.tensor(-0.2))
    assert lecam.item() == pytest.approx(0.5)
    assert lecam_regularization(torch.tensor(-1.0), torch.tensor(1.0), torch.tensor(-1.0), torch.tensor(1.0)) == 0


def test_discriminator_start_gates_the_adversarial_terms(images):
    inputs, reconstructions = images
    loss, disc = _loss(), FixedLogits()
    aux = {"quantizer_loss": torch.tensor(7.0)}  # quantizer_weight 0 (stage 2): ignored
    before, terms = loss.generator_loss(inputs, reconstructions, aux, START - 1, disc)
    assert not loss.discriminator_active(START - 1) and disc.calls == 0
    assert terms["loss_gan"] == 0 and "loss_quantizer" not in terms
    mse = ((reconstructions - inputs) ** 2).mean()
    torch.testing.assert_close(before, mse)
    with pytest.raises(RuntimeError, match="not active"):
        loss.discriminator_loss(inputs, reconstructions, START - 1, disc)

    assert loss.discriminator_active(START)
    after, terms = loss.generator_loss(inputs, reconstructions, aux, START, disc)
    gan = 0.01 * 1.0 * -(3.0 * reconstructions.mean((1, 2, 3)) - 1.0).mean()
    torch.testing.assert_close(terms["loss_gan"], gan)
    torch.testing.assert_close(after, mse + gan)
    # Discriminator weight or factor 0 switches the GAN off for good.
    assert not _loss(discriminator_factor=0.0).discriminator_active(10**9)


def test_generator_loss_sums_weighted_terms_and_its_gradient_skips_the_discriminator(images):
    inputs, reconstructions = images
    reconstructions = reconstructions.clone().requires_grad_(True)
    loss = _loss(reconstruction_loss="l1", reconstruction_weight=2.0, quantizer_weight=0.5)
    disc = NLayerDiscriminator(hidden_channels=32, num_stages=2)
    quantizer_loss = torch.tensor(0.8, requires_grad=True)
    total, terms = loss.generator_loss(inputs, reconstructions, {"quantizer_loss": quantizer_loss}, START, disc)
    with torch.no_grad():
        expected = 2.0 * (reconstructions - inputs).abs().mean() + 0.5 * 0.8 - 0.01 * disc(reconstructions).mean()
    torch.testing.assert_close(total.detach(), expected)
    torch.testing.assert_close(terms["loss_l1"] + terms["loss_quantizer"] + terms["loss_gan"], total.detach())
    total.backward()
    assert reconstructions.grad.abs().sum() > 0 and quantizer_loss.grad.item() == pytest.approx(0.5)
    assert all(p.grad is None and p.requires_grad for p in disc.parameters())  # frozen for the call only
    with pytest.raises(KeyError, match="quantizer_loss"):
        loss.generator_loss(inputs, reconstructions, {}, START, disc)


def test_discriminator_loss_hinge_plus_lecam_and_its_ema(images):
    inputs, reconstructions = images
    loss, disc = _loss(lecam_weight=0.5, lecam_ema_decay=0.9, discriminator_factor=2.0), FixedLogits()
    reconstructions = reconstructions.clone().requires_grad_(True)
    real = 3.0 * inputs.mean((1, 2, 3)) - 1.0
    fake = 3.0 * reconstructions.detach().mean((1, 2, 3)) - 1.0
    ema_real = ema_fake = 0.0
    for _ in range(3):
        d_loss, terms = loss.discriminator_loss(inputs, reconstructions, START, disc)
        hinge = 0.5 * (torch.relu(1 - real).mean() + torch.relu(1 + fake).mean())
        lecam = torch.relu(real.mean() - ema_fake) ** 2 + torch.relu(ema_real - fake.mean()) ** 2
        torch.testing.assert_close(d_loss.detach(), 2.0 * hinge + 0.5 * lecam)
        torch.testing.assert_close(terms["loss_lecam"], 0.5 * lecam)
        ema_real, ema_fake = 0.9 * ema_real + 0.1 * real.mean(), 0.9 * ema_fake + 0.1 * fake.mean()
        torch.testing.assert_close(loss.lecam.ema_logits_real, ema_real)
        torch.testing.assert_close(loss.lecam.ema_logits_fake, ema_fake)
    d_loss.backward()
    assert disc.scale.grad is not None and reconstructions.grad is None  # reconstructions are detached


def test_lecam_state_round_trips_through_state_dict(images):
    inputs, reconstructions = images
    source, disc = _loss(), NLayerDiscriminator(hidden_channels=32, num_stages=2)
    for _ in range(2):
        source.discriminator_loss(inputs, reconstructions, START, disc)
    state = source.state_dict()
    assert set(state) == {"lecam.ema_logits_real", "lecam.ema_logits_fake"}
    assert state["lecam.ema_logits_real"] != 0
    buffer = io.BytesIO()
    torch.save(state, buffer)
    restored = _loss()
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True), strict=True)
    for key, value in state.items():
        assert torch.equal(restored.state_dict()[key], value)
    # The next step is the same for both.
    a, _ = source.discriminator_loss(inputs, reconstructions, START, disc)
    b, _ = restored.discriminator_loss(inputs, reconstructions, START, disc)
    assert torch.equal(a, b)


def test_with_perceptual_networks_state_stays_small_and_gradients_reach_only_the_reconstruction(backbone_files, images):
    inputs, reconstructions = images
    reconstructions = reconstructions.clone().requires_grad_(True)
    loss = build_pixel_loss(PixelLossConfig(
        perceptual_weight=1.1, discriminator_start=0,
        perceptual=PerceptualLossConfig(lpips_weight=1.0, convnext_weight=0.1, **backbone_files)))
    disc = NLayerDiscriminator(hidden_channels=32, num_stages=2)
    loss.train()
    total, terms = loss.generator_loss(inputs, reconstructions, {}, 0, disc)
    expected_perceptual = 1.1 * (terms["perceptual_lpips"] + 0.1 * terms["perceptual_convnext"]) / 1.1
    torch.testing.assert_close(terms["loss_perceptual"], expected_perceptual)
    torch.testing.assert_close(terms["loss_l2"] + terms["loss_perceptual"] + terms["loss_gan"], total.detach())
    total.backward()
    assert reconstructions.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.parameters()) and all(p.grad is None for p in disc.parameters())
    assert set(loss.state_dict()) == {"lecam.ema_logits_real", "lecam.ema_logits_fake"}


def test_loss_is_float32_under_autocast_and_with_a_bf16_discriminator(images):
    inputs, reconstructions = images
    loss, disc = _loss(), NLayerDiscriminator(hidden_channels=32, num_stages=2)
    reference, _ = loss.generator_loss(inputs, reconstructions, {}, START, disc)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast, _ = loss.generator_loss(inputs, reconstructions, {}, START, disc)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, reference)
    d_loss, _ = loss.discriminator_loss(inputs.bfloat16(), reconstructions, START, disc.bfloat16())
    assert d_loss.dtype == torch.float32 and torch.isfinite(d_loss)


def test_config_defaults_are_the_authors_stage2_values_and_bad_values_fail():
    cfg = OmegaConf.to_object(OmegaConf.structured(PixelLossConfig))
    assert (cfg.reconstruction_loss.value, cfg.reconstruction_weight, cfg.perceptual_weight, cfg.quantizer_weight,
            cfg.discriminator_weight, cfg.discriminator_factor, cfg.discriminator_start, cfg.lecam_weight,
            cfg.lecam_ema_decay) == ("l2", 1.0, 0.1, 0.0, 0.01, 1.0, 20_000, 0.001, 0.999)
    assert (cfg.perceptual.lpips_weight, cfg.perceptual.convnext_weight) == (0.0, 1.0)  # "convnext_s"
    with pytest.raises(ConfigError, match="tokenizer.losses.lecam_ema_decay"):
        PixelLossConfig(lecam_ema_decay=1.0)
    with pytest.raises(ConfigError, match="tokenizer.losses.perceptual"):
        PixelLossConfig(perceptual=PerceptualLossConfig(lpips_weight=0.0, convnext_weight=0.0))
    with pytest.raises(ConfigError, match="tokenizer.losses.discriminator_start"):
        PixelLossConfig(discriminator_start=-1)


def _lecam_rank(rank: int, world_size: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        loss, disc = _loss(lecam_ema_decay=0.5), FixedLogits()
        inputs = torch.full((2, 3, 8, 8), 0.25 * (rank + 1))  # per-rank logits: real -0.25 / 0.5
        loss.discriminator_loss(inputs, torch.zeros_like(inputs), START, disc)  # fake logits -1 on both
        results.put((rank, loss.lecam.ema_logits_real.item(), loss.lecam.ema_logits_fake.item()))
    finally:
        torch.distributed.destroy_process_group()


def test_lecam_ema_is_the_same_on_every_rank():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("fork").SimpleQueue()
    # fork: the children reuse this process's imports (spawn would re-import torch and torchvision).
    mp.start_processes(_lecam_rank, args=(2, port, results), nprocs=2, start_method="fork")
    by_rank = dict((rank, emas) for rank, *emas in (results.get(), results.get()))
    # Global means: real (-0.25 + 0.5) / 2 = 0.125, fake -1; EMA from 0 with decay 0.5.
    assert by_rank[0] == by_rank[1] == pytest.approx([0.5 * 0.125, 0.5 * -1.0])

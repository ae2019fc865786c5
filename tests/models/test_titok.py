"""TiTok and MaskGIT-VQGAN on tiny configs: the forward pass against the formulas of
docs/checkpoint_format.md and torch's reference modules, batch independence, the stage-1/stage-2
outputs, training features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.models import MaskGITVQGAN, build_maskgit_vqgan, build_tokenizer
from trainer.models.blocks import ResidualAttentionBlock
from trainer.models.maskgit_vqgan import ResnetBlock
from trainer.models.titok import PatchesToImage

from .conftest import TINY_PIXEL, images, randomize_, tiny_tokenizer_config


@pytest.fixture
def tokenizer():
    return randomize_(build_tokenizer(tiny_tokenizer_config())).eval()


def test_vit_block_equals_torch_transformer_layer() -> None:
    """Pre-norm block, LayerNorm eps 1e-5, exact GELU, packed q/k/v with 1/sqrt(head dim) scaling."""
    block = randomize_(ResidualAttentionBlock(32, 4), scale=0.2).eval()
    reference = nn.TransformerEncoderLayer(32, 4, dim_feedforward=128, dropout=0.0, activation="gelu",
                                           layer_norm_eps=1e-5, batch_first=True, norm_first=True).eval()
    mapping = {"ln_1": "norm1", "ln_2": "norm2", "attn.in_proj": "self_attn.in_proj", "attn.out_proj": "self_attn.out_proj",
               "mlp.c_fc": "linear1", "mlp.c_proj": "linear2"}
    state = {}
    for key, value in block.state_dict().items():
        for ours, theirs in mapping.items():
            if key.startswith(ours):
                state[theirs + key[len(ours):]] = value
    reference.load_state_dict(state)
    x = torch.randn(3, 10, 32)
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference(x), atol=1e-5, rtol=1e-5)


def test_encoder_applies_the_legacy_raw_reshape(tokenizer) -> None:
    """docs/checkpoint_format.md §7.1: the (K, W) latent block is re-read as (W, K) before the 1x1 conv."""
    captured = {}
    tokenizer.encoder.ln_post.register_forward_hook(lambda m, i, out: captured.setdefault("h", out))
    x = images(2)
    with torch.no_grad():
        z = tokenizer.encoder(x, tokenizer.latent_tokens)
    h = captured["h"]  # (B, K, W)
    batch, k, width = h.shape
    conv = tokenizer.encoder.conv_out
    flat = h.reshape(batch, k * width)  # element c*K + j of the row-major (K, W) block is channel c, position j
    expected = torch.einsum("dc,bcj->bdj", conv.weight[:, :, 0, 0], flat.view(batch, width, k)) + conv.bias[:, None]
    torch.testing.assert_close(z, expected.unsqueeze(2))
    # ... which differs from the per-token projection the non-legacy layout does.
    proper = torch.einsum("dc,bjc->bdj", conv.weight[:, :, 0, 0], h) + conv.bias[:, None]
    assert not torch.allclose(z, proper.unsqueeze(2))


def test_decode_is_pixel_decoder_of_the_expected_proxy_embedding(tokenizer) -> None:
    """Checkpoint format §3: softmax over the 1024 (here 64) proxy codes, expectation of the pixel
    codebook, decoder."""
    latents = tokenizer.quantize.lookup(torch.randint(0, 64, (2, 8)))
    with torch.no_grad():
        logits = tokenizer.decoder(latents)
        probs = logits.softmax(dim=1).permute(0, 2, 3, 1)  # (B, G, G, C)
        expected_z = (probs @ tokenizer.pixel_quantize.embedding.weight).permute(0, 3, 1, 2)
        pixels = tokenizer.decode(latents)
    assert logits.shape == (2, 64, 8, 8)
    torch.testing.assert_close(pixels, tokenizer.pixel_decoder(expected_z))


def test_patches_to_image_channel_order() -> None:
    """Non-legacy head: channels ordered (row in patch, column in patch, rgb), i.e. einops
    'b (p1 p2 c) h w -> b c (h p1) (w p2)'."""
    p, grid = 2, 3
    x = torch.randn(2, p * p * 3, grid, grid)
    out = PatchesToImage(p)(x)
    expected = torch.empty(2, 3, grid * p, grid * p)
    for p1 in range(p):
        for p2 in range(p):
            for c in range(3):
                expected[:, c, p1::p, p2::p] = x[:, (p1 * p + p2) * 3 + c]
    assert torch.equal(out, expected)


def test_resnet_block_shortcut_quirk() -> None:
    """Checkpoint format §3: GroupNorm(32, eps 1e-6), SiLU, bias-free 3x3 convs; with a channel change the 1x1
    shortcut is applied to the block output h, not to the input."""
    block = randomize_(ResnetBlock(32, 64), scale=0.2).eval()
    x = torch.randn(2, 32, 5, 5)
    h = F.conv2d(F.silu(F.group_norm(x, 32, block.norm1.weight, block.norm1.bias, eps=1e-6)), block.conv1.weight, padding=1)
    h = F.conv2d(F.silu(F.group_norm(h, 32, block.norm2.weight, block.norm2.bias, eps=1e-6)), block.conv2.weight, padding=1)
    with torch.no_grad():
        torch.testing.assert_close(block(x), h + F.conv2d(h, block.nin_shortcut.weight))
    same = randomize_(ResnetBlock(32, 32), scale=0.2).eval()
    with torch.no_grad():
        h = same.conv2(F.silu(same.norm2(same.conv1(F.silu(same.norm1(x))))))
        torch.testing.assert_close(same(x), h + x)


def test_tokens_and_pixels_do_not_depend_on_batch_composition(tokenizer) -> None:
    x = images(4)
    tokens = tokenizer.encode(x)
    one_by_one = torch.cat([tokenizer.encode(x[i:i + 1]) for i in range(4)])
    assert tokens.dtype == torch.int64 and tokens.shape == (4, 8)
    assert torch.equal(tokens, one_by_one)
    pixels = tokenizer.decode_tokens(tokens)
    torch.testing.assert_close(pixels, torch.cat([tokenizer.decode_tokens(tokens[i:i + 1]) for i in range(4)]),
                               atol=1e-4, rtol=0)  # conv kernels pick batch-dependent algorithms
    assert torch.equal(tokenizer.encode(x.flip(0)), tokens.flip(0))


def test_decode_tokens_clamps_and_accepts_authors_layout(tokenizer) -> None:
    tokens = tokenizer.encode(images(2))
    with torch.no_grad():
        raw = tokenizer.decode(tokenizer.quantize.lookup(tokens))
    pixels = tokenizer.decode_tokens(tokens)
    assert raw.min() < 0 or raw.max() > 1  # the random model overshoots, so the clamp is exercised
    assert torch.equal(pixels, raw.clamp(0, 1))
    assert torch.equal(tokenizer.decode_tokens(tokens[:, None]), pixels)


def test_forward_returns_unclamped_pixels_and_quantizer_aux(tokenizer) -> None:
    x = images(2)
    out, aux = tokenizer(x)
    latents, aux2 = tokenizer.encode_latents(x)
    assert out.shape == (2, 3, 32, 32)
    assert set(aux) >= {"quantizer_loss", "commitment_loss", "codebook_loss", "token_ids"}
    assert torch.equal(aux["token_ids"], tokenizer.encode(x))
    torch.testing.assert_close(out, tokenizer.decode(latents))
    torch.testing.assert_close(aux["quantizer_loss"], aux["commitment_loss"] + aux["codebook_loss"])


def test_stage1_outputs_proxy_code_logits() -> None:
    model = build_tokenizer(tiny_tokenizer_config(finetune_decoder=False))
    assert model.pixel_decoder is None and not any(k.startswith("pixel_") for k in model.state_dict())
    logits, aux = model(images(2))
    assert logits.shape == (2, 64, 8, 8)  # one logit per proxy code, per patch
    logits.float().mean().backward()
    assert model.encoder.patch_embed.weight.grad is not None  # straight-through reaches the encoder
    with pytest.raises(RuntimeError, match="stage-1"):
        model.decode_tokens(aux["token_ids"])


def test_non_legacy_decoder_predicts_pixels() -> None:
    model = randomize_(build_tokenizer(tiny_tokenizer_config(finetune_decoder=False, is_legacy=False))).eval()
    assert model.outputs_pixels and "decoder.conv_out.weight" in model.state_dict()
    pixels = model.decode_tokens(model.encode(images(2)))
    assert pixels.shape == (2, 3, 32, 32) and 0 <= pixels.min() and pixels.max() <= 1


def test_pixel_decoder_output_conv_starts_as_the_identity() -> None:
    """The last 3x3 conv passes the assembled patches through at init (not a near-zero map: with both
    it and the patch projection near zero, the pixel head starts on a saddle), and the ViT init of
    every other layer is untouched."""
    model = build_tokenizer(tiny_tokenizer_config(finetune_decoder=False, is_legacy=False))
    patches = torch.rand(2, 3, 32, 32)
    assert torch.equal(model.decoder.conv_out(patches), patches)
    assert model.decoder.ffn[0].weight.std().item() == pytest.approx(0.02, rel=0.2)
    # Checkpoints keep the published layout: the keys and shapes of a plain Conv2d(3, 3, 3).
    assert {k: tuple(v.shape) for k, v in model.decoder.conv_out.state_dict().items()} == {
        "weight": (3, 3, 3, 3), "bias": (3,)}


def test_vae_variant() -> None:
    model = randomize_(build_tokenizer(tiny_tokenizer_config(quantize_mode="vae", finetune_decoder=False,
                                                             is_legacy=False, kl_weight=0.5)))
    x = images(2)
    model.eval()
    mean = model.encode(x)
    assert mean.shape == (2, 4, 1, 8) and mean.dtype == torch.float32
    assert torch.equal(model.encode(x), mean)  # encode is deterministic: the posterior mean
    model.train()
    out, aux = model(x)
    assert set(aux) == {"quantizer_loss", "kl_loss"}
    torch.testing.assert_close(aux["quantizer_loss"], 0.5 * aux["kl_loss"])
    sampled, _ = model.encode_latents(x)
    assert not torch.allclose(sampled, mean)  # training samples from the posterior
    assert model.decode_tokens(mean).shape == (2, 3, 32, 32)


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    model = randomize_(build_tokenizer(tiny_tokenizer_config(finetune_decoder=False))).train()
    x = images(2)

    def grads():
        model.zero_grad()
        logits, aux = model(x)
        (logits.square().mean() + aux["quantizer_loss"]).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_grad_checkpointing(True)
    assert model.encoder.grad_checkpointing and model.decoder.grad_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_bf16_autocast_forward_and_backward(tokenizer) -> None:
    tokenizer.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, aux = tokenizer(images(2))
    assert aux["quantizer_loss"].dtype == torch.float32
    assert torch.isfinite(out.float()).all()
    out.float().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in tokenizer.parameters() if p.grad is not None)


def test_compiled_model_matches_eager(tokenizer) -> None:
    from trainer.models import maybe_compile

    x = images(2)
    eager = tokenizer.encode(x)
    keys = list(tokenizer.state_dict())
    compiled = maybe_compile(tokenizer, True, backend="eager")
    assert compiled is tokenizer and list(compiled.state_dict()) == keys  # no _orig_mod. prefix
    with torch.no_grad():
        out, aux = compiled(x)
    assert torch.equal(aux["token_ids"], eager)


def test_bad_images_are_rejected(tokenizer) -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        tokenizer.encode(torch.rand(1, 3, 64, 64))
    with pytest.raises(TypeError, match="uint8"):
        tokenizer.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        tokenizer.decode_tokens(torch.zeros(1, 5, dtype=torch.long))


def test_teacher_codes_and_proxy_decoder_transfer() -> None:
    teacher = randomize_(build_maskgit_vqgan(TINY_PIXEL)).eval()
    x = images(2)
    codes = teacher.encode_to_codes(x)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.int64
    with torch.no_grad():
        torch.testing.assert_close(codes, teacher.quantize.nearest(teacher.encoder(x)))
        pixels = teacher.decode_codes(codes)
        torch.testing.assert_close(pixels, teacher.decoder(teacher.quantize.lookup(codes)).clamp(0, 1))
    assert torch.equal(teacher.decode_codes(codes.flatten(1)), pixels)

    model = build_tokenizer(tiny_tokenizer_config())
    model.load_proxy_decoder_from(teacher)
    z = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.pixel_decoder(z), teacher.decoder(z))
    assert torch.equal(model.pixel_quantize.embedding.weight, teacher.quantize.embedding.weight)
    with pytest.raises(RuntimeError, match="no pixel decoder"):
        build_tokenizer(tiny_tokenizer_config(finetune_decoder=False)).load_proxy_decoder_from(teacher)
    with pytest.raises(ValueError, match="geometry"):
        model.load_proxy_decoder_from(MaskGITVQGAN(TINY_PIXEL.__class__(hidden_channels=32, channel_mult=[1, 1, 2],
                                                                         num_res_blocks=2, z_channels=32,
                                                                         codebook_size=64)))

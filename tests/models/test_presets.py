"""Published presets: every key and shape equals the authors' listings (tests/data/official_keys, see
docs/checkpoint_format.md); output shapes of every preset; building L-32 on the meta device allocates
nothing."""

from __future__ import annotations

import json
import os

import psutil
import pytest
import torch

from trainer.models import (
    PUBLISHED_MODELS,
    build_generator,
    build_maskgit_vqgan,
    build_tokenizer,
    published_generator_config,
    published_tokenizer_config,
)

from .conftest import OFFICIAL_KEYS_DIR

BUILDERS = {"tokenizer": (build_tokenizer, published_tokenizer_config),
            "generator": (build_generator, published_generator_config)}


def _spec(name: str) -> dict:
    return json.loads((OFFICIAL_KEYS_DIR / name).read_text())


def test_every_published_listing_is_checked() -> None:
    """The listings in the repository are exactly the ones the tests below compare with."""
    listed = sorted(p.name for p in OFFICIAL_KEYS_DIR.glob("*.json"))
    expected = sorted([f"official_keys_{kind}_{name}.json" for kind in BUILDERS for name in PUBLISHED_MODELS]
                      + ["official_keys_summary.json"])
    assert listed == expected
    summary = _spec("official_keys_summary.json")
    assert sorted(summary) == sorted(n for n in expected if n != "official_keys_summary.json")
    for name, counts in summary.items():
        assert len(_spec(name)) == counts["num_keys"]


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize("name", PUBLISHED_MODELS)
def test_state_dict_matches_published_listing(kind: str, name: str) -> None:
    build, config = BUILDERS[kind]
    with torch.device("meta"):
        model = build(config(name))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = _spec(f"official_keys_{kind}_{name}.json")
    assert sorted(ours) == sorted(expected)
    assert ours == expected
    summary = _spec("official_keys_summary.json")[f"official_keys_{kind}_{name}.json"]
    assert len(ours) == summary["num_keys"]
    assert sum(v.numel() for v in model.state_dict().values()) == summary["num_params"]


@pytest.mark.parametrize("name", PUBLISHED_MODELS)
def test_output_shapes_of_published_presets(name: str) -> None:
    """Shape inference on the meta device: the full forward pass, no memory."""
    with torch.device("meta"):
        tokenizer = build_tokenizer(published_tokenizer_config(name))
        images = torch.empty(2, 3, 256, 256)
        pixels, aux = tokenizer(images)
        latents, _ = tokenizer.encode_latents(images)
        generator = build_generator(published_generator_config(name))
        k = generator.config.image_seq_len
        logits = generator.logits(torch.zeros(2, k, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                                  torch.ones(2, dtype=torch.bool))
    num_tokens = tokenizer.config.num_latent_tokens
    assert num_tokens == k
    assert pixels.shape == (2, 3, 256, 256)
    assert latents.shape == (2, 12, 1, num_tokens)
    assert aux["token_ids"].shape == (2, num_tokens) and aux["token_ids"].dtype == torch.int64
    assert aux["quantizer_loss"].shape == ()
    assert tokenizer.decoder(latents).shape == (2, 1024, 16, 16)  # proxy-code logits per patch
    assert logits.shape == (2, k, 4096)


def test_teacher_layout_and_shapes() -> None:
    with torch.device("meta"):
        teacher = build_maskgit_vqgan()
        z = teacher.encoder(torch.empty(2, 3, 256, 256))
        pixels = teacher.decoder(torch.empty(2, 256, 16, 16))
    assert z.shape == (2, 256, 16, 16) and pixels.shape == (2, 3, 256, 256)
    keys = teacher.state_dict()
    # The published MaskGIT-VQGAN's decoder is TiTok's pixel decoder, key for key.
    tokenizer_spec = _spec("official_keys_tokenizer_titok_l32.json")
    decoder = {f"pixel_{k}": list(v.shape) for k, v in keys.items() if k.startswith("decoder.")}
    assert decoder == {k: v for k, v in tokenizer_spec.items() if k.startswith("pixel_decoder.")}
    assert list(keys["quantize.embedding.weight"].shape) == tokenizer_spec["pixel_quantize.embedding.weight"]
    assert "encoder.conv_in.bias" not in keys and list(keys["encoder.conv_out.weight"].shape) == [256, 512, 1, 1]


def test_meta_build_of_l32_allocates_nothing() -> None:
    process = psutil.Process(os.getpid())
    before = process.memory_info().rss
    with torch.device("meta"):
        model = build_tokenizer(published_tokenizer_config("titok_l32"))
    grown = process.memory_info().rss - before
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.is_meta for t in tensors)
    size = sum(t.numel() * t.element_size() for t in tensors)
    assert size > 2.5e9  # what a real build would allocate (641M fp32 parameters)
    assert grown < 100e6, f"RSS grew by {grown / 1e6:.0f} MB"


def test_teacher_geometry_is_read_from_the_published_layout() -> None:
    from trainer.models import PixelDecoderConfig
    from trainer.models.maskgit_vqgan import pixel_config_from_state

    with torch.device("meta"):
        state = build_maskgit_vqgan().state_dict()
    assert pixel_config_from_state(state) == PixelDecoderConfig()

"""Config validation and the authors' config.json <-> dataclass conversion."""

from __future__ import annotations

import json

import pytest

from trainer.config import ConfigError
from trainer.models import (
    VIT_PRESETS,
    GeneratorConfig,
    TiTokConfig,
    build_tokenizer,
    generator_config_from_json,
    generator_config_to_json,
    tokenizer_config_from_json,
    tokenizer_config_to_json,
)

from .conftest import tiny_generator_config, tiny_tokenizer_config

# configs/infer/TiTok/titok_s128.yaml of the authors' repository, as their hub config.json holds it
# (OmegaConf.to_container without resolving: the interpolation stays a string).
AUTHORS_S128 = {
    "experiment": {"tokenizer_checkpoint": "tokenizer_titok_s128.bin", "generator_checkpoint": "generator_titok_s128.bin",
                   "output_dir": "titok_s_128"},
    "model": {
        "vq_model": {"codebook_size": 4096, "token_size": 12, "use_l2_norm": True, "commitment_cost": 0.25,
                     "vit_enc_model_size": "small", "vit_dec_model_size": "small", "vit_enc_patch_size": 16,
                     "vit_dec_patch_size": 16, "num_latent_tokens": 128, "finetune_decoder": True},
        "generator": {"model_type": "UViT", "hidden_size": 1024, "num_hidden_layers": 20, "num_attention_heads": 16,
                      "intermediate_size": 4096, "dropout": 0.1, "attn_drop": 0.1, "num_steps": 64,
                      "class_label_dropout": 0.1, "image_seq_len": "${model.vq_model.num_latent_tokens}",
                      "condition_num_classes": 1000, "randomize_temperature": 2.8, "guidance_scale": 6.9,
                      "guidance_decay": "power-cosine"},
    },
    "dataset": {"preprocessing": {"crop_size": 256}},
}


def test_presets_and_extension_keys_override_them() -> None:
    cfg = TiTokConfig(vit_enc_model_size="base", vit_dec_model_size="small")
    assert tuple(cfg.encoder_size) == VIT_PRESETS["base"] == (768, 12, 12)
    assert tuple(cfg.decoder_size) == VIT_PRESETS["small"] == (512, 8, 8)
    cfg = TiTokConfig(vit_enc_model_size="base", vit_enc_num_layers=3, vit_dec_model_size="small", vit_dec_width=256,
                      vit_dec_num_heads=4)
    assert tuple(cfg.encoder_size) == (768, 3, 12)
    assert tuple(cfg.decoder_size) == (256, 8, 4)
    import torch

    with torch.device("meta"):
        model = build_tokenizer(cfg)
    assert len(model.encoder.transformer) == 3 and len(model.decoder.transformer) == 8
    assert model.decoder.transformer[0].attn.in_proj_weight.shape == (3 * 256, 256)
    assert model.decoder.transformer[0].attn.num_heads == 4


@pytest.mark.parametrize("overrides, key", [
    (dict(vit_enc_model_size="huge"), "model.vit_enc_model_size"),
    (dict(vit_enc_model_size=None, vit_enc_width=64), "model.vit_enc_model_size"),
    (dict(vit_dec_width=100, vit_dec_model_size="small"), "model.vit_dec_num_heads"),
    (dict(quantize_mode="fsq"), "model.quantize_mode"),
    (dict(quantize_mode="vae"), "model.finetune_decoder"),
    (dict(image_size=250), "model.patch_size"),
    (dict(patch_size=8, image_size=256), "model.patch_size"),
])
def test_bad_tokenizer_configs_name_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        TiTokConfig(**overrides)
    assert err.value.key == key


def test_bad_preset_lists_valid_choices() -> None:
    with pytest.raises(ConfigError, match="valid: small, base, large"):
        TiTokConfig(vit_dec_model_size="xl")


@pytest.mark.parametrize("overrides, key", [
    (dict(model_type="GPT"), "model.model_type"),
    (dict(hidden_size=30), "model.num_attention_heads"),
    (dict(dropout=1.5), "model.dropout"),
])
def test_bad_generator_configs_name_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        tiny_generator_config(**overrides)
    assert err.value.key == key


def test_generator_token_space() -> None:
    cfg = GeneratorConfig(codebook_size=4096, condition_num_classes=1000)
    assert (cfg.mask_token_id, cfg.null_class_id, cfg.vocab_size) == (4096, 5097, 5098)


def test_authors_tokenizer_config_json() -> None:
    cfg = tokenizer_config_from_json(json.loads(json.dumps(AUTHORS_S128)))
    assert cfg == TiTokConfig(num_latent_tokens=128, vit_enc_model_size="small", vit_dec_model_size="small")


def test_authors_generator_config_json_resolves_interpolation() -> None:
    cfg = generator_config_from_json(AUTHORS_S128)
    assert cfg == GeneratorConfig(model_type="UViT", hidden_size=1024, num_hidden_layers=20, num_attention_heads=16,
                                  intermediate_size=4096, image_seq_len=128, codebook_size=4096)


def test_authors_vae_config_takes_their_defaults() -> None:
    # configs/infer/TiTok/titok_ll32_vae_c16.yaml: no codebook keys, non-legacy, stage-1 style.
    d = {"model": {"vq_model": {"quantize_mode": "vae", "token_size": 16, "vit_enc_model_size": "large",
                                "vit_dec_model_size": "large", "vit_enc_patch_size": 16, "vit_dec_patch_size": 16,
                                "num_latent_tokens": 32, "finetune_decoder": False, "is_legacy": False}},
         "dataset": {"preprocessing": {"crop_size": 256}}}
    cfg = tokenizer_config_from_json(d)
    assert (cfg.quantize_mode, cfg.token_size, cfg.is_legacy, cfg.finetune_decoder) == ("vae", 16, False, False)
    assert tokenizer_config_from_json(tokenizer_config_to_json(cfg)) == cfg


def test_non_preset_tiny_config_round_trips_through_json() -> None:
    cfg = tiny_tokenizer_config(commitment_cost=0.1, use_l2_norm=False)
    d = json.loads(json.dumps(tokenizer_config_to_json(cfg)))
    vq = d["model"]["vq_model"]
    assert "vit_enc_model_size" not in vq and vq["vit_enc_width"] == 32 and vq["vit_dec_width"] == 48
    assert vq["vit_enc_patch_size"] == vq["vit_dec_patch_size"] == 4
    assert vq["pixel_decoder"] == {"hidden_channels": 32, "channel_mult": [1, 1, 2], "num_res_blocks": 1,
                                   "z_channels": 32, "codebook_size": 64}
    assert d["dataset"]["preprocessing"]["crop_size"] == 32
    assert tokenizer_config_from_json(d) == cfg
    gen = tiny_generator_config("UViT", dropout=0.0)
    assert generator_config_from_json(json.loads(json.dumps(generator_config_to_json(gen)))) == gen


def test_published_config_json_keeps_preset_names() -> None:
    vq = tokenizer_config_to_json(TiTokConfig())["model"]["vq_model"]
    assert vq["vit_enc_model_size"] == vq["vit_dec_model_size"] == "large"
    assert not any(k.startswith(("vit_enc_width", "vit_dec_width")) for k in vq)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["model"].pop("vq_model"), "missing section 'model.vq_model'"),
    (lambda d: d["model"]["vq_model"].update(vit_enc_width="wide"), "vit_enc_width"),
    (lambda d: d["model"]["vq_model"].update(vit_dec_patch_size=8), "vit_dec_patch_size"),
    (lambda d: d["model"]["vq_model"].update(vit_enc_model_size="giant"), "giant"),
])
def test_bad_tokenizer_json_is_a_clear_error(mutate, message: str) -> None:
    d = json.loads(json.dumps(AUTHORS_S128))
    mutate(d)
    with pytest.raises(ValueError, match=message):
        tokenizer_config_from_json(d)


def test_bad_generator_json_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="missing section 'model.generator'"):
        generator_config_from_json({"model": {"vq_model": {}}})
    d = json.loads(json.dumps(AUTHORS_S128))
    d["model"]["generator"]["model_type"] = "Transformer"
    with pytest.raises(ValueError, match="valid: ViT, UViT"):
        generator_config_from_json(d)

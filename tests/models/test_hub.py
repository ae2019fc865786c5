"""Saving and loading in the authors' hub format, on a local directory and on S3 (moto server)."""

from __future__ import annotations

import io
import json
import os
import pickle

import pytest
import torch

from cluster import storage
from trainer.models import (
    TiTok,
    build_generator,
    build_maskgit_vqgan,
    build_tokenizer,
    load_generator,
    load_maskgit_vqgan,
    load_tokenizer,
    save_pretrained,
    tokenizer_config_to_json,
)
from trainer.models.hub import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME

from .conftest import TINY_PIXEL, images, randomize_, tiny_generator_config, tiny_tokenizer_config


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_tokenizer_round_trip_is_exact(store_root: str, safe: bool) -> None:
    model = randomize_(build_tokenizer(tiny_tokenizer_config())).eval()
    directory = storage.join(store_root, "tok")
    save_pretrained(model, directory, safe_serialization=safe)
    names = sorted(os.path.basename(f.url) for f in storage.list_files(directory))
    assert names == sorted([CONFIG_NAME, SAFETENSORS_NAME if safe else BIN_NAME])
    loaded = load_tokenizer(directory)
    assert isinstance(loaded, TiTok) and not loaded.training
    assert loaded.config == model.config
    _same_state(model, loaded)
    x = images(2)
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert torch.equal(loaded.decode_tokens(model.encode(x)), model.decode_tokens(model.encode(x)))


@pytest.mark.parametrize("model_type", ["ViT", "UViT"])
def test_generator_round_trip_is_exact(store_root: str, model_type: str) -> None:
    model = randomize_(build_generator(tiny_generator_config(model_type))).eval()
    directory = storage.join(store_root, "gen")
    model.save_pretrained(directory)  # the method form writes the same as save_pretrained(model, ...)
    loaded = load_generator(directory)
    assert type(loaded) is type(model) and loaded.config == model.config
    _same_state(model, loaded)
    tokens = torch.randint(0, 65, (2, 8))
    labels = torch.tensor([1, 7])
    assert torch.equal(loaded.logits(tokens, labels), model.logits(tokens, labels))


def test_config_json_is_the_authors_nested_format(tmp_path) -> None:
    model = build_tokenizer(tiny_tokenizer_config())
    save_pretrained(model, str(tmp_path))
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved == tokenizer_config_to_json(model.config)
    assert saved["model"]["vq_model"]["num_latent_tokens"] == 8
    generator = build_generator(tiny_generator_config("UViT"))
    save_pretrained(generator, str(tmp_path / "g"))
    saved = json.loads((tmp_path / "g" / CONFIG_NAME).read_text())
    assert saved["model"]["generator"]["model_type"] == "UViT"
    assert saved["model"]["vq_model"]["codebook_size"] == 64


def test_single_weight_file_with_explicit_config(tmp_path) -> None:
    """The authors' legacy releases: one .bin state dict, the architecture from their YAML."""
    model = randomize_(build_tokenizer(tiny_tokenizer_config())).eval()
    path = tmp_path / "tokenizer_tiny.bin"
    torch.save(model.state_dict(), path)
    with pytest.raises(ValueError, match="no config.json"):
        load_tokenizer(str(path))
    loaded = load_tokenizer(str(path), config=tokenizer_config_to_json(model.config))
    _same_state(model, loaded)
    loaded = load_tokenizer(str(path), config=model.config)
    _same_state(model, loaded)


def test_legacy_bert_buffers_are_ignored_and_half_precision_loads_as_fp32(tmp_path) -> None:
    model = randomize_(build_generator(tiny_generator_config("ViT"))).eval()
    state = {k: v.half() for k, v in model.state_dict().items()}
    state["model.embeddings.position_ids"] = torch.arange(9)[None]  # transformers < 4.31 saved it
    path = tmp_path / "generator.bin"
    torch.save(state, path)
    loaded = load_generator(str(path), config=model.config)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(loaded.model.lm_head.weight, model.model.lm_head.weight.half().float())


def test_mismatched_weights_name_the_keys(tmp_path) -> None:
    model = build_tokenizer(tiny_tokenizer_config())
    save_pretrained(model, str(tmp_path))
    other = tiny_tokenizer_config(num_latent_tokens=16)
    with pytest.raises(ValueError, match=r"wrong shape .*latent_tokens"):
        load_tokenizer(str(tmp_path), config=other)
    stage1 = tiny_tokenizer_config(finetune_decoder=False)
    with pytest.raises(ValueError, match=r"unexpected \(\d+\): \['pixel_"):
        load_tokenizer(str(tmp_path), config=stage1)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/titok-should-not-exist",))


def test_pickles_with_code_are_refused(tmp_path) -> None:
    path = tmp_path / BIN_NAME
    with open(path, "wb") as f:
        pickle.dump({"latent_tokens": _Payload()}, f, protocol=2)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(tokenizer_config_to_json(tiny_tokenizer_config())))
    with pytest.raises(pickle.UnpicklingError):
        load_tokenizer(str(tmp_path))
    assert not os.path.exists("/tmp/titok-should-not-exist")


def test_missing_sources_are_clear_errors(tmp_path, monkeypatch) -> None:
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_tokenizer(str(tmp_path / "absent" / "dir"))
    import huggingface_hub.constants

    # No network in tests: offline mode makes the hub path fail fast, and it must say what failed.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="hub download failed"):
        load_tokenizer("nobody-here/tokenizer_titok_l32_imagenet")
    with pytest.raises(TypeError, match="save_pretrained takes"):
        save_pretrained(torch.nn.Linear(2, 2), str(tmp_path / "x"))


def test_teacher_loads_from_a_weight_file(store_root: str) -> None:
    teacher = randomize_(build_maskgit_vqgan(TINY_PIXEL)).eval()
    url = storage.join(store_root, "maskgit-vqgan.bin")
    buffer = io.BytesIO()
    torch.save(teacher.state_dict(), buffer)
    storage.write_bytes(url, buffer.getvalue())
    loaded = load_maskgit_vqgan(url, TINY_PIXEL)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    _same_state(teacher, loaded)
    x = images(2)
    assert torch.equal(loaded.encode_to_codes(x), teacher.encode_to_codes(x))
    inferred = load_maskgit_vqgan(url)  # geometry read from the weights
    assert inferred.config == TINY_PIXEL
    _same_state(teacher, inferred)
    with pytest.raises(ValueError, match="do not fit"):
        load_maskgit_vqgan(url, build_maskgit_vqgan().config)  # the published f16 geometry differs

"""Generators on tiny configs: BERT layers and U-ViT blocks against torch's reference transformer
layers, the token space, label dropout through ``drop``, skip pairing, determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.models import BertGenerator, UViTGenerator, build_generator
from trainer.models.generator import BertLayer, UViTBlock

from .conftest import randomize_, tiny_generator_config


def _inputs(cfg, batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.codebook_size, (batch, cfg.image_seq_len), generator=g)
    tokens[torch.rand(batch, cfg.image_seq_len, generator=g) < 0.5] = cfg.mask_token_id
    labels = torch.randint(0, cfg.condition_num_classes, (batch,), generator=g)
    return tokens, labels


def _reference_layer(hidden: int, heads: int, inner: int, eps: float, norm_first: bool, state: dict) -> nn.Module:
    layer = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=inner, dropout=0.0, activation="gelu",
                                       layer_norm_eps=eps, batch_first=True, norm_first=norm_first).eval()
    layer.load_state_dict(state)
    return layer


def test_bert_layer_equals_post_norm_transformer_layer() -> None:
    """BERT: post-norm, LayerNorm eps 1e-12, exact GELU, separate q/k/v with bias."""
    cfg = tiny_generator_config(dropout=0.0, attn_drop=0.0)
    layer = randomize_(BertLayer(cfg), scale=0.2).eval()
    s = layer.state_dict()
    qkv = ("attention.self.query", "attention.self.key", "attention.self.value")
    state = {
        "self_attn.in_proj_weight": torch.cat([s[f"{n}.weight"] for n in qkv]),
        "self_attn.in_proj_bias": torch.cat([s[f"{n}.bias"] for n in qkv]),
        "self_attn.out_proj.weight": s["attention.output.dense.weight"],
        "self_attn.out_proj.bias": s["attention.output.dense.bias"],
        "linear1.weight": s["intermediate.dense.weight"], "linear1.bias": s["intermediate.dense.bias"],
        "linear2.weight": s["output.dense.weight"], "linear2.bias": s["output.dense.bias"],
        "norm1.weight": s["attention.output.LayerNorm.weight"], "norm1.bias": s["attention.output.LayerNorm.bias"],
        "norm2.weight": s["output.LayerNorm.weight"], "norm2.bias": s["output.LayerNorm.bias"],
    }
    reference = _reference_layer(32, 4, 64, 1e-12, norm_first=False, state=state)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(x), atol=1e-5, rtol=1e-5)


def test_uvit_block_equals_pre_norm_transformer_layer_without_qkv_bias() -> None:
    block = randomize_(UViTBlock(32, 4, 64), scale=0.2).eval()
    s = block.state_dict()
    state = {
        "self_attn.in_proj_weight": s["attn.qkv.weight"], "self_attn.in_proj_bias": torch.zeros(96),
        "self_attn.out_proj.weight": s["attn.proj.weight"], "self_attn.out_proj.bias": s["attn.proj.bias"],
        "linear1.weight": s["mlp.fc1.weight"], "linear1.bias": s["mlp.fc1.bias"],
        "linear2.weight": s["mlp.fc2.weight"], "linear2.bias": s["mlp.fc2.bias"],
        "norm1.weight": s["norm1.weight"], "norm1.bias": s["norm1.bias"],
        "norm2.weight": s["norm2.weight"], "norm2.bias": s["norm2.bias"],
    }
    reference = _reference_layer(32, 4, 64, 1e-5, norm_first=True, state=state)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference(x), atol=1e-5, rtol=1e-5)


def test_bert_embeddings_and_head_follow_the_spec() -> None:
    model = randomize_(BertGenerator(tiny_generator_config(dropout=0.0, attn_drop=0.0))).eval()
    tokens, labels = _inputs(model.config)
    emb = model.model.embeddings
    ids = torch.cat([labels[:, None] + 65, tokens], dim=1)  # class token = label + codebook_size + 1
    x = emb.word_embeddings.weight[ids] + emb.position_embeddings.weight[:9] + emb.token_type_embeddings.weight[0]
    x = nn.functional.layer_norm(x, (32,), emb.LayerNorm.weight, emb.LayerNorm.bias, eps=1e-12)
    with torch.no_grad():
        for layer in model.model.encoder.layer:
            x = layer(x)
        expected = model.model.lm_head(x[:, 1:])
        torch.testing.assert_close(model.logits(tokens, labels), expected)


def test_uvit_pairs_skips_last_in_first_out() -> None:
    model = randomize_(UViTGenerator(tiny_generator_config("UViT"))).eval()
    assert len(model.in_blocks) == len(model.out_blocks) == 2
    outputs, skips = {}, {}
    for i, block in enumerate(model.in_blocks):
        block.register_forward_hook(lambda m, a, out, i=i: outputs.setdefault(i, out))
    for i, block in enumerate(model.out_blocks):
        block.register_forward_hook(lambda m, a, out, i=i: skips.setdefault(i, a[1]))
    tokens, labels = _inputs(model.config)
    with torch.no_grad():
        model.logits(tokens, labels)
    assert skips[0] is outputs[1] and skips[1] is outputs[0]


@pytest.mark.parametrize("model_type", ["ViT", "UViT"])
def test_logits_shape_token_space_and_guidance_drop(model_type: str) -> None:
    model = randomize_(build_generator(tiny_generator_config(model_type))).eval()
    cfg = model.config
    assert (model.mask_token_id, model.null_class_id) == (64, 64 + 10 + 1)
    assert torch.equal(model.class_token_ids(torch.tensor([0, 9]), torch.tensor([False, True])), torch.tensor([65, 75]))
    tokens, labels = _inputs(cfg)
    logits = model.logits(tokens, labels)
    assert logits.shape == (3, cfg.image_seq_len, cfg.codebook_size) and logits.dtype == torch.float32
    assert torch.equal(model(tokens, labels), logits)  # forward is logits; eval is deterministic
    drop = torch.tensor([True, False, True])
    dropped = model.logits(tokens, labels, drop)
    other_labels = (labels + 1) % cfg.condition_num_classes
    # Dropped rows see only the null class, whatever the label; kept rows are unchanged.
    torch.testing.assert_close(dropped[drop], model.logits(tokens, other_labels, drop)[drop])
    torch.testing.assert_close(dropped[~drop], logits[~drop])
    assert not torch.allclose(dropped[drop], logits[drop])
    # Row independence: one sample alone gives the same logits.
    torch.testing.assert_close(model.logits(tokens[1:2], labels[1:2]), logits[1:2], atol=1e-5, rtol=1e-5)


def test_bert_dropout_only_in_training() -> None:
    model = randomize_(BertGenerator(tiny_generator_config(dropout=0.3, attn_drop=0.3)))
    tokens, labels = _inputs(model.config)
    model.train()
    assert not torch.allclose(model.logits(tokens, labels), model.logits(tokens, labels))
    model.eval()
    assert torch.equal(model.logits(tokens, labels), model.logits(tokens, labels))


@pytest.mark.parametrize("model_type", ["ViT", "UViT"])
def test_grad_checkpointing_same_gradients(model_type: str) -> None:
    model = randomize_(build_generator(tiny_generator_config(model_type, dropout=0.0, attn_drop=0.0))).train()
    tokens, labels = _inputs(model.config)

    def grads():
        model.zero_grad()
        model.logits(tokens, labels).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


@pytest.mark.parametrize("model_type", ["ViT", "UViT"])
def test_bf16_autocast(model_type: str) -> None:
    model = build_generator(tiny_generator_config(model_type)).train()
    tokens, labels = _inputs(model.config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.logits(tokens, labels, torch.zeros(3, dtype=torch.bool))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    logits.float().mean().backward()


def test_bad_inputs_are_rejected() -> None:
    model = build_generator(tiny_generator_config())
    tokens, labels = _inputs(model.config)
    with pytest.raises(ValueError, match=r"\[0, 64\]"):
        model.logits(tokens + 100, labels)
    with pytest.raises(ValueError, match="labels"):
        model.logits(tokens, labels + 10)
    with pytest.raises(ValueError, match="K <= 8"):
        model.logits(torch.zeros(3, 9, dtype=torch.long), labels)
    with pytest.raises(ValueError, match="labels must be"):
        model.logits(tokens, labels[:2])
    with pytest.raises(TypeError):
        model.logits(tokens.float(), labels)

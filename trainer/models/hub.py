"""Checkpoint I/O in the authors' hub format, and conversion of their ``config.json``.

A model directory (local path or ``s3://`` prefix, or a HuggingFace hub id when online) holds
``config.json`` (the authors' nested config: ``model.vq_model``, ``model.generator``,
``dataset.preprocessing.crop_size``, plus our extension keys, docs/checkpoint_format.md §6) and
``model.safetensors`` or, in older releases, ``pytorch_model.bin``. Single weight files (the
authors' legacy ``tokenizer_titok_l32.bin`` ...) load too when given a config.

Foreign weights are read with safetensors or ``torch.load(weights_only=True)`` only. Models are
built on the meta device and the checkpoint tensors assigned, so loading allocates the weights once
and runs no random init.
"""

from __future__ import annotations

import io
import json
import os
import re
from typing import Any, Callable, Mapping, TypeVar, Union

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from cluster import storage
from trainer.models.config import (
    GeneratorConfig,
    PixelDecoderConfig,
    TiTokConfig,
    published_generator_config,
    published_tokenizer_config,
)
from trainer.models.generator import MaskedTokenGenerator, build_generator
from trainer.models.maskgit_vqgan import MaskGITVQGAN, pixel_config_from_state
from trainer.models.titok import TiTok

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# Buffers that older `transformers` releases saved with BERT models; not parameters of ours.
IGNORED_KEYS = ("model.embeddings.position_ids", "model.embeddings.token_type_ids")

C = TypeVar("C")
ConfigLike = Union[C, Mapping[str, Any], str, None]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

# ---------------------------------------------------------------------------------------------
# config.json <-> dataclasses

_VQ_FIELDS = ("num_latent_tokens", "codebook_size", "token_size", "use_l2_norm", "commitment_cost", "quantize_mode",
              "vit_enc_model_size", "vit_dec_model_size", "vit_enc_width", "vit_enc_num_layers", "vit_enc_num_heads",
              "vit_dec_width", "vit_dec_num_layers", "vit_dec_num_heads", "is_legacy", "finetune_decoder")
_EXTENSION_FIELDS = ("vit_enc_width", "vit_enc_num_layers", "vit_enc_num_heads",
                     "vit_dec_width", "vit_dec_num_layers", "vit_dec_num_heads")
_GENERATOR_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "dropout", "attn_drop", "class_label_dropout", "image_seq_len", "condition_num_classes")


def _root(d: Mapping[str, Any], what: str):
    if not isinstance(d, Mapping):
        raise ValueError(f"{what}: expected a JSON object, got {type(d).__name__}")
    try:
        return OmegaConf.create(dict(d))
    except OmegaConfBaseException as err:
        raise ValueError(f"{what}: {str(err).splitlines()[0]}") from None


def _section(root, path: str, what: str, required: bool = True) -> dict:
    """The section at ``path`` as a plain dict, its ``${...}`` interpolations resolved against the
    whole config (the authors' hub configs keep them unresolved); other sections are not touched."""
    node = OmegaConf.select(root, path, default=None, throw_on_missing=False)
    if node is None:
        if required:
            raise ValueError(f"{what}: missing section '{path}'")
        return {}
    if not OmegaConf.is_dict(node):
        raise ValueError(f"{what}: '{path}' must be an object, got {node!r}")
    try:
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ValueError(f"{what}: {path}: {str(err).splitlines()[0]}") from None


def _to_dataclass(schema: type[C], values: dict, what: str) -> C:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except ValueError:
        raise
    except OmegaConfBaseException as err:
        cause = err.__cause__ or err.__context__
        if isinstance(cause, ValueError):
            raise cause from None
        raise ValueError(f"{what}: {str(err).splitlines()[0]}") from None


def tokenizer_config_to_json(cfg: TiTokConfig) -> dict:
    """The authors' nested config for ``cfg``; explicit sizes and pixel decoder as extension keys."""
    vq: dict[str, Any] = {name: getattr(cfg, name) for name in _VQ_FIELDS
                          if not (name in _EXTENSION_FIELDS or name.endswith("model_size")) or getattr(cfg, name) is not None}
    vq["vit_enc_patch_size"] = vq["vit_dec_patch_size"] = cfg.patch_size
    if cfg.quantize_mode == "vae":
        vq["kl_weight"] = cfg.kl_weight
    vq["pixel_decoder"] = {"hidden_channels": cfg.pixel_decoder.hidden_channels,
                           "channel_mult": list(cfg.pixel_decoder.channel_mult),
                           "num_res_blocks": cfg.pixel_decoder.num_res_blocks,
                           "z_channels": cfg.pixel_decoder.z_channels,
                           "codebook_size": cfg.pixel_decoder.codebook_size}
    return {"model": {"vq_model": vq}, "dataset": {"preprocessing": {"crop_size": cfg.image_size}}}


def tokenizer_config_from_json(d: Mapping[str, Any]) -> TiTokConfig:
    """TiTokConfig of an authors'-format config dict (interpolations resolved, unknown keys ignored).

    Missing keys take the authors' defaults (``quantize_mode`` vq, ``is_legacy`` and
    ``finetune_decoder`` true); the encoder/decoder preset may be omitted when all three explicit
    sizes are given. Raises ValueError naming the key for anything invalid.
    """
    what = "tokenizer config.json"
    root = _root(d, what)
    vq = _section(root, "model.vq_model", what)
    values: dict[str, Any] = {name: vq[name] for name in _VQ_FIELDS if name in vq}
    values.setdefault("vit_enc_model_size", None)
    values.setdefault("vit_dec_model_size", None)
    if "kl_weight" in vq:
        values["kl_weight"] = vq["kl_weight"]
    enc_patch, dec_patch = vq.get("vit_enc_patch_size", 16), vq.get("vit_dec_patch_size", vq.get("vit_enc_patch_size", 16))
    if enc_patch != dec_patch:
        raise ValueError(f"{what}: model.vq_model.vit_enc_patch_size {enc_patch} != vit_dec_patch_size {dec_patch}; "
                         "different encoder and decoder patch sizes are not supported")
    values["patch_size"] = enc_patch
    if "pixel_decoder" in vq:
        values["pixel_decoder"] = _section(root, "model.vq_model.pixel_decoder", what)
    crop = _section(root, "dataset.preprocessing", what, required=False).get("crop_size")
    if crop is not None:
        values["image_size"] = crop
    return _to_dataclass(TiTokConfig, values, what)


def generator_config_to_json(cfg: GeneratorConfig) -> dict:
    """The authors' nested config: ``model.generator`` plus the codebook size in ``model.vq_model``."""
    return {"model": {"vq_model": {"codebook_size": cfg.codebook_size, "num_latent_tokens": cfg.image_seq_len},
                      "generator": {name: getattr(cfg, name) for name in _GENERATOR_FIELDS}}}


def generator_config_from_json(d: Mapping[str, Any]) -> GeneratorConfig:
    """GeneratorConfig of an authors'-format config dict (their generators read the codebook size
    from ``model.vq_model.codebook_size``; ``model_type`` defaults to "ViT"). Sampling keys are ignored."""
    what = "generator config.json"
    root = _root(d, what)
    gen = _section(root, "model.generator", what)
    vq = _section(root, "model.vq_model", what, required=False)
    values: dict[str, Any] = {name: gen[name] for name in _GENERATOR_FIELDS if name in gen}
    if "codebook_size" in vq:
        values["codebook_size"] = vq["codebook_size"]
    if "image_seq_len" not in values and "num_latent_tokens" in vq:
        values["image_seq_len"] = vq["num_latent_tokens"]
    return _to_dataclass(GeneratorConfig, values, what)


# ---------------------------------------------------------------------------------------------
# Weight files


def _is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.fullmatch(source)) and not os.path.exists(source) and not source.startswith((".", "/"))


def load_state_dict_file(url: str) -> dict[str, torch.Tensor]:
    """Tensors of one weight file: ``.safetensors``, or a pickled state dict read with
    ``torch.load(weights_only=True)``; local path, ``s3://`` URL or http(s) URL (cached by torch.hub)."""
    if url.startswith(("http://", "https://")):
        state = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True, progress=False)
    elif url.endswith(".safetensors"):
        from safetensors.torch import load, load_file

        try:
            state = load(storage.read_bytes(url)) if storage.is_remote(url) else load_file(url)
        except FileNotFoundError:
            raise storage.StorageError(f"cannot read {url}: no such file or object") from None
    else:
        source = io.BytesIO(storage.read_bytes(url)) if storage.is_remote(url) else url
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise storage.StorageError(f"cannot read {url}: no such file or object") from None
    # Some releases wrap the weights ({"state_dict": ...} / {"model": ...}).
    if isinstance(state, dict) and len(state) == 1 and next(iter(state)) in ("state_dict", "model"):
        state = next(iter(state.values()))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{url}: expected a state dict of tensors")
    return state


def _model_files(source: str) -> tuple[dict | None, str]:
    """(config dict or None, weights URL/path) of a model directory, hub id or single weight file."""
    if source.startswith(("http://", "https://")):
        return None, source
    if storage.is_remote(source) or os.path.isdir(source):
        config_url = storage.join(source, CONFIG_NAME)
        for name in (SAFETENSORS_NAME, BIN_NAME):
            weights = storage.join(source, name)
            if storage.exists(weights):
                config = json.loads(storage.read_text(config_url)) if storage.exists(config_url) else None
                return config, weights
        if storage.is_remote(source) and source.endswith(WEIGHT_SUFFIXES) and storage.exists(source):
            return None, source
        raise FileNotFoundError(f"{source}: no {SAFETENSORS_NAME} or {BIN_NAME} in this directory")
    if os.path.isfile(source):
        return None, source
    if _is_hub_id(source):
        return _hub_files(source)
    raise FileNotFoundError(f"{source}: no such directory, weight file, s3:// prefix or hub id")


def _hub_files(repo_id: str) -> tuple[dict, str]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        config_path = hf_hub_download(repo_id, CONFIG_NAME)
        try:
            weights = hf_hub_download(repo_id, SAFETENSORS_NAME)
        except EntryNotFoundError:
            weights = hf_hub_download(repo_id, BIN_NAME)
    except Exception as err:  # offline, unknown repo, auth: say which source failed and why
        raise FileNotFoundError(f"{repo_id}: not a local path, and the HuggingFace hub download failed "
                                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    with open(config_path) as f:
        return json.load(f), weights


def _config(given: Any, found: dict | None, schema: type, from_json: Callable, published: Callable, source: str):
    if isinstance(given, schema):
        return given
    if isinstance(given, str):
        return published(given)
    if isinstance(given, Mapping):
        return from_json(given)
    if given is not None:
        raise TypeError(f"config must be a {schema.__name__}, an authors'-format dict or a published model name")
    if found is None:
        raise ValueError(f"{source}: no {CONFIG_NAME} found; pass config= (a {schema.__name__}, the authors' "
                         "config dict, or a published name such as 'titok_l32')")
    return from_json(found)


M = TypeVar("M", bound=nn.Module)


def _load_into(build: Callable[[], M], state: dict[str, torch.Tensor], source: str) -> M:
    """Build on the meta device and assign the checkpoint's tensors (as fp32), strictly."""
    with torch.device("meta"):
        model = build()
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items() if k not in IGNORED_KEYS}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        found = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        parts = [f"{label} ({len(items)}): {items[:4]}{' ...' if len(items) > 4 else ''}" for label, items in found if items]
        raise ValueError(f"{source}: weights do not fit the configured architecture; " + "; ".join(parts))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def load_tokenizer(source: str, config: ConfigLike[TiTokConfig] = None) -> TiTok:
    """A TiTok from a model directory (local, ``s3://``), a hub id, or a single weight file.

    ``config`` overrides/provides the architecture (needed for single files): a TiTokConfig, the
    authors' config dict, or a published name (``titok_l32`` | ``titok_b64`` | ``titok_s128``).
    Returned in eval mode on the CPU.
    """
    found, weights = _model_files(str(source))
    cfg = _config(config, found, TiTokConfig, tokenizer_config_from_json, published_tokenizer_config, source)
    return _load_into(lambda: TiTok(cfg), load_state_dict_file(weights), str(source))


def load_generator(source: str, config: ConfigLike[GeneratorConfig] = None) -> MaskedTokenGenerator:
    """A generator (BERT-style or U-ViT, from ``model_type``) from a directory, hub id or weight file;
    ``config`` as for :func:`load_tokenizer`. Returned in eval mode on the CPU."""
    found, weights = _model_files(str(source))
    cfg = _config(config, found, GeneratorConfig, generator_config_from_json, published_generator_config, source)
    return _load_into(lambda: build_generator(cfg), load_state_dict_file(weights), str(source))


def load_maskgit_vqgan(source: str, config: PixelDecoderConfig | None = None) -> MaskGITVQGAN:
    """The MaskGIT-VQGAN teacher from a weight file (path, ``s3://`` or http(s) URL, e.g. the authors'
    ``maskgit-vqgan-imagenet-f16-256.bin``), frozen and in eval mode. Without ``config`` the
    geometry is read from the weights' shapes."""
    state = load_state_dict_file(str(source))
    cfg = config or pixel_config_from_state(state)
    return _load_into(lambda: MaskGITVQGAN(cfg), state, str(source)).requires_grad_(False)


def save_pretrained(model: nn.Module, directory: str, safe_serialization: bool = True) -> None:
    """Write ``config.json`` + ``model.safetensors`` (or ``pytorch_model.bin``) to a local or ``s3://``
    directory, in the layout :func:`load_tokenizer` / :func:`load_generator` and the authors' code read."""
    cfg = getattr(model, "config", None)
    if isinstance(cfg, TiTokConfig):
        config_json = tokenizer_config_to_json(cfg)
    elif isinstance(cfg, GeneratorConfig):
        config_json = generator_config_to_json(cfg)
    else:
        raise TypeError(f"save_pretrained takes a TiTok or a generator, got {type(model).__name__}")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    directory = str(directory)
    if not storage.is_remote(directory):
        os.makedirs(directory, exist_ok=True)
    if safe_serialization:
        from safetensors.torch import save

        storage.write_bytes(storage.join(directory, SAFETENSORS_NAME), save(state, metadata={"format": "pt"}))
    else:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        storage.write_bytes(storage.join(directory, BIN_NAME), buffer.getvalue())
    # The config last: a directory with a config.json has its weights.
    storage.write_text(storage.join(directory, CONFIG_NAME), json.dumps(config_json, indent=2))

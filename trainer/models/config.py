"""Architecture configs of the models, as plain dataclasses.

They are the `model:` section of the training configs (OmegaConf structured configs embed them
directly) and the in-memory form of a checkpoint's `config.json`. Only primitive fields, lists and
nested dataclasses, so OmegaConf can validate them and they pickle to Ray workers.

Official sizes are presets named as in the authors' configs (`small`/`base`/`large`); the explicit
`vit_enc_*` / `vit_dec_*` fields override a preset (docs/checkpoint_format.md §6).

Every config checks itself when constructed (``__post_init__``), so a bad size fails with a
:class:`ConfigError` naming the key before any model is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional

from trainer.config import ConfigError

# width, layers, heads of the authors' ViT presets (MLP ratio is always 4).
VIT_PRESETS: dict[str, tuple[int, int, int]] = {
    "small": (512, 8, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}

QUANTIZE_MODES = ("vq", "vae")
GENERATOR_TYPES = ("ViT", "UViT")


class ViTSize(NamedTuple):
    width: int
    num_layers: int
    num_heads: int


def _choices(values) -> str:
    return ", ".join(str(v) for v in values)


@dataclass
class PixelDecoderConfig:
    """MaskGIT-VQGAN conv decoder (and, for the teacher, encoder) geometry."""

    hidden_channels: int = 128
    channel_mult: List[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    z_channels: int = 256
    # Entries of the MaskGIT-VQGAN ("proxy") codebook; the TiTok decoder predicts logits over them.
    codebook_size: int = 1024

    def __post_init__(self) -> None:
        prefix = "model.pixel_decoder"
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ConfigError(f"{prefix}.channel_mult", f"needs one or more positive entries, got {list(self.channel_mult)}")
        for name in ("hidden_channels", "num_res_blocks", "z_channels", "codebook_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}", f"must be >= 1, got {getattr(self, name)}")
        # GroupNorm(32 groups) runs on every level's channels.
        bad = [self.hidden_channels * m for m in self.channel_mult if (self.hidden_channels * m) % 32]
        if bad:
            raise ConfigError(f"{prefix}.hidden_channels",
                              f"hidden_channels * channel_mult must be divisible by 32 (GroupNorm groups); got {bad}")

    @property
    def downsample_factor(self) -> int:
        """Pixels per code cell along a side: one x2 step between consecutive levels."""
        return 2 ** (len(self.channel_mult) - 1)


def _vit_size(cfg: object, side: str) -> ViTSize:
    preset_name = getattr(cfg, f"vit_{side}_model_size")
    explicit = [getattr(cfg, f"vit_{side}_{n}") for n in ("width", "num_layers", "num_heads")]
    if preset_name is None:
        if any(v is None for v in explicit):
            raise ConfigError(f"model.vit_{side}_model_size",
                              f"is null, so vit_{side}_width, vit_{side}_num_layers and vit_{side}_num_heads "
                              f"must all be set; valid presets: {_choices(VIT_PRESETS)}")
        preset = (0, 0, 0)
    elif preset_name not in VIT_PRESETS:
        raise ConfigError(f"model.vit_{side}_model_size",
                          f"{preset_name!r} is not a valid choice; valid: {_choices(VIT_PRESETS)}")
    else:
        preset = VIT_PRESETS[preset_name]
    return ViTSize(*(p if v is None else v for p, v in zip(preset, explicit)))


@dataclass
class TiTokConfig:
    """TiTok 1-D tokenizer: ViT encoder -> K latent tokens -> quantizer -> ViT decoder (-> pixels)."""

    image_size: int = 256
    patch_size: int = 16
    num_latent_tokens: int = 32
    codebook_size: int = 4096
    token_size: int = 12
    use_l2_norm: bool = True
    commitment_cost: float = 0.25
    # "vq" (discrete tokens) or "vae" (continuous tokens, diagonal Gaussian).
    quantize_mode: str = "vq"
    # Weight of the KL term in `quantizer_loss` when quantize_mode="vae" (the authors' default).
    kl_weight: float = 1e-6
    # Preset names ("small" | "base" | "large"); explicit sizes below override them.
    vit_enc_model_size: Optional[str] = "large"
    vit_dec_model_size: Optional[str] = "large"
    vit_enc_width: Optional[int] = None
    vit_enc_num_layers: Optional[int] = None
    vit_enc_num_heads: Optional[int] = None
    vit_dec_width: Optional[int] = None
    vit_dec_num_layers: Optional[int] = None
    vit_dec_num_heads: Optional[int] = None
    # The authors' released models use the legacy raw reshape before the encoder's conv_out and a
    # decoder head over the 1024 proxy codes; False: a proper permute and a decoder that predicts
    # pixels directly (their later single-stage VQ/VAE releases).
    is_legacy: bool = True
    # True: the model carries the MaskGIT-VQGAN pixel decoder and decodes to pixels (stage 2 and
    # the published checkpoints). False: stage-1 model whose decoder only predicts proxy-code logits.
    finetune_decoder: bool = True
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)

    def __post_init__(self) -> None:
        if self.quantize_mode not in QUANTIZE_MODES:
            raise ConfigError("model.quantize_mode",
                              f"{self.quantize_mode!r} is not a valid choice; valid: {_choices(QUANTIZE_MODES)}")
        for name in ("image_size", "patch_size", "num_latent_tokens", "codebook_size", "token_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ConfigError("model.patch_size", f"{self.patch_size} does not divide image_size {self.image_size}")
        for side in ("enc", "dec"):
            size = _vit_size(self, side)
            if min(size) < 1 or size.width % size.num_heads:
                raise ConfigError(f"model.vit_{side}_num_heads",
                                  f"width {size.width}, layers {size.num_layers}, heads {size.num_heads}: all must "
                                  "be >= 1 and heads must divide width")
        if self.finetune_decoder:
            if self.quantize_mode != "vq" or not self.is_legacy:
                raise ConfigError("model.finetune_decoder",
                                  "the MaskGIT-VQGAN pixel decoder needs quantize_mode=vq and is_legacy=true "
                                  "(the decoder predicts proxy-code logits)")
        if self.is_legacy and self.patch_size != self.pixel_decoder.downsample_factor:
            # Proxy codes come from the MaskGIT-VQGAN grid, so the TiTok decoder grid must equal it.
            raise ConfigError("model.patch_size",
                              f"{self.patch_size} must equal the MaskGIT-VQGAN downsampling factor "
                              f"{self.pixel_decoder.downsample_factor} (2**(len(pixel_decoder.channel_mult)-1)) "
                              "when is_legacy=true: the decoder predicts one proxy code per patch")

    @property
    def encoder_size(self) -> ViTSize:
        """Width, layers and heads of the encoder: the preset overridden by explicit keys."""
        return _vit_size(self, "enc")

    @property
    def decoder_size(self) -> ViTSize:
        return _vit_size(self, "dec")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class GeneratorConfig:
    """Masked-token generator over TiTok tokens (the authors' ImageBert "ViT" or UViTBert "UViT").

    ``dropout``/``attn_drop`` act in the BERT-style "ViT" model only: the authors' U-ViT blocks
    ignore them, and so do ours (their S-128 generator trained without dropout).
    """

    model_type: str = "ViT"
    hidden_size: int = 768
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 3072
    dropout: float = 0.1
    attn_drop: float = 0.1
    class_label_dropout: float = 0.1
    image_seq_len: int = 32
    condition_num_classes: int = 1000
    codebook_size: int = 4096

    def __post_init__(self) -> None:
        if self.model_type not in GENERATOR_TYPES:
            raise ConfigError("model.model_type",
                              f"{self.model_type!r} is not a valid choice; valid: {_choices(GENERATOR_TYPES)}")
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "image_seq_len", "condition_num_classes", "codebook_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("model.num_attention_heads",
                              f"{self.num_attention_heads} does not divide hidden_size {self.hidden_size}")
        for name in ("dropout", "attn_drop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name}", f"must be in [0, 1), got {getattr(self, name)}")
        # 1.0 drops every label: an unconditional model (the GAN-test's label-ignoring control).
        if not 0.0 <= self.class_label_dropout <= 1.0:
            raise ConfigError("model.class_label_dropout", f"must be in [0, 1], got {self.class_label_dropout}")

    # Token space shared with the authors' checkpoints (docs/checkpoint_format.md §4).
    @property
    def mask_token_id(self) -> int:
        return self.codebook_size

    @property
    def null_class_id(self) -> int:
        """Token of the dropped ("unconditional") class used for classifier-free guidance."""
        return self.codebook_size + self.condition_num_classes + 1

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.condition_num_classes + 2


# The published TiTok models (docs/checkpoint_format.md §1), for the authors' legacy
# single-file checkpoints that come without a config.json.
_PUBLISHED = {
    "titok_l32": ("large", 32, dict(model_type="ViT", hidden_size=768, num_hidden_layers=24, num_attention_heads=16,
                                     intermediate_size=3072)),
    "titok_b64": ("base", 64, dict(model_type="ViT", hidden_size=768, num_hidden_layers=24, num_attention_heads=16,
                                    intermediate_size=3072)),
    "titok_s128": ("small", 128, dict(model_type="UViT", hidden_size=1024, num_hidden_layers=20,
                                      num_attention_heads=16, intermediate_size=4096)),
}
PUBLISHED_MODELS: tuple[str, ...] = tuple(_PUBLISHED)


def _published(name: str) -> tuple:
    if name not in _PUBLISHED:
        raise ValueError(f"unknown published model {name!r}; valid: {_choices(_PUBLISHED)}")
    return _PUBLISHED[name]


def published_tokenizer_config(name: str) -> TiTokConfig:
    """Architecture of a published tokenizer (``titok_l32`` | ``titok_b64`` | ``titok_s128``)."""
    preset, tokens, _ = _published(name)
    return TiTokConfig(num_latent_tokens=tokens, vit_enc_model_size=preset, vit_dec_model_size=preset)


def published_generator_config(name: str) -> GeneratorConfig:
    """Architecture of a published generator (``titok_l32`` | ``titok_b64`` | ``titok_s128``)."""
    _, tokens, sizes = _published(name)
    return GeneratorConfig(image_seq_len=tokens, **sizes)

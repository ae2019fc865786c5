"""Architecture configs of the models, as plain dataclasses.

They are the `model:` section of the training configs (OmegaConf structured configs embed them
directly) and the in-memory form of a checkpoint's `config.json`. Only primitive fields, lists and
nested dataclasses, so OmegaConf can validate them and they pickle to Ray workers.

Official sizes are presets named as in the authors' configs (`small`/`base`/`large`); the explicit
`vit_enc_*` / `vit_dec_*` fields override a preset (see ../shared/spec/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

# width, layers, heads of the authors' ViT presets (MLP ratio is always 4).
VIT_PRESETS: dict[str, tuple[int, int, int]] = {
    "small": (512, 8, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


@dataclass
class PixelDecoderConfig:
    """MaskGIT-VQGAN conv decoder (and, for the teacher, encoder) geometry."""

    hidden_channels: int = 128
    channel_mult: List[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    z_channels: int = 256
    # Entries of the MaskGIT-VQGAN ("proxy") codebook; the TiTok decoder predicts logits over them.
    codebook_size: int = 1024


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
    # Preset names ("small" | "base" | "large"); explicit sizes below override them.
    vit_enc_model_size: Optional[str] = "large"
    vit_dec_model_size: Optional[str] = "large"
    vit_enc_width: Optional[int] = None
    vit_enc_num_layers: Optional[int] = None
    vit_enc_num_heads: Optional[int] = None
    vit_dec_width: Optional[int] = None
    vit_dec_num_layers: Optional[int] = None
    vit_dec_num_heads: Optional[int] = None
    # The authors' released models use the legacy raw reshape before the encoder's conv_out.
    is_legacy: bool = True
    # True: the model carries the MaskGIT-VQGAN pixel decoder and decodes to pixels (stage 2 and
    # the published checkpoints). False: stage-1 model whose decoder only predicts proxy-code logits.
    finetune_decoder: bool = True
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)


@dataclass
class GeneratorConfig:
    """Masked-token generator over TiTok tokens (the authors' ImageBert "ViT" or UViTBert "UViT")."""

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

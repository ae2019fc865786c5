"""TiTok models as plain ``torch.nn`` modules, and loading/saving in the authors' published format.

Build from a config (``build_tokenizer``, ``build_generator``, ``build_maskgit_vqgan``; under
``torch.device("meta")`` nothing is allocated), or load a checkpoint (``load_tokenizer``,
``load_generator``: a local or ``s3://`` directory with ``config.json`` + ``model.safetensors`` /
``pytorch_model.bin``, a hub id, or a single weight file plus ``config=``; ``load_maskgit_vqgan``:
the MaskGIT-VQGAN teacher's weight file). ``save_pretrained`` writes the same format.
"""

from trainer.models.blocks import maybe_compile
from trainer.models.config import (
    PUBLISHED_MODELS,
    VIT_PRESETS,
    GeneratorConfig,
    PixelDecoderConfig,
    TiTokConfig,
    published_generator_config,
    published_tokenizer_config,
)
from trainer.models.generator import BertGenerator, MaskedTokenGenerator, UViTGenerator, build_generator
from trainer.models.hub import (
    generator_config_from_json,
    generator_config_to_json,
    load_generator,
    load_maskgit_vqgan,
    load_state_dict_file,
    load_tokenizer,
    save_pretrained,
    tokenizer_config_from_json,
    tokenizer_config_to_json,
)
from trainer.models.maskgit_vqgan import MaskGITVQGAN, build_maskgit_vqgan
from trainer.models.quantizer import codebook_usage, codebook_usage_from_counts
from trainer.models.titok import TiTok, build_tokenizer

__all__ = [
    "PUBLISHED_MODELS", "VIT_PRESETS", "BertGenerator", "GeneratorConfig", "MaskGITVQGAN", "MaskedTokenGenerator",
    "PixelDecoderConfig", "TiTok", "TiTokConfig", "UViTGenerator", "build_generator", "build_maskgit_vqgan",
    "build_tokenizer", "codebook_usage", "codebook_usage_from_counts", "generator_config_from_json",
    "generator_config_to_json", "load_generator", "load_maskgit_vqgan", "load_state_dict_file", "load_tokenizer",
    "maybe_compile", "published_generator_config", "published_tokenizer_config", "save_pretrained",
    "tokenizer_config_from_json", "tokenizer_config_to_json",
]

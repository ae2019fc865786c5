"""What ``trainer/run.py`` checks before it opens an MLflow run, starts Ray or loads any weights.

A training run reads its data shards and, depending on the stage and recipe, a teacher, an export
to start from, a tokenizer for preview grids, and perceptual-loss backbones; it writes under
``output_dir``. Each of these is checked here for what costs nothing (see :mod:`cluster.preflight`),
so that a typo in a path is one line naming the key, exit code 2, within seconds, instead of an
error from a Ray worker minutes later.
"""

from __future__ import annotations

from cluster import preflight
from cluster.preflight import BadInput
from trainer.schema import GeneratorTrainConfig, Stage, TokenizerRecipe, TokenizerTrainConfig, TrainConfigBase


def _require_shards(key: str, shards: str | None) -> None:
    from cluster import storage
    from trainer.data import expand_shard_urls

    if not shards:
        raise BadInput(key, f"is required (set {key}=...)")
    try:
        expand_shard_urls(shards)
    except (FileNotFoundError, ValueError) as err:
        raise BadInput(key, str(err)) from None
    except storage.StorageError as err:
        raise BadInput(key, str(err)) from None


def _require_token_shards(key: str, root: str | None) -> None:
    from cluster import storage
    from trainer.token_data import TOKEN_SHARD_PREFIX, token_shard_urls

    if not root:
        raise BadInput(key, f"is required (set {key}=<folder written by data_prep/pretokenize.py>)")
    try:
        found = token_shard_urls(root)
    except storage.StorageError as err:
        raise BadInput(key, str(err)) from None
    if not found:
        raise BadInput(key, f"no token shards ({TOKEN_SHARD_PREFIX}*.parquet) under {root}; "
                            "run data_prep/pretokenize.py first")


def _check_tokenizer_inputs(cfg: TokenizerTrainConfig) -> None:
    _require_shards("data.train_shards", cfg.data.train_shards)
    recipe = cfg.tokenizer.recipe
    preflight.require_model("tokenizer.init_from", cfg.tokenizer.init_from)
    if recipe == TokenizerRecipe.proxy_codes and not cfg.tokenizer.teacher_weights:
        raise BadInput("tokenizer.teacher_weights", "is required for tokenizer.recipe=proxy_codes "
                                                    "(MaskGIT-VQGAN weights: a path or URL)")
    if recipe == TokenizerRecipe.decoder_finetune and not (cfg.tokenizer.teacher_weights or cfg.tokenizer.init_from):
        raise BadInput("tokenizer.teacher_weights", "is required for tokenizer.recipe=decoder_finetune unless "
                                                    "tokenizer.init_from names an export with a pixel decoder")
    preflight.require_file("tokenizer.teacher_weights", cfg.tokenizer.teacher_weights, "weight file")
    if recipe != TokenizerRecipe.proxy_codes:
        losses = cfg.tokenizer.losses
        perceptual = losses.perceptual
        if losses.perceptual_weight > 0:
            if perceptual.lpips_weight > 0:
                preflight.require_file("tokenizer.losses.perceptual.vgg16_weights", perceptual.vgg16_weights,
                                       "weight file")
                preflight.require_file("tokenizer.losses.perceptual.lpips_linear_weights",
                                       perceptual.lpips_linear_weights, "weight file")
            if perceptual.convnext_weight > 0:
                preflight.require_file("tokenizer.losses.perceptual.convnext_weights", perceptual.convnext_weights,
                                       "weight file")


def _require_matching_tokens(cfg: GeneratorTrainConfig) -> None:
    """The token shards' manifest names their tokens per image and codebook (data_prep/pretokenize.py):
    a model of another shape would fail in a worker minutes later, so say it now."""
    from cluster import storage
    from trainer.token_data import MANIFEST, read_metadata

    root = cfg.data.train_shards
    try:
        if not storage.exists(storage.join(root, MANIFEST)):  # type: ignore[arg-type]
            return  # token shards without their manifest: the worker checks the tokens themselves
        meta = read_metadata(root)  # type: ignore[arg-type]
    except (storage.StorageError, OSError, ValueError) as err:
        raise BadInput("data.train_shards", f"cannot read {MANIFEST} under {root}: {err}") from None
    tokens, codebook = meta.get("num_tokens"), meta.get("codebook_size")
    if tokens is not None and tokens != cfg.model.image_seq_len:
        raise BadInput("model.image_seq_len", f"is {cfg.model.image_seq_len}, but the token shards under {root} hold "
                                              f"{tokens} tokens per image; set model.image_seq_len={tokens}")
    if codebook is not None and codebook > cfg.model.codebook_size:
        raise BadInput("model.codebook_size", f"is {cfg.model.codebook_size}, but the token shards under {root} come "
                                              f"from a {codebook}-entry codebook; set model.codebook_size={codebook}")


def _check_generator_inputs(cfg: GeneratorTrainConfig) -> None:
    _require_token_shards("data.train_shards", cfg.data.train_shards)
    _require_matching_tokens(cfg)
    preflight.require_model("generator.tokenizer", cfg.generator.tokenizer)
    preflight.require_model("generator.init_from", cfg.generator.init_from)


def check_training(cfg: TrainConfigBase) -> None:
    """Raise :class:`~cluster.preflight.BadInput` for a missing input or an output that cannot be
    written. Reads only listings and existence (local or S3); loads no weights, starts nothing."""
    if cfg.data.val_shards:
        _require_shards("data.val_shards", cfg.data.val_shards)
    if cfg.stage == Stage.tokenizer:
        _check_tokenizer_inputs(cfg)  # type: ignore[arg-type]
    else:
        _check_generator_inputs(cfg)  # type: ignore[arg-type]
    preflight.require_writable("output_dir", cfg.run_dir)
    if cfg.mlflow.enabled:
        preflight.require_local_tracking("mlflow.tracking_uri", cfg.mlflow.tracking_uri)


__all__ = ["check_training"]

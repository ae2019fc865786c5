"""What ``evals/run.py`` checks before it loads Inception weights, starts Ray or contacts MLflow, and
the image size an evaluation takes from its checkpoint.

Every kind reads images (folders, shards, ``.npz``) and maybe exports; each named input is checked
for existence (:mod:`cluster.preflight`), so ``eval.input1=/nonexistent`` is one line naming the key
within seconds, not a failed weight download or a Ray task error. ``eval.image_size`` left null is
the checkpoint's own size (the tokenizer's, for a generator the tokenizer that decodes its tokens),
as ``data_prep/pretokenize.py`` takes the tokenizer's size; ``folders`` has no checkpoint and reads
shards at :data:`FOLDERS_IMAGE_SIZE`.
"""

from __future__ import annotations

import dataclasses
import json

from cluster import preflight, storage
from cluster.preflight import BadInput
from evals.schema import EvalConfig, EvalKind

FOLDERS_IMAGE_SIZE = 256   # the published models' size; the size ADM's reference batches were made at


def _is_pattern(url: str) -> bool:
    return "*" in url or "{" in url


def require_images(key: str, url: str | None) -> None:
    """A folder of images, shards (a folder, a glob or a brace pattern) or an ``.npz``, local or ``s3://``."""
    from trainer.data import expand_shard_urls

    if not url:
        return
    if _is_pattern(url):
        try:
            expand_shard_urls(url)
        except (FileNotFoundError, ValueError, storage.StorageError) as err:
            raise BadInput(key, str(err)) from None
    elif not preflight.path_exists(key, url):
        raise BadInput(key, f"{url}: no such folder or file")


def export_config(key: str, url: str) -> dict:
    """The ``config.json`` of an export directory (read once, small)."""
    preflight.require_export(key, url)
    try:
        return json.loads(storage.read_text(storage.join(url, "config.json")))
    except (storage.StorageError, ValueError) as err:
        raise BadInput(key, f"{url}: unreadable config.json ({err})") from None


def generator_tokenizer(cfg: EvalConfig, checkpoint: str) -> str | None:
    """``eval.tokenizer``, else the tokenizer the generator's run trained on (None if unknown)."""
    from trainer.sample import run_tokenizer

    return cfg.eval.tokenizer or run_tokenizer(checkpoint)


def tokenizer_image_size(key: str, tokenizer: str) -> int | None:
    """The image side a tokenizer export takes (None for a source without a config.json here)."""
    from trainer.models import tokenizer_config_from_json

    if not (storage.is_remote(tokenizer) or preflight.path_exists(key, tokenizer)):
        return None  # a hub id: its config comes with the download
    if not storage.exists(storage.join(tokenizer, "config.json")):
        return None
    try:
        return tokenizer_config_from_json(export_config(key, tokenizer)).image_size
    except ValueError as err:
        raise BadInput(key, f"{tokenizer} is not a tokenizer export: {err}") from None


def check_inputs(cfg: EvalConfig) -> None:
    """Raise :class:`~cluster.preflight.BadInput` for an input that does not exist or an output that
    cannot be written; reads only listings, existence and small config files."""
    e = cfg.eval
    if getattr(e, "fid", True):
        preflight.require_file("eval.inception_weights", e.inception_weights, "weight file")
    if e.kind == EvalKind.folders:
        require_images("eval.input1", e.input1)
        require_images("eval.input2", e.input2)
    else:
        if e.checkpoint:
            preflight.require_export("eval.checkpoint", e.checkpoint)
        elif not e.watch:
            preflight.require_path("output_dir", cfg.output_dir, "run directory")
        require_images("eval.data", e.data)
        require_images("eval.reference", e.reference)
        if e.kind == EvalKind.generation:
            preflight.require_model("eval.tokenizer", e.tokenizer)
            if e.checkpoint and not e.tokenizer:  # the tokenizer the generator's run trained on
                preflight.require_model("eval.tokenizer", generator_tokenizer(cfg, e.checkpoint))
    gan_data = getattr(getattr(e, "gan_test", None), "data", None)
    if gan_data:
        preflight.require_path("eval.gan_test.data", gan_data, "shard folder")
    preflight.require_writable("eval.stats_cache", e.stats_cache)
    preflight.require_local_tracking("mlflow.tracking_uri", cfg.mlflow.tracking_uri)


def with_image_size(cfg: EvalConfig, checkpoint: str | None = None) -> EvalConfig:
    """``cfg`` with ``eval.image_size`` filled in when it is null: the checkpoint's tokenizer's size
    (reconstruction: the checkpoint itself; generation: its tokenizer), :data:`FOLDERS_IMAGE_SIZE`
    for folders. A given size is kept (a mismatch with the tokenizer is reported where it matters)."""
    e = cfg.eval
    if e.image_size is not None:
        return cfg
    size = None
    if e.kind == EvalKind.reconstruction and checkpoint:
        size = tokenizer_image_size("eval.checkpoint", checkpoint)
    elif e.kind == EvalKind.generation and checkpoint:
        tokenizer = generator_tokenizer(cfg, checkpoint)
        size = tokenizer_image_size("eval.tokenizer", tokenizer) if tokenizer else None
    size = size or FOLDERS_IMAGE_SIZE
    return dataclasses.replace(cfg, eval=dataclasses.replace(e, image_size=size))


__all__ = ["FOLDERS_IMAGE_SIZE", "check_inputs", "with_image_size", "require_images", "export_config",
           "tokenizer_image_size"]

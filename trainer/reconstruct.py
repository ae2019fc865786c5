"""Reconstruct a folder of images with a TiTok tokenizer: tokens, reconstructions, a side-by-side grid.

    python -m trainer.reconstruct checkpoint=<dir|hub id> images=<folder> output=<folder>

``checkpoint`` is a tokenizer export (``config.json`` + weights; local, ``s3://`` or a hub id),
``images`` a folder of image files (local or ``s3://``, not recursive). Each image is resized
(shorter side, bicubic) and center-cropped to the model's size. Written to ``output``:
``<name>.png`` per image, ``grid.png`` (inputs left, reconstructions right, first ``grid_images``
images) and ``tokens.jsonl`` (one ``{"image", "tokens"}`` line per image); the tokens are also
printed. ``--help`` prints every setting.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING

from trainer.config import EXIT_CONFIG_ERROR, ConfigError, load_config

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")


@dataclass
class ReconstructConfig:
    experiment: Optional[str] = None
    checkpoint: str = MISSING       # tokenizer export dir (local / s3://) or hub id
    images: str = MISSING           # folder of images (local / s3://)
    output: str = MISSING           # folder for reconstructions, grid.png, tokens.jsonl (local / s3://)
    batch_size: int = 8
    max_images: Optional[int] = None  # null: every image in the folder
    grid_images: int = 16            # rows of the side-by-side grid
    device: str = "auto"             # auto | cpu | cuda
    precision: str = "fp32"          # fp32 | bf16 (autocast)
    print_tokens: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.grid_images < 0 or (self.max_images is not None and self.max_images < 1):
            raise ConfigError("batch_size", "batch_size >= 1, grid_images >= 0 and max_images >= 1 (or null) required")
        if self.device not in DEVICES:
            raise ConfigError("device", f"{self.device!r} is not a valid choice; valid: {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError("precision", f"{self.precision!r} is not a valid choice; valid: {', '.join(PRECISIONS)}")


def list_images(folder: str) -> list[str]:
    """Image files directly in a local folder or ``s3://`` prefix, sorted by name."""
    from cluster import storage

    if storage.is_remote(folder):
        prefix = folder.rstrip("/")
        found = [f.url for f in storage.list_files(prefix) if f.url.rsplit("/", 1)[0] == prefix]
    elif os.path.isdir(folder):
        found = [os.path.join(folder, name) for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name))]
    else:
        raise FileNotFoundError(f"images={folder}: no such folder")
    return sorted(f for f in found if f.lower().endswith(IMAGE_EXTENSIONS))


def _load_image(url: str, size: int):
    """(uint8 HWC center crop, None) or (None, reason) for a file that is not a readable image."""
    from PIL import UnidentifiedImageError

    from cluster import storage
    from trainer.data import center_crop, decode_resized

    try:
        return center_crop(decode_resized(storage.read_bytes(url), size, draft=False), size), None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        return None, f"{type(err).__name__}: {err}"


def _stem(url: str) -> str:
    return os.path.splitext(url.rstrip("/").rsplit("/", 1)[-1])[0]


def reconstruct_folder(cfg: ReconstructConfig) -> dict:
    """Run the reconstruction; returns a summary (counts, skipped files, output URLs)."""
    import numpy as np
    import torch

    from cluster import storage
    from trainer.data import to_float_images
    from trainer.models import load_tokenizer
    from trainer.tracking import image_grid, to_uint8_images, write_png

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is visible")
    urls = list_images(cfg.images)
    if not urls:
        raise FileNotFoundError(f"images={cfg.images}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    urls = urls[:cfg.max_images] if cfg.max_images else urls
    model = load_tokenizer(cfg.checkpoint).to(device)
    if not model.outputs_pixels:
        raise ValueError(f"checkpoint={cfg.checkpoint} is a stage-1 tokenizer (finetune_decoder=false): it predicts "
                         "proxy codes, not pixels; reconstruct with a stage-2 or published tokenizer")
    size = model.config.image_size
    if not storage.is_remote(cfg.output):
        os.makedirs(cfg.output, exist_ok=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    token_lines, skipped, grid_inputs, grid_outputs, done = [], [], [], [], 0
    used_names: set[str] = set()
    for start in range(0, len(urls), cfg.batch_size):
        loaded = [(url, *_load_image(url, size)) for url in urls[start:start + cfg.batch_size]]
        skipped += [{"image": url, "reason": reason} for url, _, reason in loaded if reason]
        batch = [(url, pixels) for url, pixels, reason in loaded if not reason]
        if not batch:
            continue
        images = to_float_images(torch.from_numpy(np.stack([p for _, p in batch]))).to(device)
        with torch.no_grad(), autocast:
            tokens = model.encode(images)
            recon = model.decode_tokens(tokens)
        recon_uint8 = to_uint8_images(recon)
        for (url, pixels), ids, out in zip(batch, tokens.cpu(), recon_uint8):
            name = _stem(url)
            if name in used_names:  # a.jpg and a.png: keep both, named after the full file name
                name = os.path.basename(url)
            used_names.add(name)
            write_png(storage.join(cfg.output, f"{name}.png"), out)
            line = {"image": os.path.basename(url), "tokens": ids.flatten().tolist()}
            token_lines.append(json.dumps(line))
            if cfg.print_tokens:
                print(f"{line['image']}: {' '.join(map(str, line['tokens']))}")
            if len(grid_inputs) < cfg.grid_images:
                grid_inputs.append(pixels)
                grid_outputs.append(out)
            done += 1
    if not done:
        raise ValueError(f"images={cfg.images}: none of the {len(urls)} files could be read as an image")
    storage.write_text(storage.join(cfg.output, "tokens.jsonl"), "\n".join(token_lines) + "\n")
    summary = {"reconstructed": done, "skipped": skipped, "output": cfg.output}
    if grid_inputs:
        # One row per image: input | reconstruction.
        pairs = [np.stack([a, b]) for a, b in zip(grid_inputs, grid_outputs)]
        summary["grid"] = write_png(storage.join(cfg.output, "grid.png"), image_grid(pairs))
    for item in skipped:
        print(f"skipped {item['image']}: {item['reason']}", file=sys.stderr)
    return summary


def check_inputs(cfg: ReconstructConfig) -> list[str]:
    """Before the weights are loaded (cluster/preflight.py): the checkpoint exists and, when its
    config.json says so, decodes to pixels; the folder holds images; the output can be written.
    Returns the images' URLs."""
    from cluster import preflight, storage

    preflight.require_model("checkpoint", cfg.checkpoint)
    _require_pixel_tokenizer(cfg.checkpoint)
    try:
        urls = list_images(cfg.images)
    except FileNotFoundError:
        raise preflight.BadInput("images", f"{cfg.images}: no such folder") from None
    except storage.StorageError as err:
        raise preflight.BadInput("images", str(err)) from None
    if not urls:
        raise preflight.BadInput("images", f"{cfg.images}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    preflight.require_writable("output", cfg.output)
    return urls


def _require_pixel_tokenizer(checkpoint: str) -> None:
    """A stage-1 export (proxy codes, no pixels) is refused from its config.json, before its weights load."""
    from cluster import preflight, storage
    from trainer.models import tokenizer_config_from_json

    if not (storage.is_remote(checkpoint) or os.path.isdir(checkpoint)):
        return  # a weight file or a hub id: the config comes with the weights
    config_url = storage.join(checkpoint, "config.json")
    if not storage.exists(config_url):
        return
    try:
        config = tokenizer_config_from_json(json.loads(storage.read_text(config_url)))
    except ValueError as err:
        raise preflight.BadInput("checkpoint", f"{checkpoint} is not a tokenizer export: {err}") from None
    if config.is_legacy and not config.finetune_decoder:
        raise preflight.BadInput("checkpoint", f"{checkpoint} is a stage-1 tokenizer (finetune_decoder=false): it "
                                               "predicts proxy codes, not pixels; reconstruct with a stage-2 or "
                                               "published tokenizer")


def main(argv: list[str] | None = None) -> int:
    cfg = load_config("reconstruct", ReconstructConfig, argv, description=__doc__ or "")
    try:
        check_inputs(cfg)
    except ConfigError as err:  # cluster.preflight.BadInput: one line naming the key
        print(str(err), file=sys.stderr)
        return EXIT_CONFIG_ERROR
    try:
        summary = reconstruct_folder(cfg)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"reconstructed {summary['reconstructed']} images into {summary['output']}"
          + (f", skipped {len(summary['skipped'])}" if summary["skipped"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decoded + augmented images/s of trainer/data.py's reader against the ideal: W x the rate of a plain
single-process PIL open-resize-crop loop over the same images.

    python bench/reader_throughput.py [--images 800] [--workers 0,1,2] [--image-size 256]

Shards ImageNet-like JPEGs (~110 KB, ~400x350) twice: the originals and the pre-resized variant
(shorter side = image size, ``shard.py resize=...``), then times the reader over each after warm-up:
``step_batches`` on one rank, steps of one batch read in one stream per loader worker (what a new
run picks). Target: >= 0.85 of ideal. Also prints the gain from the pre-resized shards.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from shard_throughput import make_jpeg_tree  # noqa: E402


def build_shards(tree: Path, output: Path, resize: int | None, samples_per_shard: int, split: str = "train") -> None:
    """The shard.py task body for one split, run in-process (the reader is what is measured here)."""
    from data_prep import manifest
    from data_prep.shard_plan import fingerprint, plan_shards
    from data_prep.shard_writer import ShardOptions, ensure_shard
    from data_prep.sources import list_split

    if (output / "manifest" / f"{split}_shards.parquet").exists():
        return
    listing = list_split(str(tree), split)
    options = ShardOptions(output=str(output), split=split, fingerprint=fingerprint(listing.items, {"resize": resize}),
                           resize=resize)
    specs = plan_shards(listing.items, split, 0, samples_per_shard)
    for spec in specs:
        ensure_shard(spec, options)
    manifest.write_manifests(str(output), split, len(specs), [])


def plain_pil_rate(paths: list[Path], size: int, seconds: float = 4.0) -> float:
    """Images/s of the simplest loop: open, convert, resize shorter side (bicubic), random crop, array."""
    rng = np.random.default_rng(0)
    done, start = 0, time.perf_counter()
    for path in itertools.cycle(paths):
        image = Image.open(path).convert("RGB")
        w, h = image.size
        scale = size / min(w, h)
        image = image.resize((max(size, int(w * scale)), max(size, int(h * scale))), Image.Resampling.BICUBIC)
        top, left = rng.integers(0, image.height - size + 1), rng.integers(0, image.width - size + 1)
        np.asarray(image)[top:top + size, left:left + size].copy()
        done += 1
        if time.perf_counter() - start > seconds:
            break
    return done / (time.perf_counter() - start)


def reader_rate(shards: Path, size: int, batch_size: int, workers: int, seconds: float, uint8: bool = True) -> float:
    """Images/s of the reader as the trainer uses it: one rank, steps of ``batch_size`` images in the
    streams a new run would pick (one per loader worker), uint8 batches converted to float on the
    device (``uint8=False``: converted to float by the reader's main process, the CPU-only path)."""
    from trainer.batch_layout import StepLayout, default_streams
    from trainer.data import step_batches

    layout = StepLayout(batch_size, default_streams(batch_size, max(1, workers)), 1, batch_size)
    batches = step_batches(f"{shards}/train-*.tar", layout, 0, image_size=size, num_workers=workers,
                           shuffle_buffer=200, seed=0, uint8=uint8)
    for _ in range(2 * max(1, workers)):  # worker start-up and first windows
        next(batches)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += next(batches).images.shape[0]
    rate = done / (time.perf_counter() - start)
    batches.close()
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--workers", default=",".join(str(w) for w in sorted({0, 1, os.cpu_count() or 1})))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per configuration")
    parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "titok-bench-reader"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    root = Path(args.data_dir)
    files, total = make_jpeg_tree(root / "jpegs", args.images, seed=1)
    originals, resized = root / "shards-original", root / f"shards-resized-{args.image_size}"
    build_shards(root / "jpegs", originals, None, 100)
    build_shards(root / "jpegs", resized, args.image_size, 100)
    paths = sorted((root / "jpegs" / "train").rglob("*.JPEG"))
    print(f"input: {files} JPEGs, {total / files / 1e3:.0f} KB each; image size {args.image_size}, "
          f"batch {args.batch_size}; {os.cpu_count()} cores")
    for workers in [int(w) for w in args.workers.split(",")]:
        # Re-measured next to each reader run: on a shared machine the rate drifts over a minute.
        ideal_1 = plain_pil_rate(paths, args.image_size)
        print(f"plain PIL loop, 1 process:            {ideal_1:7.1f} images/s")
        ideal = ideal_1 * max(1, workers)
        rate = reader_rate(originals, args.image_size, args.batch_size, workers, args.seconds)
        rate_float = reader_rate(originals, args.image_size, args.batch_size, workers, args.seconds, uint8=False)
        rate_resized = reader_rate(resized, args.image_size, args.batch_size, workers, args.seconds)
        print(f"reader, {workers} loader worker(s):         {rate:7.1f} images/s = {rate / ideal:.2f} of ideal "
              f"({ideal:.1f}; target >= 0.85); float conversion on the CPU {rate_float:7.1f} images/s "
              f"= {rate_float / ideal:.2f}; pre-resized shards {rate_resized:7.1f} images/s = {rate_resized / rate:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

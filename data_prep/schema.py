"""Config schemas of the data-preparation entry points (``shard``, ``demo_data``).

Defaults live here; ``configs/shard.yaml`` and ``configs/demo_data.yaml`` hold the user-facing
defaults, experiments may override them, and ``key=value`` arguments come last.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING

from trainer.config import ConfigError


class Split(str, enum.Enum):
    train = "train"
    val = "val"


class ShardMode(str, enum.Enum):
    write = "write"    # create missing or incomplete shards, then the manifests
    verify = "verify"  # re-read every shard and compare it with the manifest


class ResumeCheck(str, enum.Enum):
    checksum = "checksum"  # a finished shard is kept when its size and sha256 match its record
    size = "size"          # size only (no re-read; for very large outputs on slow storage)


@dataclass
class ShardConfig:
    """``python data_prep/shard.py input=... output=... split=train``."""

    experiment: Optional[str] = None
    # ImageNet as downloaded: a folder with train/<wnid>/*.JPEG and val/ (per-class folders or flat
    # with a labels file), a folder holding ILSVRC2012_img_<split>.tar, or that tar itself.
    input: str = MISSING
    # Where shards go: a local folder or s3://bucket/prefix. Shards are <output>/<split>-NNNNNN.tar,
    # manifests <output>/manifest/<split>.parquet and <split>_rejected.parquet.
    output: str = MISSING
    split: Split = Split.train
    mode: ShardMode = ShardMode.write
    # Flat validation folder/tar labels: LOC_val_solution.csv (Kaggle) or
    # ILSVRC2012_validation_ground_truth.txt (devkit). Default: looked up next to the input.
    labels: Optional[str] = None
    # Synset order of the devkit's numeric IDs (one wnid per line, e.g. map_clsloc.txt). Default: the
    # ILSVRC2012 devkit order shipped with the package.
    synsets: Optional[str] = None
    samples_per_shard: int = 1000
    shard_max_mb: float = 512.0          # 0 disables the byte limit
    seed: int = 0                        # the cross-shard shuffle
    workers: int = 0                     # concurrent shard tasks; 0 = one per CPU of the Ray cluster
    full_decode: bool = False            # also decode every JPEG (slower; structural checks otherwise)
    resize: Optional[int] = None         # pre-resized variant: shorter side in pixels (None = original bytes)
    jpeg_quality: int = 95               # for converted (CMYK, PNG, ...) and resized images
    resume_check: ResumeCheck = ResumeCheck.checksum
    progress: bool = True

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ConfigError("samples_per_shard", f"must be >= 1, got {self.samples_per_shard}")
        if self.shard_max_mb < 0:
            raise ConfigError("shard_max_mb", f"must be >= 0, got {self.shard_max_mb}")
        if self.workers < 0:
            raise ConfigError("workers", f"must be >= 0, got {self.workers}")
        if self.resize is not None and self.resize < 8:
            raise ConfigError("resize", f"must be >= 8 pixels or null, got {self.resize}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError("jpeg_quality", f"must be in [1, 100], got {self.jpeg_quality}")


class DemoLayout(str, enum.Enum):
    folders = "folders"      # train/<wnid>/*.JPEG, val/<wnid>/*.JPEG
    flat_val = "flat_val"    # train/<wnid>/..., val/*.JPEG + LOC_val_solution.csv
    archives = "archives"    # ILSVRC2012_img_train.tar (tar of per-class tars), ILSVRC2012_img_val.tar


@dataclass
class DemoDataConfig:
    """``python data_prep/make_demo_data.py output=<dir>``."""

    experiment: Optional[str] = None
    output: str = MISSING
    classes: int = 6                 # 1..8 procedurally drawn classes (real ImageNet wnids)
    train_per_class: int = 40
    val_per_class: int = 8
    min_size: int = 64               # image sides are drawn from [min_size, max_size]
    max_size: int = 160
    seed: int = 0
    quirks: bool = True              # CMYK, grayscale, PNG named .JPEG, truncated and zero-byte files
    layout: DemoLayout = DemoLayout.folders

    def __post_init__(self) -> None:
        if not 1 <= self.classes <= 8:
            raise ConfigError("classes", f"must be in [1, 8], got {self.classes}")
        if self.train_per_class < 1 or self.val_per_class < 0:
            raise ConfigError("train_per_class", "train_per_class >= 1 and val_per_class >= 0 are required")
        if not 16 <= self.min_size <= self.max_size:
            raise ConfigError("min_size", f"16 <= min_size <= max_size required, got {self.min_size}, {self.max_size}")

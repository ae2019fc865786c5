"""Config schemas of the data-preparation entry points (``shard``, ``pretokenize``, ``demo_data``).

Defaults live here; ``configs/shard.yaml``, ``configs/pretokenize.yaml`` and ``configs/demo_data.yaml``
hold the user-facing defaults, experiments may override them, and ``key=value`` arguments come last.
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
    checksum = "checksum"  # a finished shard is kept when its size and checksum match its record
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


class Augment(str, enum.Enum):
    none = "none"              # one row per image: the center crop (what evaluation sees)
    flip = "flip"              # also its horizontal mirror (flip=true): 2 rows per image
    ten_crop = "ten_crop"      # center + 4 corner crops of a 1.1x larger center square, each also mirrored: 10 rows


class Device(str, enum.Enum):
    auto = "auto"    # cuda when the worker sees a GPU (use_gpu=true), else cpu
    cpu = "cpu"
    cuda = "cuda"


@dataclass
class PretokenizeConfig:
    """``python data_prep/pretokenize.py tokenizer=... shards=... output=...``."""

    experiment: Optional[str] = None
    # The TiTok tokenizer: an export directory (local or s3://, ours or the authors' hub layout) or a
    # HuggingFace hub id. Required to write (mode=verify needs only the output).
    tokenizer: Optional[str] = None
    # Input image shards (data_prep/shard.py output): a folder/prefix holding one split's shards, a glob
    # (dir/train-*.tar) or a brace pattern (dir/train-{000000..000009}.tar); local or s3://. Required to write.
    shards: Optional[str] = None
    # Where token shards go: a local folder or s3://bucket/prefix (tokens-NNNNNN.parquet + manifest.parquet).
    output: str = MISSING
    mode: ShardMode = ShardMode.write
    # Side of the square the tokenizer reads (shorter side resized to it, center crop); null: the
    # tokenizer's own. Any other value than the tokenizer's is an error, so this only pins it.
    image_size: Optional[int] = None
    augment: Augment = Augment.none
    jpeg_draft: bool = False       # PIL's DCT-domain downscale while decoding (faster, not exact; off in eval too)
    # Images per encoder call. 1: every image is encoded alone, so its tokens are bit-identical to
    # TiTok.encode(image[None]) whatever the workers, batching or resumes. >1 is faster on a GPU; tokens are
    # still deterministic for that batch size but may differ from encoding alone where two codes nearly tie.
    batch_size: int = 1
    workers: int = 0               # tokenizer actors; 0 = one per GPU (use_gpu) or per cpus_per_worker CPUs
    cpus_per_worker: int = 1       # CPUs reserved per actor, used as JPEG decode threads (torch on CPU: 1 thread)
    use_gpu: bool = False          # reserve one GPU per actor
    device: Device = Device.auto
    progress: bool = True

    def __post_init__(self) -> None:
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError("image_size", f"must be >= 8 pixels or null, got {self.image_size}")
        for key in ("batch_size", "cpus_per_worker"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.workers < 0:
            raise ConfigError("workers", f"must be >= 0, got {self.workers}")
        if self.device == Device.cuda and not self.use_gpu:
            raise ConfigError("device", "cuda needs use_gpu=true (Ray shows a GPU only to actors that reserve one)")
        if self.device == Device.cpu and self.use_gpu:
            raise ConfigError("use_gpu", "true reserves a GPU per actor that device=cpu would leave idle; "
                                         "use device=auto or device=cuda")


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

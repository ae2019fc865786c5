"""Config schema of ``python evals/run.py`` (entry ``eval``; user defaults in ``configs/eval.yaml``).

Keys that are a contract: ``eval.kind``, ``eval.input1``, ``eval.input2``, ``eval.num_workers``,
``eval.inception_weights``, ``eval.batch_size``, ``mlflow.tracking_uri``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import List, Optional

from trainer.config import ConfigError
from trainer.sample import SamplingConfig
from trainer.schema import MLflowConfig

FID_50K = 50_000


@dataclass
class GanTestSettings:
    """GAN-test accuracy of generated samples (evals/gan_test.py): a small classifier trained once on
    the real images of a shard set names the class of each sample."""

    # Shard folder written by data_prep/shard.py (train-*.tar, val-*.tar, manifest/). null: no GAN-test.
    data: Optional[str] = None
    image_size: int = 32               # classifier input side (shards read at this size; samples resized)
    width: int = 16                    # channels of the first conv stage (then 2x, 4x)
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2.0e-3
    seed: int = 0
    cache: Optional[str] = None        # where trained classifiers are kept. null: <data>/gan_test

    def __post_init__(self) -> None:
        for name in ("image_size", "width", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.gan_test.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.image_size < 8:
            raise ConfigError("eval.gan_test.image_size", f"must be >= 8, got {self.image_size}")
        if self.lr <= 0:
            raise ConfigError("eval.gan_test.lr", f"must be > 0, got {self.lr}")


class EvalKind(str, enum.Enum):
    folders = "folders"                # FID between input1 and input2, IS of input1
    reconstruction = "reconstruction"  # rFID (+ PSNR/SSIM) of a tokenizer over val shards
    generation = "generation"          # gFID/IS of a generator's samples against reference statistics


@dataclass
class EvalSettings:
    kind: EvalKind = EvalKind.folders
    # folders: images to score (folder, shards or .npz with arr_0) and what to compare them with
    # (folder, shards, .npz with arr_0, or .npz with mu/sigma statistics).
    input1: Optional[str] = None
    input2: Optional[str] = None
    # reconstruction/generation: an export directory (config.json + model.safetensors; ours or the
    # authors'). null with output_dir set: the run's latest complete export.
    checkpoint: Optional[str] = None
    # generation: the tokenizer export that decodes the generator's tokens. null: the generator
    # run's `generator.tokenizer` (from <run dir>/config.yaml).
    tokenizer: Optional[str] = None
    # Validation shards: what reconstruction reconstructs, and (generation) the default reference.
    data: Optional[str] = None
    # generation: reference statistics: an .npz with mu/sigma (e.g. ADM's VIRTUAL_imagenet256_labeled.npz),
    # or images (folder/shards/npz arr_0) whose statistics are computed once and cached. null: eval.data.
    reference: Optional[str] = None
    # Where computed reference statistics are cached (local or s3://). null: <images location>/fid_stats.
    stats_cache: Optional[str] = None
    # Shards: shorter side resized to this, then center crop. null: what the checkpoint fixes (the
    # tokenizer's size; for generation the tokenizer that decodes the samples), 256 for folders.
    image_size: Optional[int] = None
    jpeg_draft: bool = False           # shards: PIL's DCT-domain downscale while decoding (faster, not exact)
    num_samples: int = FID_50K         # generation
    seed: int = 0                      # generation: sample i uses a seed derived from (seed, i)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # generation: classes to sample, sample i gets labels[i % len(labels)]. null: the GAN-test
    # classifier's classes when eval.gan_test.data is set, else every class of the generator in turn.
    labels: Optional[List[int]] = None
    gan_test: GanTestSettings = field(default_factory=GanTestSettings)
    # FID/IS (rFID) with Inception-v3. false: skip them (no Inception weights needed, e.g. offline):
    # reconstruction then reports PSNR/SSIM/codebook usage, generation its GAN-test accuracy.
    fid: bool = True
    # Ray pool
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    batch_size: int = 64               # images per Inception forward (torch-fidelity's default)
    chunk_size: int = 1000             # images per unit of work (retried as a whole)
    max_retries: int = 3
    inception_weights: Optional[str] = None   # path/URL overriding torch-fidelity's download
    preview_images: int = 16           # images in the MLflow sample grid (0: none)
    progress: bool = True
    # Long-running mode: poll output_dir for new complete exports and evaluate each once.
    watch: bool = False
    poll_seconds: float = 60.0
    max_idle_polls: Optional[int] = None      # stop after this many polls finding nothing (null: never)
    step: int = 0                      # MLflow step of a folders evaluation

    def __post_init__(self) -> None:
        for name in ("num_workers", "batch_size", "chunk_size", "image_size", "num_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"eval.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.max_retries < 0 or self.preview_images < 0 or self.cpus_per_worker <= 0:
            raise ConfigError("eval", "max_retries >= 0, preview_images >= 0 and cpus_per_worker > 0 are required")
        if self.poll_seconds <= 0:
            raise ConfigError("eval.poll_seconds", f"must be > 0, got {self.poll_seconds}")


@dataclass
class EvalConfig:
    """``python evals/run.py eval.kind=... [key=value ...]``."""

    experiment: Optional[str] = None
    # A training run's directory: watch mode polls <output_dir>/exports; reconstruction/generation
    # take its latest export when eval.checkpoint is null; evaluations are remembered under
    # <output_dir>/eval/.
    output_dir: Optional[str] = None
    eval: EvalSettings = field(default_factory=EvalSettings)
    mlflow: MLflowConfig = field(default_factory=lambda: MLflowConfig(experiment="titok-eval"))

    def __post_init__(self) -> None:
        e = self.eval
        if e.kind == EvalKind.folders:
            if e.watch:
                raise ConfigError("eval.watch", "needs eval.kind=reconstruction or generation (it evaluates exports)")
            for key in ("input1", "input2"):
                if not getattr(e, key):
                    raise ConfigError(f"eval.{key}", f"is required for eval.kind=folders (set eval.{key}=...)")
            return
        if e.watch and not self.output_dir:
            raise ConfigError("output_dir", "is required with eval.watch=true (the run directory to poll)")
        if not e.watch and not e.checkpoint and not self.output_dir:
            raise ConfigError("eval.checkpoint", f"is required for eval.kind={e.kind.value} "
                                                 "(an export directory), or set output_dir=<run dir>")
        if e.kind == EvalKind.reconstruction and not e.data:
            raise ConfigError("eval.data", "is required for eval.kind=reconstruction (validation shards)")
        if e.kind == EvalKind.generation and not e.fid and not e.gan_test.data:
            raise ConfigError("eval.fid", "is false and eval.gan_test.data is not set: a generation eval with "
                                          "nothing to compute (set eval.gan_test.data=<shard folder>)")
        if e.labels is not None and (not e.labels or any(label < 0 for label in e.labels)):
            raise ConfigError("eval.labels", f"must be null or a non-empty list of class indices, got {e.labels}")
        if e.kind == EvalKind.generation and e.fid and not (e.reference or e.data):
            raise ConfigError("eval.reference", "is required for eval.kind=generation: an .npz with mu/sigma, "
                                                "or images to compute reference statistics from (or set eval.data)")

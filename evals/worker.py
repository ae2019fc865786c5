"""What one evaluation worker does with one chunk: images -> Inception -> sufficient statistics.

:class:`EvalWorker` is a plain class (the pool runs it as a Ray actor). It loads the feature network
once (unless FID is off), plus the models of its task (a tokenizer to reconstruct with, or a
generator and tokenizer to sample with, and the GAN-test classifier once it exists), and turns each
:class:`Chunk` into a :class:`ChunkResult`: per image set the count, feature sum and outer-product
sum (float64), the IS logits in sample order, PSNR/SSIM sums and token counts for reconstructions,
the GAN-test confusion counts for samples, and a few preview images. Every part is a sum over
images, so results merge exactly, and depends only on the chunk, never on which worker ran it or
what it ran before.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from evals.inception import FEATURE_DIM, InceptionFeatures, InceptionWeights, load_inception_weights
from evals.sources import BadInputError, Batch, ImageSlice, SliceReport
from evals.stats import FeatureSums
from trainer.sample import sample_label, sample_seed


# ----------------------------------------------------------------------------------------------
# Tasks: what a worker produces images with (besides reading them)


@dataclass(frozen=True)
class ScoreTask:
    """Score the images of each chunk as they are (folders, shards, npz)."""


@dataclass(frozen=True)
class ReconstructionTask:
    """Reconstruct each image with a tokenizer; score the reconstructions (set ``reconstruction``)
    and, unless cached reference statistics exist, the originals too (set ``reference``)."""

    tokenizer: str               # export directory (ours or the authors' hub format)
    score_originals: bool = True
    image_size: int = 256        # what the tokenizer takes; other sizes are bad input


@dataclass(frozen=True)
class GenerationTask:
    """Sample images ``start..end`` of a fixed list: label ``labels[i % len(labels)]`` (no labels:
    ``i % num_classes``), seed from ``(seed, i)``; with ``gan_test`` (a classifier folder, see
    :mod:`evals.gan_test`) the samples are also classified."""

    generator: str
    tokenizer: str
    sampling: Any                # trainer.sample.SamplingConfig
    num_classes: int
    seed: int
    labels: tuple[int, ...] = ()
    gan_test: str | None = None

    def label(self, index: int) -> int:
        return self.labels[index % len(self.labels)] if self.labels else sample_label(index, self.num_classes)


Task = ScoreTask | ReconstructionTask | GenerationTask


@dataclass(frozen=True)
class GeneratedSlice:
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Chunk:
    index: int                          # position in the job's plan: results merge in this order
    set_name: str                       # which image set its images belong to ("input1", "samples", ...)
    images: ImageSlice | GeneratedSlice
    logits: bool = False                # return IS logits (the set whose IS is reported)
    preview: int = 0                    # keep this many images for the MLflow grid

    @property
    def size(self) -> int:
        return self.images.size


@dataclass
class ChunkResult:
    index: int
    sums: dict[str, FeatureSums]                                     # empty when FID is off
    logits: dict[str, torch.Tensor] = field(default_factory=dict)    # float32 [n, 1008], sample order
    counts: dict[str, int] = field(default_factory=dict)             # images scored per set
    psnr_sum: float = 0.0
    ssim_sum: float = 0.0
    quality_count: int = 0
    code_counts: np.ndarray | None = None     # int64 [codebook]: tokens of the reconstructed images
    confusion: np.ndarray | None = None       # int64 [C, C]: GAN-test (conditioning class, predicted)
    previews: dict[str, np.ndarray] = field(default_factory=dict)   # uint8 [k, H, W, 3]
    report: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    worker_pid: int = 0

    def set_counts(self) -> dict[str, int]:
        """Images scored per set (a result that carries only feature sums: their counts)."""
        return self.counts or {name: int(sums.count or 0) for name, sums in self.sums.items()}

    @property
    def images(self) -> int:
        return max(self.set_counts().values(), default=0)


# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSettings:
    inception_weights: str | None       # None: torch-fidelity's default URL
    batch_size: int
    use_gpu: bool = False
    fid: bool = True                    # False: no Inception network (no FID/IS; nothing downloaded)
    # torch intra-op threads of the worker process (None: leave as is). The thread count changes how
    # oneDNN rounds float32 convolutions, so equal settings are what makes two runs bit-identical.
    threads: int | None = None


class EvalWorker:
    """Holds the networks of one worker and evaluates chunks (run as a Ray actor by the pool)."""

    def __init__(self, settings: WorkerSettings, task: Task, weights: InceptionWeights | None = None) -> None:
        if settings.threads is not None:
            torch.set_num_threads(max(1, settings.threads))
        self.device = torch.device("cuda" if settings.use_gpu and torch.cuda.is_available() else "cpu")
        if settings.use_gpu and self.device.type != "cuda":
            raise RuntimeError("eval.use_gpu=true but this worker sees no CUDA device")
        if self.device.type == "cuda":
            # The FID protocol is float32 Inception: no TF32 (on by default for cuDNN convolutions).
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.settings, self.task = settings, task
        self.features = (InceptionFeatures(weights or load_inception_weights(settings.inception_weights), self.device)
                         if settings.fid else None)
        self._scorer = None  # the GAN-test classifier, loaded at first use (it may be trained after start)
        self.tokenizer = self.generator = None
        if isinstance(task, (ReconstructionTask, GenerationTask)):
            from trainer.models import load_tokenizer

            self.tokenizer = load_tokenizer(task.tokenizer).to(self.device).eval()
        if isinstance(task, GenerationTask):
            from trainer.models import load_generator

            self.generator = load_generator(task.generator).to(self.device).eval()

    def pid(self) -> int:
        return os.getpid()

    def ready(self) -> str:
        return self.features.fingerprint if self.features is not None else "no feature network"

    def train_gan_test(self, spec) -> dict:
        """The GAN-test classifier of ``spec`` (an :class:`evals.gan_test.ClassifierSpec`), trained
        on this worker and cached unless the cache has it; returns its record as a dict."""
        from dataclasses import asdict

        from evals.gan_test import ensure_classifier

        return asdict(ensure_classifier(spec, self.device))

    def run(self, chunk: Chunk) -> ChunkResult:
        started = time.perf_counter()
        result = ChunkResult(chunk.index, {})
        report = SliceReport()
        for batch in self._batches(chunk, report):
            if isinstance(self.task, ReconstructionTask):
                self._score_reconstruction(batch, chunk, result)
            else:
                self._score(chunk.set_name, batch.images, chunk, result)
                if isinstance(chunk.images, GeneratedSlice) and self.task.gan_test:
                    self._gan_test(batch, result)
        result.sums = {name: sums.cpu() for name, sums in result.sums.items()}
        result.report = report.as_dict()
        result.seconds = time.perf_counter() - started
        result.worker_pid = os.getpid()
        return result

    # --- images ---------------------------------------------------------------------------------
    def _batches(self, chunk: Chunk, report: SliceReport):
        if isinstance(chunk.images, GeneratedSlice):
            yield from self._generate(chunk.images)
        else:
            yield from chunk.images.batches(self.settings.batch_size, report)

    @torch.inference_mode()
    def _generate(self, part: GeneratedSlice):
        from trainer.sample import sample_images

        task = self.task
        assert isinstance(task, GenerationTask)
        step = max(1, min(self.settings.batch_size, task.sampling.batch_size))
        for first in range(part.start, part.end, step):
            indices = range(first, min(first + step, part.end))
            labels = torch.tensor([task.label(i) for i in indices], dtype=torch.long, device=self.device)
            images = sample_images(self.generator, self.tokenizer, labels, [sample_seed(task.seed, i) for i in indices],
                                   task.sampling)  # uint8 [N, H, W, 3]
            yield Batch(images.permute(0, 3, 1, 2).contiguous(), labels)  # stays on the device

    # --- scoring --------------------------------------------------------------------------------
    def _score(self, set_name: str, images: torch.Tensor, chunk: Chunk, result: ChunkResult, logits: bool | None = None,
               preview: int | None = None) -> None:
        result.counts[set_name] = result.counts.get(set_name, 0) + images.shape[0]
        if self.features is not None:
            pool, batch_logits = self.features(images)
            result.sums.setdefault(set_name, FeatureSums(FEATURE_DIM, device=str(self.device))).add(pool)
            if chunk.logits if logits is None else logits:
                batch_logits = batch_logits.cpu()
                previous = result.logits.get(set_name)
                result.logits[set_name] = batch_logits if previous is None else torch.cat([previous, batch_logits])
        _keep_preview(result, set_name, images, chunk.preview if preview is None else preview)

    def _gan_test(self, batch: Batch, result: ChunkResult) -> None:
        """Add the batch's (conditioning class, predicted class) counts to the chunk's confusion matrix."""
        if self._scorer is None:
            from evals.gan_test import SampleScorer

            self._scorer = SampleScorer(self.task.gan_test, self.device)
        confusion = self._scorer.confusion(batch.images, batch.labels)
        result.confusion = confusion if result.confusion is None else result.confusion + confusion

    @torch.inference_mode()
    def _score_reconstruction(self, batch: Batch, chunk: Chunk, result: ChunkResult) -> None:
        from evals.quality import psnr, ssim

        task = self.task
        assert isinstance(task, ReconstructionTask)
        if tuple(batch.images.shape[-2:]) != (task.image_size, task.image_size):
            raise BadInputError(f"reconstruction needs {task.image_size}x{task.image_size} images, got "
                                f"{tuple(batch.images.shape[-2:])} (use shards, which are center-cropped)")
        originals = batch.images.to(self.device).float().div_(255.0)
        # The round trip through the discrete tokens (what a generator would produce), decoder output clamped.
        tokens = self.tokenizer.encode(originals)
        reconstructions = self.tokenizer.decode_tokens(tokens).float()
        if self.tokenizer.config.quantize_mode == "vq":  # token ids (B, K): how much of the codebook they use
            counts = torch.bincount(tokens.reshape(-1).long(), minlength=self.tokenizer.config.codebook_size)
            counts = counts.cpu().numpy().astype(np.int64)
            result.code_counts = counts if result.code_counts is None else result.code_counts + counts
        # Scored like generated samples: clamped and rounded to uint8, as a saved image would be.
        recon_uint8 = reconstructions.clamp(0, 1).mul(255).round().to(torch.uint8)
        if task.score_originals:
            self._score("reference", batch.images, chunk, result, logits=False, preview=0)
        _keep_preview(result, "original", batch.images, chunk.preview)
        self._score("reconstruction", recon_uint8, chunk, result)
        recon_float = recon_uint8.float().div_(255.0)
        result.psnr_sum += float(psnr(recon_float, originals).double().sum())
        result.ssim_sum += float(ssim(recon_float, originals).double().sum())
        result.quality_count += originals.shape[0]


def _keep_preview(result: ChunkResult, name: str, images: torch.Tensor, keep: int) -> None:
    """Add images (uint8 NCHW) to the chunk's preview of ``name`` until it holds ``keep``."""
    have = result.previews.get(name)
    taken = 0 if have is None else have.shape[0]
    if taken < keep:
        more = images[: keep - taken].permute(0, 2, 3, 1).cpu().numpy()
        result.previews[name] = more if have is None else np.concatenate([have, more])


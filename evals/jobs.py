"""The three evaluations: ``folders``, ``reconstruction`` and ``generation``.

Each plans its chunks, runs them on one :class:`evals.pool.EvalPool`, turns the merged sums into
metrics and returns a result dict (what ``evals/run.py`` prints as JSON and logs to MLflow)::

    {"kind": ..., "fid": ..., "is_mean": ..., "is_std": ..., "count": ..., "protocol": {...}, ...}

Every FID carries its protocol: the feature network and its weights hash, the reference statistics
(id, source, count), the number of images scored, how pixels were produced (resize/crop/decoding),
the sampler settings for generation, and a metric label (``FID-50k`` only for exactly 50,000).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cluster import storage
from evals.gan_test import ClassifierInfo, ClassifierSpec, classifier_spec, gan_test_result
from evals.inception import NETWORK_DESCRIPTION, InceptionWeights, load_inception_weights
from evals.merge import MergedSets
from evals.pool import EvalError, EvalPool, PoolSettings, RunReport
from evals.reference import load_reference, save_reference
from evals.schema import EvalConfig, EvalKind
from evals.sources import BadInputError, ImageSet, resolve_input
from evals.stats import IS_SPLITS, FidStats, frechet_distance, inception_score
from evals.worker import (Chunk, GeneratedSlice, GenerationTask, ReconstructionTask, ScoreTask, Task,
                          WorkerSettings)
from trainer.models.quantizer import codebook_usage_from_counts
from trainer.sample import run_tokenizer

log = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    url: str
    step: int
    meta: dict[str, Any]

    @property
    def run_dir(self) -> str | None:
        """``<run>`` of ``<run>/exports/step_*`` (None for a checkpoint outside a run, e.g. the authors')."""
        parts = self.url.rstrip("/").rsplit("/", 2)
        return parts[0] if len(parts) == 3 and parts[1] == "exports" else None


def fid_label(count: int, prefix: str = "FID") -> str:
    """``FID-50k`` for 50,000 images, ``FID-10k``, ``FID-1234``: the count is part of the name."""
    return f"{prefix}-{count // 1000}k" if count % 1000 == 0 and count >= 1000 else f"{prefix}-{count}"


def check_sample_count(scored: int, requested: int) -> None:
    """The FID-50k guard: a generation FID is reported only for exactly the requested count."""
    if scored != requested:
        raise EvalError(f"{scored} samples were scored but eval.num_samples={requested}; "
                        f"refusing to report {fid_label(requested)}")


# ----------------------------------------------------------------------------------------------
# Shared pieces


def _pool_settings(cfg: EvalConfig, work: int) -> PoolSettings:
    e = cfg.eval
    return PoolSettings(num_workers=max(1, min(e.num_workers, work)), use_gpu=e.use_gpu,
                        cpus_per_worker=e.cpus_per_worker, max_retries=e.max_retries, progress=e.progress)


def _worker_settings(cfg: EvalConfig) -> WorkerSettings:
    e = cfg.eval
    return WorkerSettings(e.inception_weights, e.batch_size, e.use_gpu, fid=e.fid, threads=max(1, int(e.cpus_per_worker)))


def _resolve(cfg: EvalConfig, url: str) -> ImageSet:
    return resolve_input(url, chunk_size=cfg.eval.chunk_size, image_size=cfg.eval.image_size, draft=cfg.eval.jpeg_draft)


def _chunks_of(image_set: ImageSet, set_name: str, first_index: int, logits: bool = False, preview: int = 0) -> list[Chunk]:
    chunks = []
    for i, part in enumerate(image_set.slices):
        keep = min(preview, part.size)  # the grid's images come from the first chunks
        preview -= keep
        chunks.append(Chunk(first_index + i, set_name, part, logits=logits, preview=keep))
    return chunks


def _run_pool(cfg: EvalConfig, task: Task, chunks: list[Chunk], weights: InceptionWeights | None,
              description: str, gan_test: ClassifierSpec | None = None
              ) -> tuple[MergedSets, RunReport, ClassifierInfo | None]:
    """Run the chunks on a pool; with ``gan_test`` one of its actors first trains (or finds cached)
    that classifier."""
    with EvalPool(_worker_settings(cfg), task, _pool_settings(cfg, len(chunks)), weights) as pool:
        classifier = ClassifierInfo(**pool.call_one("train_gan_test", gan_test)) if gan_test else None
        return (*pool.run(chunks, description=description), classifier)


def _reference_info(stats: FidStats) -> dict[str, Any]:
    return {"stats_id": stats.stats_id, "source": stats.source, "count": stats.count}


def _protocol(weights: InceptionWeights | None, metric: str, reference: FidStats | None, count: int,
              preprocessing: dict[str, str], **extra: Any) -> dict[str, Any]:
    """What makes two results comparable (no feature network or reference when FID was off)."""
    protocol = {
        "metric": metric,
        "feature_network": NETWORK_DESCRIPTION if weights else None,
        "weights_sha256": weights.fingerprint if weights else None,
        "weights_source": weights.source if weights else None,
        "reference": _reference_info(reference) if reference else None,
        "num_images": count,
        "preprocessing": preprocessing,
        "is_splits": IS_SPLITS,
        **extra,
    }
    protocol["protocol_id"] = hashlib.sha256(json.dumps({k: v for k, v in protocol.items() if k != "weights_source"},
                                                        sort_keys=True, default=str).encode()).hexdigest()[:16]
    return protocol


def _stats_of(merged: MergedSets, set_name: str, source: str) -> FidStats:
    if set_name not in merged.sums:
        raise EvalError(f"no images were scored for {source}")
    return merged.sums[set_name].to_stats(source)


def _is_of(merged: MergedSets, set_name: str) -> tuple[float | None, float | None]:
    logits = merged.all_logits(set_name)
    if logits.shape[0] < IS_SPLITS:
        log.warning("Inception Score needs at least %d images, got %d: not reported", IS_SPLITS, logits.shape[0])
        return None, None
    return inception_score(logits)


def _previews(merged: MergedSets, names: list[str]) -> list[np.ndarray]:
    return [merged.previews[n] for n in names if n in merged.previews and len(merged.previews[n])]


# ----------------------------------------------------------------------------------------------
# folders


def evaluate_folders(cfg: EvalConfig) -> tuple[dict[str, Any], list[np.ndarray]]:
    """FID between ``eval.input1`` and ``eval.input2``, IS of ``eval.input1``."""
    e = cfg.eval
    weights = load_inception_weights(e.inception_weights)
    set1, set2 = _resolve(cfg, e.input1), _resolve(cfg, e.input2)  # type: ignore[arg-type]
    if set1.kind == "npz_stats":
        raise BadInputError(f"eval.input1={e.input1} holds statistics; input1 must be images (its IS is reported)")
    stats2 = load_reference(set2, weights.fingerprint, e.stats_cache)
    chunks = _chunks_of(set1, "input1", 0, logits=True, preview=e.preview_images)
    if stats2 is None:
        chunks += _chunks_of(set2, "input2", len(chunks), preview=e.preview_images)
    merged, report, _ = _run_pool(cfg, ScoreTask(), chunks, weights, "folders")
    stats1 = _stats_of(merged, "input1", set1.url)
    if stats2 is None:
        stats2 = _stats_of(merged, "input2", set2.url)
        save_reference(stats2, set2, weights.fingerprint, e.stats_cache)
    fid = frechet_distance(stats1, stats2)
    is_mean, is_std = _is_of(merged, "input1")
    count1 = stats1.count or 0
    result = {
        "kind": EvalKind.folders.value, "fid": fid, "is_mean": is_mean, "is_std": is_std,
        "count": count1, "count1": count1, "count2": stats2.count,
        "input1": set1.url, "input2": set2.url,
        "protocol": _protocol(weights, fid_label(count1), stats2, count1,
                              {"input1": set1.policy, "input2": set2.policy}),
        "data_problems": merged.report, "images_per_s": report.images_per_s,
    }
    return result, _previews(merged, ["input1", "input2"])


# ----------------------------------------------------------------------------------------------
# reconstruction


def evaluate_reconstruction(cfg: EvalConfig, checkpoint: Checkpoint) -> tuple[dict[str, Any], list[np.ndarray]]:
    """rFID of a tokenizer over ``eval.data`` against the same images' statistics (unless eval.fid is
    false), plus PSNR/SSIM and the share of the codebook the images' tokens use."""
    e = cfg.eval
    weights = load_inception_weights(e.inception_weights) if e.fid else None
    data = _resolve(cfg, e.data)  # type: ignore[arg-type]
    if data.kind == "npz_stats":
        raise BadInputError(f"eval.data={e.data} holds statistics; reconstruction needs images")
    _check_pixel_tokenizer(checkpoint.url, e.image_size)
    reference = load_reference(data, weights.fingerprint, e.stats_cache) if weights else None
    task = ReconstructionTask(checkpoint.url, score_originals=weights is not None and reference is None,
                              image_size=e.image_size)
    merged, report, _ = _run_pool(cfg, task, _chunks_of(data, "data", 0, preview=e.preview_images), weights,
                                  f"{'rFID' if weights else 'PSNR/SSIM'} step {checkpoint.step}")
    fid = None
    if weights is not None:
        if reference is None:
            reference = _stats_of(merged, "reference", data.url)
            save_reference(reference, data, weights.fingerprint, e.stats_cache)
        fid = frechet_distance(_stats_of(merged, "reconstruction", f"reconstructions by {checkpoint.url}"), reference)
    count = merged.count("reconstruction")
    n = merged.quality_count
    usage = codebook_usage_from_counts(torch.from_numpy(merged.code_counts)) if merged.code_counts is not None else {}
    result = {
        "kind": EvalKind.reconstruction.value, "fid": fid, "rfid": fid, "count": count,
        "psnr": merged.psnr_sum / n if n else None, "ssim": merged.ssim_sum / n if n else None,
        "codebook_usage": usage.get("codebook_used_fraction"), "codebook_perplexity": usage.get("codebook_perplexity"),
        "checkpoint": checkpoint.url, "step": checkpoint.step, "data": data.url,
        "protocol": _protocol(weights, fid_label(count, "rFID") if weights else f"PSNR/SSIM-{count}", reference, count,
                              {"images": data.policy, "reconstructions": "tokenizer output clamped to [0, 1], "
                                                                         "rounded to uint8"}),
        "data_problems": merged.report, "images_per_s": report.images_per_s,
    }
    return result, _previews(merged, ["original", "reconstruction"])


# ----------------------------------------------------------------------------------------------
# generation


def evaluate_generation(cfg: EvalConfig, checkpoint: Checkpoint) -> tuple[dict[str, Any], list[np.ndarray]]:
    """gFID and IS of ``eval.num_samples`` class-conditional samples against reference statistics
    (unless eval.fid is false), and their GAN-test accuracy when ``eval.gan_test.data`` is set."""
    e = cfg.eval
    weights = load_inception_weights(e.inception_weights) if e.fid else None
    tokenizer = e.tokenizer or run_tokenizer(checkpoint.url)
    if not tokenizer:
        raise BadInputError(f"no tokenizer known for {checkpoint.url} (its run's config.yaml names none): "
                            "set eval.tokenizer=<tokenizer export>")
    num_classes = _generator_num_classes(checkpoint.url)
    gan_test = classifier_spec(e.gan_test) if e.gan_test.data else None
    labels = tuple(e.labels) if e.labels else (gan_test.classes if gan_test else ())
    _check_labels(labels, num_classes, gan_test)
    if e.num_samples % (len(labels) or num_classes):
        log.warning("eval.num_samples=%d is not a multiple of the %d classes: classes are not equally represented",
                    e.num_samples, len(labels) or num_classes)
    ref_set = _resolve(cfg, e.reference or e.data) if weights else None  # type: ignore[arg-type]
    reference = load_reference(ref_set, weights.fingerprint, e.stats_cache) if weights and ref_set else None
    chunks: list[Chunk] = _chunks_of(ref_set, "reference", 0) if ref_set and reference is None else []
    for start in range(0, e.num_samples, e.chunk_size):
        end = min(start + e.chunk_size, e.num_samples)
        chunks.append(Chunk(len(chunks), "samples", GeneratedSlice(start, end), logits=True,
                            preview=max(0, min(e.preview_images - start, end - start))))
    task = GenerationTask(checkpoint.url, tokenizer, e.sampling, num_classes, e.seed, labels=labels,
                          gan_test=gan_test.url if gan_test else None)
    merged, report, classifier = _run_pool(cfg, task, chunks, weights,
                                           f"{'gFID' if weights else 'GAN-test'} step {checkpoint.step}", gan_test)
    count = merged.count("samples")
    check_sample_count(count, e.num_samples)
    fid = is_mean = is_std = None
    if weights is not None and ref_set is not None:
        if reference is None:
            reference = _stats_of(merged, "reference", ref_set.url)
            save_reference(reference, ref_set, weights.fingerprint, e.stats_cache)
        fid = frechet_distance(_stats_of(merged, "samples", f"samples of {checkpoint.url}"), reference)
        is_mean, is_std = _is_of(merged, "samples")
    label_rule = "labels[index % len(labels)]" if labels else "index % num_classes"
    result = {
        "kind": EvalKind.generation.value, "fid": fid, "is_mean": is_mean, "is_std": is_std, "count": count,
        "checkpoint": checkpoint.url, "tokenizer": tokenizer, "step": checkpoint.step,
        "protocol": _protocol(weights, fid_label(count) if weights else f"GAN-test-{count}", reference, count,
                              {"samples": "sampler output uint8 [N, H, W, 3]",
                               "reference": ref_set.policy if ref_set else "none (eval.fid=false)"},
                              sampler={**dataclasses.asdict(e.sampling), "seed": e.seed, "num_classes": num_classes,
                                       "labels": label_rule, "label_list": list(labels),
                                       "seeds": "SeedSequence([seed, index])"}),
        "images_per_s": report.images_per_s,
    }
    if classifier is not None:
        confusion = merged.confusion if merged.confusion is not None else np.zeros((len(classifier.classes),) * 2, np.int64)
        result["gan_test"] = gan_test_result(confusion, classifier)
    return result, _previews(merged, ["samples"])


def _check_labels(labels: tuple[int, ...], num_classes: int, gan_test: ClassifierSpec | None) -> None:
    bad = [label for label in labels if not 0 <= label < num_classes]
    if bad:
        raise BadInputError(f"eval.labels {bad[:5]} are not classes of the generator (0..{num_classes - 1})")
    if gan_test is not None:
        unknown = sorted(set(labels) - set(gan_test.classes))
        if unknown:
            raise BadInputError(f"eval.labels {unknown[:5]} are not classes of eval.gan_test.data={gan_test.data} "
                                f"(its classes: {list(gan_test.classes)[:10]}{'...' if len(gan_test.classes) > 10 else ''})")


def _export_config(url: str) -> dict[str, Any]:
    config_url = storage.join(url, "config.json")
    if not storage.exists(config_url):
        raise BadInputError(f"{url}: not an export directory (no config.json)")
    return json.loads(storage.read_text(config_url))


def _check_pixel_tokenizer(url: str, image_size: int) -> None:
    """rFID needs a tokenizer that decodes to pixels (not a stage-1 proxy-code model), of the
    evaluation's image size."""
    from trainer.models import tokenizer_config_from_json

    try:
        config = tokenizer_config_from_json(_export_config(url))
    except ValueError as err:
        raise BadInputError(f"{url} is not a tokenizer export: {err}") from None
    if config.is_legacy and not config.finetune_decoder:
        raise BadInputError(f"{url} is a stage-1 tokenizer (finetune_decoder=false): it predicts proxy codes, "
                            "not pixels; evaluate a stage-2 (decoder_finetune) or single-stage export")
    if config.image_size != image_size:
        raise BadInputError(f"{url} takes {config.image_size}x{config.image_size} images but eval.image_size="
                            f"{image_size}; set eval.image_size={config.image_size}")


def _generator_num_classes(url: str) -> int:
    from trainer.models import generator_config_from_json

    try:
        return generator_config_from_json(_export_config(url)).condition_num_classes
    except ValueError as err:
        raise BadInputError(f"{url} is not a generator export: {err}") from None


# ----------------------------------------------------------------------------------------------
# checkpoints


def load_checkpoint(url: str) -> Checkpoint:
    """An export directory: meta.json when there is one (ours), step from it or the folder name."""
    from trainer.checkpoint import is_complete, parse_step

    url = url.rstrip("/")
    if not storage.exists(storage.join(url, "config.json")):
        raise BadInputError(f"{url}: not an export (no config.json)")
    meta_url = storage.join(url, "meta.json")
    meta = json.loads(storage.read_text(meta_url)) if storage.exists(meta_url) else {}
    if meta and not is_complete(url):  # ours, still being written (the authors' have no meta.json)
        raise BadInputError(f"{url}: export incomplete (no COMPLETE marker yet)")
    step = meta.get("step")
    if step is None:
        step = parse_step(url) or 0
    return Checkpoint(url, int(step), meta)


def evaluate_checkpoint(cfg: EvalConfig, checkpoint: Checkpoint) -> tuple[dict[str, Any], list[np.ndarray]]:
    from evals.preflight import with_image_size

    cfg = with_image_size(cfg, checkpoint.url)  # eval.image_size=null: the checkpoint's size
    if cfg.eval.kind == EvalKind.reconstruction:
        return evaluate_reconstruction(cfg, checkpoint)
    if cfg.eval.kind == EvalKind.generation:
        return evaluate_generation(cfg, checkpoint)
    raise ValueError(f"eval.kind={cfg.eval.kind.value} does not evaluate checkpoints")


def evaluate_and_log(cfg: EvalConfig, checkpoint: Checkpoint | None = None) -> dict[str, Any]:
    """Run the configured evaluation (of ``checkpoint`` for reconstruction/generation) and log it to
    MLflow; returns the result with ``result["mlflow"]`` naming the run written to."""
    from evals.tracking import log_result

    if cfg.eval.kind == EvalKind.folders:
        from evals.preflight import with_image_size

        result, previews = evaluate_folders(with_image_size(cfg))
        eval_of, step, meta = f"folders:{result['input1']} vs {result['input2']}", cfg.eval.step, None
    else:
        assert checkpoint is not None
        result, previews = evaluate_checkpoint(cfg, checkpoint)
        eval_of, step, meta = checkpoint.run_dir or checkpoint.url, checkpoint.step, checkpoint.meta
    result["mlflow"] = log_result(cfg.mlflow, result, step, meta, eval_of, previews)
    return result


def checkpoint_to_evaluate(cfg: EvalConfig) -> Checkpoint:
    """``eval.checkpoint``, else the latest complete export under ``output_dir``."""
    from trainer.checkpoint import latest_export

    if cfg.eval.checkpoint:
        return load_checkpoint(cfg.eval.checkpoint)
    export = latest_export(cfg.output_dir)  # type: ignore[arg-type]
    if export is None:
        raise BadInputError(f"{cfg.output_dir} has no complete export (exports/step_*/COMPLETE)")
    return Checkpoint(export.url, export.step, export.meta)

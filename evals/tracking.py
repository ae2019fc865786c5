"""Logging evaluation results to MLflow.

Results of a checkpoint go to the training run that produced it (its id is in the export's
``meta.json``), as metrics ``eval/...`` at the checkpoint's step, so the FID curve sits next to the
loss curves and two runs compare side by side in the MLflow UI. Without a reachable training run
they go to an eval run linked to it (one per run directory, re-used across checkpoints, tagged with
the checkpoint). Per evaluation, the result JSON (protocol included) and a sample grid are stored
as artifacts under ``eval/step_<step>/``; the reference statistics' id and the feature network's
weights hash are params (when FID was computed), and so is the GAN-test classifier's id.

Metrics: reconstruction ``eval/rfid``, ``eval/psnr``, ``eval/ssim``, ``eval/codebook_usage`` (share of
the codebook the validation images' tokens use), ``eval/codebook_perplexity``; generation
``eval/fid``, ``eval/is``, ``eval/gan_test`` (GAN-test accuracy), ``eval/gan_test_real`` (the
classifier on real validation images: the ceiling), ``eval/gan_test_class/<wnid>`` (per class).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np

from trainer.config import redact
from trainer.schema import MLflowConfig
from trainer.tracking import image_grid, resolve_tracking_uri

log = logging.getLogger(__name__)

RUN_KIND_TAG = "titok.kind"
EVAL_OF_TAG = "titok.eval_of"          # run directory (or inputs) an eval run belongs to
TRAINING_RUN_TAG = "titok.training_run_id"


def metrics_of(result: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of a result (``eval/fid_50k`` only when exactly 50,000 were scored)."""
    out: dict[str, float | None] = {}
    kind = result["kind"]
    if kind == "reconstruction":
        if result.get("fid") is not None:
            out["eval/rfid"] = result["fid"]
            out["eval/rfid_num_images"] = result["count"]
        for key in ("psnr", "ssim", "codebook_usage", "codebook_perplexity"):
            out[f"eval/{key}"] = result.get(key)
    else:
        out["eval/fid"] = result.get("fid")
        if result.get("is_mean") is not None:
            out["eval/is"] = result["is_mean"]
            out["eval/is_std"] = result["is_std"]
        out["eval/num_samples"] = result["count"]
        if result["protocol"]["metric"] == "FID-50k":
            out["eval/fid_50k"] = result["fid"]
        gan_test = result.get("gan_test")
        if gan_test:
            out["eval/gan_test"] = gan_test["accuracy"]
            out["eval/gan_test_real"] = gan_test["real_accuracy"]
            for wnid, accuracy in gan_test["per_class"].items():
                out[f"eval/gan_test_class/{wnid}"] = accuracy
    return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}


def log_result(mlflow_cfg: MLflowConfig, result: dict[str, Any], step: int, meta: dict[str, Any] | None,
               eval_of: str, previews: list[np.ndarray] | None = None) -> dict[str, str] | None:
    """Log one evaluation; returns ``{"tracking_uri", "run_id"}`` of the run written to (None: off)."""
    if not mlflow_cfg.enabled:
        return None
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    meta = meta or {}
    tracking_uri = mlflow_cfg.tracking_uri or meta.get("mlflow_tracking_uri") or resolve_tracking_uri(None)
    client = MlflowClient(tracking_uri=tracking_uri)
    run_id = _training_run(client, meta)
    if run_id is None:
        run_id = _eval_run(client, mlflow_cfg.experiment, eval_of, meta, tracking_uri)
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, step) for k, v in metrics_of(result).items()]
    client.log_batch(run_id, metrics=metrics)
    kind = result["kind"]
    protocol = result["protocol"]
    if protocol.get("reference"):
        _log_param(client, run_id, f"eval/{kind}/reference_stats_id", protocol["reference"]["stats_id"])
    if protocol.get("weights_sha256"):
        _log_param(client, run_id, f"eval/{kind}/weights_sha256", protocol["weights_sha256"])
    if result.get("gan_test"):
        _log_param(client, run_id, f"eval/{kind}/gan_test_classifier", result["gan_test"]["classifier"]["id"])
    client.set_tag(run_id, f"eval/{kind}/last_checkpoint", redact(str(result.get("checkpoint") or eval_of)))
    client.set_tag(run_id, f"eval/{kind}/last_metric", protocol["metric"])
    folder = f"eval/step_{step:09d}"
    client.log_text(run_id, json.dumps(result, indent=2, default=str), f"{folder}/{kind}_result.json")
    if previews:
        client.log_image(run_id, image_grid(previews), artifact_file=f"{folder}/{kind}_samples.png")
    log.info("logged %s to MLflow run %s at step %d (%s)", kind, run_id, step, tracking_uri)
    return {"tracking_uri": tracking_uri, "run_id": run_id}


def _training_run(client, meta: dict[str, Any]) -> str | None:
    run_id = meta.get("mlflow_run_id")
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except Exception as err:  # noqa: BLE001 - deleted, or another tracking server: use an eval run
        log.warning("training run %s not found (%s); logging to an eval run", run_id, type(err).__name__)
        return None
    return run_id if run.info.lifecycle_stage == "active" else None


def _eval_run(client, experiment: str, eval_of: str, meta: dict[str, Any], tracking_uri: str) -> str:
    """The eval run of ``eval_of`` (found by tag), created on first use."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        artifact_location = None
        if tracking_uri.startswith("sqlite:///"):
            from pathlib import Path

            artifact_location = (Path(tracking_uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
        experiment_id = client.create_experiment(experiment, artifact_location=artifact_location)
    else:
        experiment_id = exp.experiment_id
    quoted = eval_of.replace("'", "\\'")
    found = client.search_runs([experiment_id], filter_string=f"tags.`{EVAL_OF_TAG}` = '{quoted}'", max_results=1)
    if found:
        return found[0].info.run_id
    tags = {RUN_KIND_TAG: "eval", EVAL_OF_TAG: eval_of}
    if meta.get("mlflow_run_id"):
        tags[TRAINING_RUN_TAG] = str(meta["mlflow_run_id"])
    name = f"eval-{meta.get('run_name') or eval_of.rstrip('/').rsplit('/', 1)[-1]}"
    return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


def _log_param(client, run_id: str, key: str, value: str) -> None:
    """Params cannot change once set: a different value (e.g. a new reference) becomes a tag."""
    existing = client.get_run(run_id).data.params.get(key)
    if existing is None:
        client.log_param(run_id, key, value)
    elif existing != value:
        log.warning("%s was %s in this run and is now %s; recorded as tag %s:latest", key, existing, value, key)
        client.set_tag(run_id, f"{key}:latest", value)

"""MLflow logging: the driver opens (or re-opens) the run, rank 0 logs metrics and images to it.

One run per ``output_dir``: its id is kept in ``<run_dir>/mlflow_run.json``, so a resumed job and
Ray's restarts after a failure keep logging to the same run, and the curves stay continuous.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cluster import storage
from trainer.config import flatten, redact

RUN_FILE = "mlflow_run.json"


@dataclass
class RunRef:
    tracking_uri: str
    run_id: str
    experiment_id: str


def resolve_tracking_uri(configured: str | None) -> str:
    """Config value, else ``$MLFLOW_TRACKING_URI``, else a local SQLite store under ./mlruns."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path("mlruns").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _experiment_id(client, name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:"):
        # A file store's default artifact root is relative to the CWD, which Ray workers do not share.
        artifact_location = (Path(tracking_uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def open_run(cfg: Any, run_dir: str, tracking_uri: str, experiment: str, tags: dict[str, str]) -> RunRef:
    """Re-open the run recorded in ``run_dir`` or create one; log the flattened config as params."""
    from mlflow.entities import Param

    client = _client(tracking_uri)
    record_url = storage.join(run_dir, RUN_FILE)
    if storage.exists(record_url):
        saved = json.loads(storage.read_text(record_url))
        if saved.get("tracking_uri") == tracking_uri:
            try:
                run = client.get_run(saved["run_id"])
                if run.info.lifecycle_stage == "active":
                    client.update_run(saved["run_id"], status="RUNNING")
                    return RunRef(tracking_uri, saved["run_id"], run.info.experiment_id)
            except Exception:  # noqa: BLE001 - the run was deleted or the store was reset: start anew
                pass
    experiment_id = _experiment_id(client, experiment, tracking_uri)
    run = client.create_run(experiment_id, run_name=tags.get("run_name"), tags=tags)
    params = [Param(k, v) for k, v in flatten(cfg).items()]
    for i in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    ref = RunRef(tracking_uri, run.info.run_id, experiment_id)
    storage.write_text(record_url, json.dumps(asdict(ref), indent=2))
    return ref


def finish_run(ref: RunRef, status: str) -> None:
    _client(ref.tracking_uri).set_terminated(ref.run_id, status=status)


class Tracker:
    """Rank-0 logger. Every method is a no-op when tracking is off (``ref`` is None)."""

    def __init__(self, ref: RunRef | None) -> None:
        self.ref = ref
        self.client = _client(ref.tracking_uri) if ref else None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.client:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if np.isfinite(v)]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.ref.run_id, metrics=batch[i:i + 1000])

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        if self.client:
            self.client.log_image(self.ref.run_id, image, artifact_file=artifact_file)

    def set_tag(self, key: str, value: str) -> None:
        if self.client:
            self.client.set_tag(self.ref.run_id, key, redact(str(value)))


def image_grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """Stack rows of images (each row: N x H x W x 3 uint8) into one uint8 grid image."""
    rows = [np.asarray(r) for r in rows]
    n = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[1:3]
    grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y:y + h, x:x + w] = img
    return grid


def write_png(url: str, image: np.ndarray) -> str:
    """Encode a uint8 HxWx3 image as PNG and write it to ``url`` (local or s3://); returns ``url``."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    storage.write_bytes(url, buffer.getvalue())
    return url


def to_uint8_images(images) -> np.ndarray:
    """float NCHW in [0,1] -> uint8 NHWC (round to nearest)."""
    import torch

    images = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()

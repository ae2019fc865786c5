"""The demo pipeline at its smallest, end to end on the real stack (local Ray, DeepSpeed, MLflow
SQLite store): every stage's outputs exist and are sane, and a second run resumes instead of redoing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

TOKENIZER_STEPS, GENERATOR_STEPS = 40, 30


def test_demo_pipeline_end_to_end_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    from cluster.demo import DemoConfig, run_demo
    from data_prep import manifest
    from trainer.models import load_generator, load_tokenizer
    from trainer.token_data import load_token_dataset

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = DemoConfig(workdir=str(tmp_path / "demo"), tokenizer_steps=TOKENIZER_STEPS, generator_steps=GENERATOR_STEPS,
                     train_per_class=6, val_per_class=2, samples_per_class=2, progress=False,
                     tokenizer_overrides=["trainer.log_every=5", "trainer.checkpoint_every=20"],
                     generator_overrides=["trainer.log_every=5"])
    summary = run_demo(cfg)
    store = Path(summary["store"])

    # Shards: every usable image once; the broken demo files are in the rejected manifest.
    train_rows = manifest.read_table(manifest.samples_url(str(store / "shards"), "train")).num_rows
    rejected = manifest.read_table(manifest.rejected_url(str(store / "shards"), "train")).num_rows
    assert train_rows >= 6 * 6 - 3 and rejected >= 1

    # Tokenizer: finite losses that fell, checkpoints, and an export that reloads and round-trips.
    client = MlflowClient(summary["mlflow"])
    runs = {}
    for stage in ("tokenizer", "generator"):
        run_id = json.loads((store / "runs" / stage / "mlflow_run.json").read_text())["run_id"]
        runs[stage] = client.get_run(run_id)
        losses = [m.value for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)]
        assert losses and all(math.isfinite(v) for v in losses), stage
        assert losses[-1] < losses[0], (stage, losses)
        assert runs[stage].info.status == "FINISHED" and runs[stage].data.params["stage"] == stage
    assert {"eval/psnr", "eval/ssim"} <= set(runs["tokenizer"].data.metrics)
    tokenizer = load_tokenizer(summary["tokenizer_export"])
    assert (store / "runs" / "tokenizer" / "checkpoints" / f"step_{TOKENIZER_STEPS:09d}" / "COMPLETE").exists()

    # Token shards: one row per training image and per flip, ids inside the codebook.
    tokens = load_token_dataset(str(store / "tokens"))
    assert len(tokens) == 2 * train_rows and int(tokens.tokens.max()) < tokenizer.config.codebook_size
    assert tokens.tokens.shape[1] == tokenizer.config.num_latent_tokens

    # Samples: the ADM layout, one per requested class and index.
    generator = load_generator(summary["generator_export"])
    with np.load(summary["samples_npz"]) as npz:
        samples, labels = npz["arr_0"], npz["labels"]
    size = tokenizer.config.image_size
    assert samples.shape == (2 * 6, size, size, 3) and samples.dtype == np.uint8 and samples.std() > 0
    assert len(set(labels.tolist())) == 6 and generator.config.image_seq_len == tokenizer.config.num_latent_tokens
    assert Path(summary["samples_grid"]).stat().st_size > 0

    # A second run finds every step done: no training step is redone, no checkpoint rewritten.
    checkpoints = sorted((store / "runs").glob("*/checkpoints/step_*/COMPLETE"))
    mtimes = [p.stat().st_mtime_ns for p in checkpoints]
    capsys.readouterr()
    again = run_demo(cfg)
    out = capsys.readouterr().out
    assert "tokenizer: finished earlier" in out and "generator: finished earlier" in out
    assert "images: present" in out and "samples: present" in out
    assert "(0 written, 1 already complete)" in out  # shards and token shards re-checked, none rewritten
    assert sorted((store / "runs").glob("*/checkpoints/step_*/COMPLETE")) == checkpoints
    assert [p.stat().st_mtime_ns for p in checkpoints] == mtimes
    assert "sample" not in again["steps_s"]

"""The demo pipeline at its smallest, end to end on the real stack (local Ray, DeepSpeed, MLflow
SQLite store): every stage's outputs exist and are sane, both runs carry their quality metrics in
MLflow (what the compare page shows) and the demo's summary reports the same figures, a second run
resumes instead of redoing, and the samples' GAN-test accuracy beats chance by a margin that a
generator ignoring its labels does not reach: the test trains that control too (every label dropped,
same tokens, same sampling and scoring) and asserts that it falls short.

The margin: a generator whose samples do not depend on the label scores 1/6 in expectation, whatever
it draws (the labels are balanced), and over N samples its accuracy has a standard deviation of at
most sqrt(1/6 x 5/6 / N); the test asks for 4 of them above chance. Measured (2 cores): the demo's
generator 0.82, the control 0.13, with the threshold at 0.30 (N = 120); at 300/150 steps the demo's
generator had 0.33, so the test sits at 500/200."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

TOKENIZER_STEPS, GENERATOR_STEPS = 500, 200
CLASSES, TRAIN_PER_CLASS, GAN_TEST_PER_CLASS = 6, 10, 20
CHANCE = 1 / CLASSES
BEATS_CHANCE = CHANCE + 4 * math.sqrt(CHANCE * (1 - CHANCE) / (CLASSES * GAN_TEST_PER_CLASS))


def _gan_test(client, run_dir: Path) -> tuple[float, dict[str, float]]:
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    metrics = client.get_run(run_id).data.metrics
    return metrics["eval/gan_test"], {k: v for k, v in metrics.items() if k.startswith("eval/gan_test_class/")}


def test_demo_pipeline_end_to_end_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    from cluster.demo import DemoConfig, run_demo
    from data_prep import manifest
    from trainer.models import load_generator, load_tokenizer
    from trainer.token_data import load_token_dataset

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = DemoConfig(workdir=str(tmp_path / "demo"), tokenizer_steps=TOKENIZER_STEPS, generator_steps=GENERATOR_STEPS,
                     train_per_class=TRAIN_PER_CLASS, val_per_class=4, samples_per_class=2,
                     gan_test_samples_per_class=GAN_TEST_PER_CLASS, progress=False,
                     tokenizer_overrides=["trainer.log_every=50", "trainer.checkpoint_every=250"],
                     generator_overrides=["trainer.log_every=50", "trainer.checkpoint_every=100"])
    summary = run_demo(cfg)
    store = Path(summary["store"])

    # Shards: every usable image once; the broken demo files are in the rejected manifest.
    train_rows = manifest.read_table(manifest.samples_url(str(store / "shards"), "train")).num_rows
    rejected = manifest.read_table(manifest.rejected_url(str(store / "shards"), "train")).num_rows
    assert train_rows >= CLASSES * TRAIN_PER_CLASS - 3 and rejected >= 1

    # Both runs: finite losses that fell, and their quality metrics where MLflow compares runs.
    client = MlflowClient(summary["mlflow"])
    runs = {}
    for stage in ("tokenizer", "generator"):
        run_id = json.loads((store / "runs" / stage / "mlflow_run.json").read_text())["run_id"]
        runs[stage] = client.get_run(run_id)
        losses = [m.value for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)]
        assert losses and all(math.isfinite(v) for v in losses), stage
        assert losses[-1] < losses[0], (stage, losses)
        assert runs[stage].info.status == "FINISHED" and runs[stage].data.params["stage"] == stage
    tokenizer_metrics, generator_metrics = runs["tokenizer"].data.metrics, runs["generator"].data.metrics
    assert {"eval/psnr", "eval/ssim", "eval/codebook_usage"} <= set(tokenizer_metrics)
    assert 0 < tokenizer_metrics["eval/codebook_usage"] <= 1 and 0 < tokenizer_metrics["eval/ssim"] <= 1
    assert summary["evaluation"]["tokenizer"]["eval/psnr"] == tokenizer_metrics["eval/psnr"]
    tokenizer = load_tokenizer(summary["tokenizer_export"])
    assert (store / "runs" / "tokenizer" / "checkpoints" / f"step_{TOKENIZER_STEPS:09d}" / "COMPLETE").exists()

    # The generator run: GAN-test accuracy overall and per class (one entry per demo class, each a
    # share of GAN_TEST_PER_CLASS samples), next to the classifier's own accuracy on real images.
    accuracy, per_class = _gan_test(client, store / "runs" / "generator")
    assert len(per_class) == CLASSES and 0 < generator_metrics["eval/gan_test_real"] <= 1
    assert all(round(v * GAN_TEST_PER_CLASS, 6).is_integer() for v in per_class.values()), per_class
    assert accuracy == pytest.approx(sum(per_class.values()) / CLASSES)
    assert summary["evaluation"]["generator"]["eval/gan_test"] == accuracy

    # Token shards: one row per training image and per flip, ids inside the codebook.
    tokens = load_token_dataset(str(store / "tokens"))
    assert len(tokens) == 2 * train_rows and int(tokens.tokens.max()) < tokenizer.config.codebook_size
    assert tokens.tokens.shape[1] == tokenizer.config.num_latent_tokens

    # Samples: the ADM layout, one per requested class and index.
    generator = load_generator(summary["generator_export"])
    with np.load(summary["samples_npz"]) as npz:
        samples, labels = npz["arr_0"], npz["labels"]
    size = tokenizer.config.image_size
    assert samples.shape == (2 * CLASSES, size, size, 3) and samples.dtype == np.uint8 and samples.std() > 0
    assert len(set(labels.tolist())) == CLASSES and generator.config.image_seq_len == tokenizer.config.num_latent_tokens
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
    assert "sample" not in again["steps_s"] and "eval_tokenizer" not in again["steps_s"]
    assert "generator evaluation: logged earlier for this export, skipped" in out
    assert again["evaluation"] == summary["evaluation"]

    # The label-ignoring control: a generator trained with every label dropped (an unconditional
    # model) on the same tokens, sampled and scored as the demo's. The demo's generator passes the
    # margin; the control, at chance in expectation, must not.
    capsys.readouterr()
    run_demo(replace(cfg, generator_name="no-labels",
                     generator_overrides=[*cfg.generator_overrides, "model.class_label_dropout=1.0"]))
    out = capsys.readouterr().out
    assert "tokenizer: finished earlier" in out and (store / "samples-no-labels" / "samples.npz").exists()
    control, _ = _gan_test(client, store / "runs" / "no-labels")
    print(f"\nGAN-test accuracy: demo generator {accuracy:.3f}, labels dropped {control:.3f}, "
          f"threshold {BEATS_CHANCE:.3f} (chance {CHANCE:.3f})")
    assert accuracy > BEATS_CHANCE, (accuracy, per_class)
    assert control < BEATS_CHANCE, control

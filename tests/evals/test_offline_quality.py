"""A reconstruction eval without Inception weights (eval.fid=false): PSNR, SSIM and codebook usage from
a real Ray pool (two workers, chunks of 4) equal the same numbers computed here image by image, and
reach the tokenizer's MLflow run; nothing asks for the feature network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.evals.conftest import eval_config
from tests.evals.test_checkpoints import IMAGE_SIZE, tiny_tokenizer


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_prep.make_demo_data import make_demo_tree
    from tests.reader.conftest import build_shards

    root = tmp_path_factory.mktemp("offline-quality")
    tree = make_demo_tree(root / "tree", classes=3, train_per_class=1, val_per_class=5, min_size=40, max_size=80,
                          quirks=False, seed=4)
    return build_shards(tree.root, root / "shards", "val", samples_per_shard=8)


def test_reconstruction_without_fid_equals_per_image_computation(ray_local, mlflow_server, val_shards: Path,
                                                                 tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from evals.jobs import evaluate_and_log, load_checkpoint
    from evals.quality import psnr, ssim
    from trainer.checkpoint import write_export
    from trainer.data import eval_batches
    from trainer.models import tokenizer_config_to_json

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("offline-quality")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("offline-quality")
    run_id = client.create_run(experiment_id, run_name="tokenizer").info.run_id
    tokenizer = tiny_tokenizer(3)
    url = write_export(str(tmp_path / "tok"), 40, tokenizer.state_dict(), tokenizer_config_to_json(tokenizer.config),
                       {"stage": "tokenizer", "mlflow_run_id": run_id, "mlflow_tracking_uri": mlflow_server})

    cfg = eval_config("eval.kind=reconstruction", f"eval.checkpoint={url}", f"eval.data={val_shards}/val-*.tar",
                      f"eval.image_size={IMAGE_SIZE}", "eval.fid=false", "eval.num_workers=2", "eval.chunk_size=4",
                      "eval.batch_size=4", "eval.progress=false", f"mlflow.tracking_uri={mlflow_server}")
    result = evaluate_and_log(cfg, load_checkpoint(url))
    assert result["fid"] is None and result["count"] == 15 and result["protocol"]["feature_network"] is None

    # Here, on one thread like each worker: reconstructions rounded to uint8 as the pool scores them.
    # Other batches than the pool's can move a float by its last bit and so a pixel by one uint8 level
    # (~3e-5 of the PSNR of these random-weight reconstructions): hence the tolerance.
    psnrs, ssims, ids = [], [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for batch in eval_batches(f"{val_shards}/val-*.tar", batch_size=4, image_size=IMAGE_SIZE, draft=False):
            with torch.no_grad():
                tokens = tokenizer.encode(batch.images)
                recon = tokenizer.decode_tokens(tokens).clamp(0, 1).mul(255).round().div(255)
            psnrs.extend(psnr(recon, batch.images).tolist())
            ssims.extend(ssim(recon, batch.images).tolist())
            ids.extend(tokens.flatten().tolist())
    finally:
        torch.set_num_threads(threads)
    assert len(psnrs) == 15
    assert result["psnr"] == pytest.approx(np.mean(psnrs), rel=2e-4)
    assert result["ssim"] == pytest.approx(np.mean(ssims), rel=2e-4)
    assert result["codebook_usage"] == len(set(ids)) / tokenizer.config.codebook_size
    counts = np.bincount(ids, minlength=tokenizer.config.codebook_size)
    p = counts[counts > 0] / counts.sum()
    assert result["codebook_perplexity"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))

    # Logged to the tokenizer's own run at the export's step: the quality metrics, no rFID.
    metrics = client.get_run(run_id).data.metrics
    assert result["mlflow"]["run_id"] == run_id
    assert metrics["eval/psnr"] == pytest.approx(result["psnr"]) and metrics["eval/ssim"] == pytest.approx(result["ssim"])
    assert metrics["eval/codebook_usage"] == pytest.approx(result["codebook_usage"])
    assert "eval/rfid" not in metrics
    assert [m.step for m in client.get_metric_history(run_id, "eval/codebook_usage")] == [40]

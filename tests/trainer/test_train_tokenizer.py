"""stage=tokenizer end to end on a real local Ray, DeepSpeed engines over gloo, a real MLflow server.

2 workers, ZeRO-2 and ZeRO-3, on 16 images: the loss falls; an interrupted run resumed from its
checkpoint logs the same losses as an uninterrupted one; the export (gathered from ZeRO-3 shards)
equals the consolidation of the checkpoint's fp32 fragments and reconstructs identically.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.trainer.conftest import metric_by_step, mlflow_run_id, tokenizer_overrides, train_tokenizer

pytestmark = pytest.mark.usefixtures("ray_local")


def _complete_steps(run_dir: Path, kind: str) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in (run_dir / kind).glob("step_*/COMPLETE"))


def test_zero2_resume_equals_uninterrupted_and_logs_to_mlflow(tiny_shards, tmp_path, mlflow_server) -> None:
    from mlflow.tracking import MlflowClient

    common = ["deepspeed.zero_stage=2", "trainer.max_steps=12", "trainer.checkpoint_every=6",
              "trainer.image_log_every=6", f"mlflow.tracking_uri={mlflow_server}", "mlflow.experiment=test-train"]
    straight = tmp_path / "straight"
    train_tokenizer(tokenizer_overrides(tiny_shards, straight, *common))
    resumed = tmp_path / "resumed"
    # First job stops at step 6 (as a time-limited allocation would); the same command goes on.
    train_tokenizer(tokenizer_overrides(tiny_shards, resumed, *common, "trainer.stop_at_step=6"))
    assert _complete_steps(resumed, "checkpoints") == [6]
    train_tokenizer(tokenizer_overrides(tiny_shards, resumed, *common))
    assert _complete_steps(resumed, "checkpoints") == [6, 12]

    straight_loss = metric_by_step(mlflow_server, mlflow_run_id(straight), "train/loss")
    resumed_loss = metric_by_step(mlflow_server, mlflow_run_id(resumed), "train/loss")
    assert sorted(straight_loss) == list(range(1, 13)) and sorted(resumed_loss) == list(range(1, 13))
    for step in range(1, 13):
        assert resumed_loss[step] == pytest.approx(straight_loss[step], rel=1e-5, abs=1e-7), step
    # Overfitting 16 images: the loss falls.
    assert straight_loss[12] < 0.6 * straight_loss[1]

    client = MlflowClient(mlflow_server)
    run = client.get_run(mlflow_run_id(straight))
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["deepspeed.zero_stage"] == "2" and params["trainer.num_workers"] == "2"
    assert params["model.num_latent_tokens"] == "16" and params["tokenizer.recipe"] == "single_stage"
    for key in ("train/loss", "train/loss_l2", "train/lr", "train/grad_norm", "train/psnr", "train/codebook_usage",
                "train/codebook_entropy", "perf/images_per_s", "perf/step_time_s"):
        assert key in metrics, key
    assert 0 < metrics["train/codebook_usage"] <= 1
    assert tags["checkpoint"].endswith("checkpoints/step_000000012") and run.info.status == "FINISHED"
    previews = [a.path for a in client.list_artifacts(run.info.run_id, "previews")]
    assert previews == ["previews/step_000000006.png", "previews/step_000000012.png"]
    local = Path(client.download_artifacts(run.info.run_id, previews[0], str(tmp_path / "dl")))
    from PIL import Image

    with Image.open(local) as grid:  # 2 rows (inputs, reconstructions) of 32 px images
        assert grid.size[1] == 2 * (32 + 2) + 2
    # The resumed job kept logging into the same run.
    assert len({m.step for m in client.get_metric_history(mlflow_run_id(resumed), "train/loss")}) == 12


def test_zero3_loss_falls_and_export_equals_consolidated_checkpoint(tiny_shards, tmp_path, mlflow_server) -> None:
    from safetensors.torch import load_file

    from trainer.engine_state import consolidated_state_dict

    from trainer.models import build_tokenizer, load_tokenizer, tokenizer_config_from_json

    run_dir = tmp_path / "z3"
    cfg = train_tokenizer(tokenizer_overrides(
        tiny_shards, run_dir, "deepspeed.zero_stage=3", "trainer.max_steps=16", "trainer.checkpoint_every=8",
        "trainer.ema_decay=null", f"mlflow.tracking_uri={mlflow_server}", "mlflow.experiment=test-train"))
    loss = metric_by_step(mlflow_server, mlflow_run_id(run_dir), "train/loss")
    assert loss[16] < 0.6 * loss[1]
    assert _complete_steps(run_dir, "checkpoints") == [8, 16] and _complete_steps(run_dir, "exports") == [8, 16]
    log = json.loads((run_dir / "checkpoints" / "step_000000016" / "train_state.json").read_text())
    assert log["step"] == 16 and log["world_size"] == 2 and log["global_batch_size"] == 8

    export_dir = run_dir / "exports" / "step_000000016"
    exported = load_file(str(export_dir / "model.safetensors"))
    # The export gathers each parameter's ZeRO-3 partitions (all_gather of the working weights); the
    # checkpoint holds the fp32 master partitions each rank wrote: two independent paths to the weights.
    consolidated = consolidated_state_dict(run_dir / "checkpoints" / "step_000000016" / "model")
    model = build_tokenizer(cfg.model)
    params = {k for k, _ in model.named_parameters()}
    assert set(consolidated) == params and set(exported) == set(model.state_dict())  # + persistent buffers
    for key, value in consolidated.items():
        assert torch.equal(exported[key], value.to(exported[key].dtype)), key

    # The export reloads through trainer.models and reconstructs exactly like the consolidated weights.
    reloaded = load_tokenizer(str(export_dir)).eval()
    reference = build_tokenizer(tokenizer_config_from_json(json.loads((export_dir / "config.json").read_text())))
    reference.load_state_dict(consolidated, strict=False)  # parameters from the checkpoint, buffers as built
    reference.eval()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(images)[0], reference(images)[0])
        assert torch.equal(reloaded.encode(images), reference.encode(images))
    assert cfg.model.num_latent_tokens == reloaded.config.num_latent_tokens

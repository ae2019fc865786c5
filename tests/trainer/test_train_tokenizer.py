"""stage=tokenizer end to end on a real local Ray, DeepSpeed engines over gloo, a real MLflow server.

2 workers, ZeRO-3, on 16 images: the loss falls; the export (gathered from ZeRO-3 shards) equals the
consolidation of the checkpoint's fp32 fragments and reconstructs identically. (A resume at the same
size is the generator's, in tests/trainer/test_train_generator.py; the run's MLflow record is checked in
tests/trainer/test_resize.py.)
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

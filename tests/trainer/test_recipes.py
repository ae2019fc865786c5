"""The paper's two tokenizer stages through the real trainer, chained as users run them: stage 1
distils a (random, same-architecture) MaskGIT-VQGAN teacher's proxy codes; stage 2 starts from stage
1's export with frozen encoder and quantizer and trains the decoder and pixel decoder with L2 +
LPIPS/ConvNeXt perceptual (random backbone files) + GAN from step 0 with its own discriminator engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.trainer.conftest import metric_by_step, mlflow_run_id, train_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

# A tiny legacy geometry: 32 px, patch 4 = the pixel decoder's x4 downsampling (channel_mult of 3 levels).
LEGACY = ["data.image_size=32", "model.image_size=32", "model.patch_size=4", "model.num_latent_tokens=8",
          "model.codebook_size=64", "model.token_size=8", "model.vit_enc_model_size=null",
          "model.vit_dec_model_size=null", "model.vit_enc_width=64", "model.vit_enc_num_layers=1",
          "model.vit_enc_num_heads=2", "model.vit_dec_width=64", "model.vit_dec_num_layers=1",
          "model.vit_dec_num_heads=2", "model.pixel_decoder.hidden_channels=32",
          "model.pixel_decoder.channel_mult=[1,1,2]", "model.pixel_decoder.num_res_blocks=1",
          "model.pixel_decoder.z_channels=32", "model.pixel_decoder.codebook_size=128"]


def _common(shards: Path, run_dir: Path, mlflow_uri: str) -> list[str]:
    return [f"data.train_shards={shards}", f"output_dir={run_dir}", "data.loader_workers=0", "data.shuffle_buffer=16",
            "trainer.num_workers=1", "trainer.batch_size_per_worker=4", "trainer.max_steps=6", "trainer.log_every=1",
            "trainer.checkpoint_every=6", "trainer.image_log_every=6", "optim.warmup_steps=1",
            f"mlflow.tracking_uri={mlflow_uri}", "mlflow.experiment=test-recipes", *LEGACY]


def test_stage1_proxy_codes_then_stage2_decoder_finetune_with_gan(tiny_shards, tmp_path, mlflow_server) -> None:
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from trainer.losses import save_random_backbones
    from trainer.models import PixelDecoderConfig, build_maskgit_vqgan, load_tokenizer

    torch.manual_seed(0)
    teacher = build_maskgit_vqgan(PixelDecoderConfig(hidden_channels=32, channel_mult=[1, 1, 2], num_res_blocks=1,
                                                     z_channels=32, codebook_size=128))
    teacher_file = tmp_path / "maskgit-vqgan-random.bin"
    torch.save(teacher.state_dict(), teacher_file)

    stage1 = tmp_path / "stage1"
    train_tokenizer(["tokenizer.recipe=proxy_codes", f"tokenizer.teacher_weights={teacher_file}",
                     *_common(tiny_shards, stage1, mlflow_server)])
    accuracy = metric_by_step(mlflow_server, mlflow_run_id(stage1), "train/proxy_code_accuracy")
    assert sorted(accuracy) == list(range(1, 7)) and all(0 <= a <= 1 for a in accuracy.values())
    export1 = stage1 / "exports" / "step_000000006"
    assert not any(k.startswith("pixel_decoder.") for k in load_file(str(export1 / "model.safetensors")))

    backbones = save_random_backbones(str(tmp_path / "backbones"))
    stage2_args = ["tokenizer.recipe=decoder_finetune", f"tokenizer.init_from={export1}",
                   f"tokenizer.teacher_weights={teacher_file}", "tokenizer.losses.discriminator_start=0",
                   "tokenizer.discriminator.hidden_channels=32", "tokenizer.discriminator.num_stages=2",
                   f"tokenizer.losses.perceptual.vgg16_weights={backbones['vgg16_weights']}",
                   f"tokenizer.losses.perceptual.convnext_weights={backbones['convnext_weights']}",
                   "trainer.ema_decay=null", "trainer.global_batch_size=4", "deepspeed.zero_stage=2"]
    # Stage 2, resized as it trains: 2 workers to step 3, resumed on 1 worker to step 6. Both engines
    # come back re-partitioned (tests/trainer/test_engine_state.py checks their state exactly), and so
    # does the LeCam EMA: at step 4 it must be decay x (step 3's, saved by 2 workers) + (1 - decay) x
    # step 4's mean logits. (Losses are not compared with an unresized run's: the LeCam term is a
    # function of each rank's own mean logits, so it changes with the worker count by definition.)
    stage2, decay = tmp_path / "stage2", 0.5
    stage2_run_args = [*stage2_args, *_common(tiny_shards, stage2, mlflow_server),
                       f"tokenizer.losses.lecam_ema_decay={decay}"]
    train_tokenizer([*stage2_run_args, "trainer.num_workers=2", "trainer.stop_at_step=3",
                     "trainer.checkpoint_every=3"])
    assert (stage2 / "checkpoints" / "step_000000003" / "discriminator").is_dir()
    train_tokenizer(stage2_run_args)
    stage2_id = mlflow_run_id(stage2)
    assert sorted(metric_by_step(mlflow_server, stage2_id, "train/loss_discriminator")) == list(range(1, 7))
    workers = metric_by_step(mlflow_server, stage2_id, "perf/workers")
    assert [workers[s] for s in (3, 4)] == [2.0, 1.0]
    for side in ("real", "fake"):
        ema = metric_by_step(mlflow_server, stage2_id, f"train/lecam_ema_{side}")
        logits = metric_by_step(mlflow_server, stage2_id, f"train/d_logits_{side}")
        assert ema[3] != 0.0
        assert ema[4] == pytest.approx(decay * ema[3] + (1 - decay) * logits[4], rel=1e-5, abs=1e-7), side
    run = MlflowClient(mlflow_server).get_run(stage2_id)
    for key in ("train/loss_l2", "train/loss_perceptual", "train/loss_gan", "train/loss_discriminator",
                "train/psnr"):
        assert key in run.data.metrics, key
    assert run.data.metrics["train/loss_gan"] != 0.0
    # Both engines are checkpointed; the frozen encoder/quantizer are exactly stage 1's.
    checkpoint = stage2 / "checkpoints" / "step_000000006"
    assert (checkpoint / "model").is_dir() and (checkpoint / "discriminator").is_dir()
    first, second = load_file(str(export1 / "model.safetensors")), load_file(
        str(stage2 / "exports" / "step_000000006" / "model.safetensors"))
    frozen = [k for k in first if k.startswith(("encoder.", "quantize.", "latent_tokens"))]
    assert frozen and all(torch.equal(first[k], second[k]) for k in frozen)
    assert any(not torch.equal(first[k], second[k]) for k in first if k.startswith("decoder."))
    model = load_tokenizer(str(stage2 / "exports" / "step_000000006"))
    assert model.outputs_pixels and json.loads((stage2 / "exports" / "step_000000006" / "config.json").read_text())

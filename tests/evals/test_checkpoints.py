"""Checkpoint evaluations end to end: rFID of a tiny random tokenizer export over real shards, checked
against torch-fidelity on the same images; cached reference statistics; MLflow metrics at the
checkpoint's step in the training run; watch mode evaluating each complete export once across restarts."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cluster import storage
from tests.evals.conftest import eval_config, write_shard

IMAGE_SIZE = 32
VAL_IMAGES = 12


def tiny_tokenizer(seed: int):
    from trainer.models import PixelDecoderConfig, TiTokConfig, build_tokenizer

    torch.manual_seed(seed)
    cfg = TiTokConfig(image_size=IMAGE_SIZE, patch_size=8, num_latent_tokens=4, codebook_size=16, token_size=4,
                      vit_enc_model_size=None, vit_dec_model_size=None, vit_enc_width=32, vit_enc_num_layers=1,
                      vit_enc_num_heads=2, vit_dec_width=32, vit_dec_num_layers=1, vit_dec_num_heads=2,
                      pixel_decoder=PixelDecoderConfig(hidden_channels=32, channel_mult=[1, 1, 1, 1], num_res_blocks=1,
                                                       z_channels=8, codebook_size=32))
    return build_tokenizer(cfg).eval()


def write_tokenizer_export(run_dir: str, step: int, seed: int, meta: dict, complete: bool = True) -> str:
    """An export as the trainer writes it (trainer.checkpoint.write_export), optionally unfinished."""
    from trainer.checkpoint import MARKER, write_export
    from trainer.models import tokenizer_config_to_json

    model = tiny_tokenizer(seed)
    url = write_export(run_dir, step, model.state_dict(), tokenizer_config_to_json(model.config),
                       {"stage": "tokenizer", "run_name": Path(run_dir).name, **meta})
    if not complete:
        storage.delete(storage.join(url, MARKER))
    return url


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("val")
    rng = np.random.default_rng(7)
    write_shard(str(folder / "val-000000.tar"), 0, VAL_IMAGES // 2, rng)
    write_shard(str(folder / "val-000001.tar"), 100, VAL_IMAGES - VAL_IMAGES // 2, rng)
    return str(folder)


def _recon_config(weights: str, data: str, *extra: str):
    return eval_config("eval.kind=reconstruction", f"eval.data={data}", f"eval.image_size={IMAGE_SIZE}",
                       "eval.num_workers=2", "eval.chunk_size=4", "eval.batch_size=4", "eval.preview_images=4",
                       f"eval.inception_weights={weights}", "eval.progress=false", *extra)


def _training_run(tracking_uri: str, name: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("titok-test-train") or None
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("titok-test-train")
    return client.create_run(experiment_id, run_name=name).info.run_id


def test_reconstruction_rfid_equals_torch_fidelity_and_lands_in_the_training_run(
        ray_local, mlflow_server, tmp_path, val_shards, inception_weights) -> None:
    import torch_fidelity
    from mlflow.tracking import MlflowClient

    from evals.jobs import evaluate_and_log, load_checkpoint
    from trainer.data import eval_batches

    run_id = _training_run(mlflow_server, "recon")
    run_dir = str(tmp_path / "run")
    url = write_tokenizer_export(run_dir, 100, seed=0, meta={"mlflow_run_id": run_id, "mlflow_tracking_uri": mlflow_server})
    cfg = _recon_config(inception_weights, val_shards, f"output_dir={run_dir}")
    result = evaluate_and_log(cfg, load_checkpoint(url))

    assert result["count"] == VAL_IMAGES and result["step"] == 100
    assert result["protocol"]["metric"] == f"rFID-{VAL_IMAGES}"
    assert result["protocol"]["reference"]["count"] == VAL_IMAGES
    assert 0 < result["ssim"] <= 1 and np.isfinite(result["psnr"])

    # Independently: decode the shards with the reader, reconstruct in this process, save PNGs and ask
    # torch-fidelity (one thread, like the workers) for the FID between the two folders.
    tokenizer = tiny_tokenizer(0)
    originals, recons = tmp_path / "orig", tmp_path / "recon"
    originals.mkdir(), recons.mkdir()
    index = 0
    for batch in eval_batches(val_shards, batch_size=4, image_size=IMAGE_SIZE, draft=False):
        with torch.no_grad():
            out = tokenizer.decode_tokens(tokenizer.encode(batch.images))
        for image, recon in zip(batch.images, out):
            to_png = lambda t: t.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # noqa: E731
            Image.fromarray(to_png(image)).save(originals / f"{index:04d}.png")
            Image.fromarray(to_png(recon)).save(recons / f"{index:04d}.png")
            index += 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = torch_fidelity.calculate_metrics(
            input1=str(recons), input2=str(originals), fid=True, cuda=False, batch_size=4, cache=False,
            save_cpu_ram=True, verbose=False, feature_extractor_weights_path=inception_weights)
    finally:
        torch.set_num_threads(threads)
    assert index == VAL_IMAGES
    assert result["rfid"] == pytest.approx(expected["frechet_inception_distance"], rel=1e-6)

    # The reference statistics (the originals') were cached next to the shards, for the next checkpoint.
    from evals.reference import load_reference
    from evals.sources import resolve_input

    data = resolve_input(val_shards, chunk_size=4, image_size=IMAGE_SIZE)
    cached = load_reference(data, result["protocol"]["weights_sha256"], None)
    assert cached is not None and cached.stats_id == result["protocol"]["reference"]["stats_id"]

    # MLflow: in the training run, at the checkpoint's step, with the protocol and a sample grid.
    assert result["mlflow"]["run_id"] == run_id
    client = MlflowClient(mlflow_server)
    history = client.get_metric_history(run_id, "eval/rfid")
    assert [(m.step, m.value) for m in history] == [(100, pytest.approx(result["rfid"]))]
    assert [m.step for m in client.get_metric_history(run_id, "eval/psnr")] == [100]
    params = client.get_run(run_id).data.params
    assert params["eval/reconstruction/reference_stats_id"] == result["protocol"]["reference"]["stats_id"]
    artifacts = {a.path for a in client.list_artifacts(run_id, "eval/step_000000100")}
    assert {"eval/step_000000100/reconstruction_samples.png", "eval/step_000000100/reconstruction_result.json"} <= artifacts
    local = client.download_artifacts(run_id, "eval/step_000000100/reconstruction_result.json", str(tmp_path))
    logged = json.loads(Path(local).read_text())
    assert logged["protocol"]["protocol_id"] == result["protocol"]["protocol_id"]


def test_incomplete_or_stage1_exports_are_refused(tmp_path, val_shards, inception_weights) -> None:
    from evals.jobs import evaluate_reconstruction, load_checkpoint
    from evals.sources import BadInputError
    from trainer.checkpoint import write_export
    from trainer.models import tokenizer_config_to_json

    unfinished = write_tokenizer_export(str(tmp_path / "run"), 5, seed=0, meta={}, complete=False)
    with pytest.raises(BadInputError, match="incomplete"):
        load_checkpoint(unfinished)
    stage1 = tiny_tokenizer(0).config
    stage1.finetune_decoder = False
    from trainer.models import build_tokenizer

    url = write_export(str(tmp_path / "run1"), 7, build_tokenizer(stage1).state_dict(), tokenizer_config_to_json(stage1),
                       {"stage": "tokenizer"})
    with pytest.raises(BadInputError, match="stage-1 tokenizer"):
        evaluate_reconstruction(_recon_config(inception_weights, val_shards, f"eval.checkpoint={url}",
                                              "mlflow.enabled=false"), load_checkpoint(url))


def test_watch_evaluates_each_complete_export_once_across_restarts(
        ray_local, mlflow_server, tmp_path, val_shards, inception_weights) -> None:
    from mlflow.tracking import MlflowClient

    from evals.watch import load_state, watch

    run_dir = str(tmp_path / "watched")
    run_id = _training_run(mlflow_server, "watched")
    meta = {"mlflow_run_id": run_id, "mlflow_tracking_uri": mlflow_server}
    write_tokenizer_export(run_dir, 100, seed=0, meta=meta)
    write_tokenizer_export(run_dir, 200, seed=1, meta=meta, complete=False)  # still being written
    cfg = _recon_config(inception_weights, val_shards, f"output_dir={run_dir}", "eval.watch=true",
                        "eval.poll_seconds=0.2", "eval.max_idle_polls=2")
    first = watch(cfg)
    assert [r["step"] for r in first] == [100]

    # The trainer finishes step 200 while a restarted watcher polls: only 200 is evaluated.
    from trainer.checkpoint import EXPORTS, mark_complete, step_name

    stop, evaluated = threading.Event(), threading.Event()
    seen: list[int] = []
    second: list[dict] = []
    forever = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_idle_polls=None))

    def on_result(result: dict) -> None:
        seen.append(result["step"])
        evaluated.set()

    watcher = threading.Thread(target=lambda: second.extend(watch(forever, stop=stop, on_result=on_result)))
    watcher.start()
    try:
        assert not evaluated.wait(1.0)  # polling, but 200 is not complete yet
        mark_complete(storage.join(run_dir, EXPORTS, step_name(200)))
        assert evaluated.wait(120)
    finally:
        stop.set()
        watcher.join(120)
    assert [r["step"] for r in second] == seen == [200]
    assert "cached" in second[0]["protocol"]["reference"]["source"]  # only the reconstructions were scored
    assert sorted(load_state(cfg)["done"]) == ["100", "200"]
    assert watch(cfg) == []  # nothing left: a third start evaluates nothing

    history = MlflowClient(mlflow_server).get_metric_history(run_id, "eval/rfid")
    assert sorted(m.step for m in history) == [100, 200]
    assert {m.step: m.value for m in history} == {100: pytest.approx(first[0]["rfid"]), 200: pytest.approx(second[0]["rfid"])}

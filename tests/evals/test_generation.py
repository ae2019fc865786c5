"""Generation eval end to end with tiny random models: the pool's samples (chunks of 5 on two
workers, seeds from the sample index) equal the same samples drawn in this process in other batches
(of the same sampling.batch_size), scored by torch-fidelity; the generator run's config names the
tokenizer; the FID-50k label only for 50,000."""

from __future__ import annotations


import pytest
import torch
from PIL import Image

from cluster import storage
from tests.evals.conftest import eval_config
from tests.evals.test_checkpoints import tiny_tokenizer

NUM_CLASSES, NUM_SAMPLES = 3, 12


def tiny_generator(seed: int):
    from trainer.models import GeneratorConfig, build_generator

    torch.manual_seed(seed)
    cfg = GeneratorConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          image_seq_len=4, condition_num_classes=NUM_CLASSES, codebook_size=16)
    return build_generator(cfg).eval()


def test_generation_fid_is_equal_torch_fidelity_on_the_same_samples(
        ray_local, mlflow_server, tmp_path, image_folders, inception_weights) -> None:
    import torch_fidelity
    import yaml
    from mlflow.tracking import MlflowClient

    from evals.jobs import evaluate_and_log, load_checkpoint
    from evals.worker import sample_label, sample_seed
    from trainer.checkpoint import write_export
    from trainer.models import generator_config_to_json, tokenizer_config_to_json
    from trainer.sample import SamplingConfig, sample_images

    tokenizer, generator = tiny_tokenizer(0), tiny_generator(1)
    tokenizer_url = write_export(str(tmp_path / "tok"), 50, tokenizer.state_dict(),
                                 tokenizer_config_to_json(tokenizer.config), {"stage": "tokenizer"})
    run_dir = tmp_path / "gen"
    url = write_export(str(run_dir), 300, generator.state_dict(), generator_config_to_json(generator.config),
                       {"stage": "generator", "run_name": "gen"})
    # The generator run's resolved config names its tokenizer (eval.tokenizer is then not needed).
    storage.write_text(str(run_dir / "config.yaml"), yaml.safe_dump({"generator": {"tokenizer": tokenizer_url}}))

    sampling = ["eval.sampling.num_steps=4", "eval.sampling.batch_size=4"]
    cfg = eval_config("eval.kind=generation", f"eval.checkpoint={url}", f"eval.reference={image_folders[1]}",
                      f"eval.num_samples={NUM_SAMPLES}", "eval.seed=3", "eval.num_workers=2", "eval.chunk_size=5",
                      "eval.batch_size=4", f"eval.inception_weights={inception_weights}", "eval.progress=false",
                      f"mlflow.tracking_uri={mlflow_server}", "mlflow.experiment=evals-generation", *sampling)
    result = evaluate_and_log(cfg, load_checkpoint(url))
    assert result["count"] == NUM_SAMPLES and result["protocol"]["metric"] == f"FID-{NUM_SAMPLES}"
    assert result["tokenizer"] == tokenizer_url and result["protocol"]["sampler"]["num_steps"] == 4

    # The same samples, batched differently in this process, written as PNGs and scored by torch-fidelity.
    settings = SamplingConfig(num_steps=4, batch_size=4)
    labels = torch.tensor([sample_label(i, NUM_CLASSES) for i in range(NUM_SAMPLES)])
    images = sample_images(generator, tokenizer, labels, [sample_seed(3, i) for i in range(NUM_SAMPLES)], settings)
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, image in enumerate(images.cpu().numpy()):
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = torch_fidelity.calculate_metrics(
            input1=str(folder), input2=image_folders[1], fid=True, isc=True, cuda=False, batch_size=4, cache=False,
            save_cpu_ram=True, verbose=False, feature_extractor_weights_path=inception_weights)
    finally:
        torch.set_num_threads(threads)
    assert result["fid"] == pytest.approx(expected["frechet_inception_distance"], rel=1e-6)
    assert result["is_mean"] == pytest.approx(expected["inception_score_mean"], rel=1e-6)

    # MLflow: an eval run for the generator run (no training run id in meta), at the export's step.
    client = MlflowClient(mlflow_server)
    run_id = result["mlflow"]["run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "eval/fid")] == [300]
    assert [m.step for m in client.get_metric_history(run_id, "eval/is")] == [300]
    assert "eval/fid_50k" not in client.get_run(run_id).data.metrics
    assert client.get_run(run_id).data.tags["titok.eval_of"] == str(run_dir)
    assert {a.path for a in client.list_artifacts(run_id, "eval/step_000000300")} >= {
        "eval/step_000000300/generation_samples.png"}

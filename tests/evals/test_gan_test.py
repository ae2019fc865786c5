"""GAN-test accuracy (evals/gan_test.py): the counting, the classifier and its cache, and the
generation eval without FID on a real Ray pool, checked against the same samples classified in
this process. No Inception weights anywhere: eval.fid=false must not need them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.evals.conftest import eval_config

CLASSES = 3


@pytest.fixture(scope="module")
def gan_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 demo classes (orange, starfish, volcano) x 16 training and 6 validation images, as shards with manifests."""
    from data_prep.make_demo_data import make_demo_tree
    from tests.reader.conftest import build_shards

    root = tmp_path_factory.mktemp("gan-test")
    tree = make_demo_tree(root / "tree", classes=CLASSES, train_per_class=16, val_per_class=6, min_size=40,
                          max_size=80, quirks=False, seed=11)
    build_shards(tree.root, root / "shards", "train", samples_per_shard=16)
    build_shards(tree.root, root / "shards", "val", samples_per_shard=16)
    return root / "shards"


def _settings(data: Path, cache: Path, **changes):
    from evals.schema import GanTestSettings

    return GanTestSettings(**{"data": str(data), "cache": str(cache), **changes})


def test_confusion_and_accuracies_equal_a_direct_count() -> None:
    from evals.gan_test import confusion_matrix, per_class_accuracy

    rng = np.random.default_rng(0)
    targets, predicted = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    targets[targets == 3] = 2  # class 3 never conditioned on: its accuracy is undefined
    confusion = confusion_matrix(torch.from_numpy(targets), torch.from_numpy(predicted), 4)
    for t in range(4):
        for p in range(4):
            assert confusion[t, p] == sum(1 for a, b in zip(targets, predicted) if a == t and b == p)
    accuracy = per_class_accuracy(confusion)
    for t in range(3):
        rows = targets == t
        assert accuracy[t] == pytest.approx((predicted[rows] == t).mean())
    assert np.isnan(accuracy[3])


def test_classifier_id_follows_the_shard_digests_and_settings(gan_shards: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_prep import manifest
    from data_prep.make_demo_data import DEMO_CLASSES
    from data_prep.wnids import wnid_to_label
    from evals.gan_test import classifier_spec

    spec = classifier_spec(_settings(gan_shards, tmp_path))
    expected = sorted((wnid_to_label()[c.wnid], c.wnid) for c in DEMO_CLASSES[:CLASSES])
    assert list(zip(spec.classes, spec.wnids)) == expected
    assert classifier_spec(_settings(gan_shards, tmp_path)).id == spec.id
    assert classifier_spec(_settings(gan_shards, tmp_path, epochs=31)).id != spec.id
    assert spec.url == str(tmp_path / spec.id)

    # Same shard names, one validation shard with another digest (re-sharded content): another classifier.
    copy = tmp_path / "copy"
    shutil.copytree(gan_shards, copy)
    table = manifest.read_table(manifest.shards_url(str(copy), "val"))
    digests = table.column("digest").to_pylist()
    table = table.set_column(table.schema.get_field_index("digest"), "digest", pa.array(["0" * 64] + digests[1:]))
    pq.write_table(table, manifest.shards_url(str(copy), "val"))
    assert classifier_spec(_settings(copy, tmp_path)).id != classifier_spec(_settings(gan_shards, tmp_path)).id


def test_classifier_learns_the_classes_and_is_trained_once(gan_shards: Path, tmp_path: Path) -> None:
    from evals.gan_test import (META_FILE, WEIGHTS_FILE, read_split, classifier_spec, confusion_matrix,
                                ensure_classifier, load_classifier, predict)

    spec = classifier_spec(_settings(gan_shards, tmp_path / "cache", epochs=20))
    info = ensure_classifier(spec)
    assert info.train_images == 16 * CLASSES and info.val_images == 6 * CLASSES
    assert info.real_accuracy >= 0.9, info  # the demo classes differ in colour and layout
    assert set(info.real_per_class) == set(spec.wnids) and info.chance == pytest.approx(1 / CLASSES)

    # The cached weights reproduce the recorded accuracy, independently recounted.
    model, cached = load_classifier(spec.url)
    images, targets = read_split(spec.split("val"), spec)
    confusion = confusion_matrix(targets, predict(model, images, spec.image_size), CLASSES)
    assert np.trace(confusion) / confusion.sum() == pytest.approx(info.real_accuracy)
    assert cached == info

    # A second request finds the cache: nothing is rewritten.
    files = [Path(spec.url) / WEIGHTS_FILE, Path(spec.url) / META_FILE]
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert ensure_classifier(spec) == info
    assert [f.stat().st_mtime_ns for f in files] == mtimes


def _tiny_pair(tmp_path: Path) -> tuple[str, str, object, object]:
    """A tiny random tokenizer (32 px) and generator over ImageNet's 1000 labels, exported."""
    import yaml

    from cluster import storage
    from tests.evals.test_checkpoints import tiny_tokenizer
    from trainer.checkpoint import write_export
    from trainer.models import GeneratorConfig, build_generator, generator_config_to_json, tokenizer_config_to_json

    tokenizer = tiny_tokenizer(0)
    torch.manual_seed(1)
    generator = build_generator(GeneratorConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=64, image_seq_len=4, condition_num_classes=1000,
                                                codebook_size=16)).eval()
    tokenizer_url = write_export(str(tmp_path / "tok"), 50, tokenizer.state_dict(),
                                 tokenizer_config_to_json(tokenizer.config), {"stage": "tokenizer"})
    run_dir = tmp_path / "gen"
    url = write_export(str(run_dir), 300, generator.state_dict(), generator_config_to_json(generator.config),
                       {"stage": "generator", "run_name": "gen"})
    storage.write_text(str(run_dir / "config.yaml"), yaml.safe_dump({"generator": {"tokenizer": tokenizer_url}}))
    return url, tokenizer_url, generator, tokenizer


def test_generation_without_fid_scores_the_pools_samples_like_this_process(
        ray_local, mlflow_server, gan_shards: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from evals.gan_test import SampleScorer, classifier_spec
    from evals.jobs import evaluate_and_log, evaluate_generation, load_checkpoint
    from evals.sources import BadInputError
    from trainer.config import ConfigError
    from trainer.sample import SamplingConfig, sample_images, sample_seed

    url, _, generator, tokenizer = _tiny_pair(tmp_path)
    cache = tmp_path / "classifiers"
    common = ["eval.kind=generation", f"eval.checkpoint={url}", "eval.fid=false", f"eval.gan_test.data={gan_shards}",
              f"eval.gan_test.cache={cache}", "eval.gan_test.epochs=5", "eval.image_size=32", "eval.progress=false",
              "eval.sampling.num_steps=4", "eval.sampling.batch_size=4", "eval.batch_size=4", "eval.seed=5"]
    # 13 samples in chunks of 5 on 2 workers: the classes get 5, 4 and 4 samples.
    cfg = eval_config(*common, "eval.num_samples=13", "eval.chunk_size=5", "eval.num_workers=2",
                      f"mlflow.tracking_uri={mlflow_server}", "mlflow.experiment=evals-gan-test")
    result = evaluate_and_log(cfg, load_checkpoint(url))
    gan_test = result["gan_test"]
    assert result["fid"] is None and result["is_mean"] is None and result["count"] == 13
    assert result["protocol"]["weights_sha256"] is None and result["protocol"]["metric"] == "GAN-test-13"

    # The same samples drawn and classified here, with the cached classifier: the same counts.
    spec = classifier_spec(_settings(gan_shards, cache, epochs=5))
    assert gan_test["classifier"]["id"] == spec.id and gan_test["classes"] == list(spec.classes)
    labels = torch.tensor([spec.classes[i % CLASSES] for i in range(13)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each pool worker (eval.cpus_per_worker=1): the same float rounding
    try:
        images = sample_images(generator, tokenizer, labels, [sample_seed(5, i) for i in range(13)],
                               SamplingConfig(num_steps=4, batch_size=4))
    finally:
        torch.set_num_threads(threads)
    expected = SampleScorer(spec.url).confusion(images.permute(0, 3, 1, 2), labels)
    assert gan_test["confusion"] == expected.tolist()
    assert gan_test["samples_per_class"] == dict(zip(spec.wnids, [5, 4, 4]))
    assert gan_test["accuracy"] == pytest.approx(np.trace(expected) / 13)
    for i, wnid in enumerate(spec.wnids):
        assert gan_test["per_class"][wnid] == pytest.approx(expected[i, i] / expected[i].sum())

    # MLflow: overall, ceiling and per-class accuracy at the export's step; no FID.
    client = MlflowClient(mlflow_server)
    run = client.get_run(result["mlflow"]["run_id"])
    assert run.data.metrics["eval/gan_test"] == pytest.approx(gan_test["accuracy"])
    assert run.data.metrics["eval/gan_test_real"] == pytest.approx(gan_test["real_accuracy"])
    assert {f"eval/gan_test_class/{w}" for w in spec.wnids} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/gan_test")] == [300]
    assert "eval/fid" not in run.data.metrics and run.data.params["eval/generation/gan_test_classifier"] == spec.id

    # Classes the classifier does not know cannot be GAN-tested; FID off and no GAN-test is a config error.
    with pytest.raises(BadInputError, match="not classes of eval.gan_test.data"):
        evaluate_generation(eval_config(*common, "eval.num_samples=2", "eval.labels=[0,1]"), load_checkpoint(url))
    with pytest.raises(ConfigError, match="eval.fid"):
        eval_config("eval.kind=generation", f"eval.checkpoint={url}", "eval.fid=false")

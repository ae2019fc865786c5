"""The whole pipeline on this machine with tiny models: ``make demo`` / ``python -m cluster.demo``.

    make data -> shard -> train tokenizer -> pretokenize -> train generator -> sample -> evaluate

Every step runs the project's own entry point (the same code as on a cluster, ``experiment=demo``)
on one local Ray instance, and every step is resumable: re-running skips finished steps and
continues interrupted ones (shards and token shards by checksum, training from its last checkpoint).
Outputs go to ``store`` (a local folder by default, or ``s3://...``, e.g. the local S3 server of
``python -m cluster.local up``); MLflow runs go to ``$MLFLOW_TRACKING_URI`` if set (the local
services' server), else to a SQLite store in the work directory.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

if __package__ in (None, ""):  # `python cluster/demo.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import ConfigError  # noqa: E402


@dataclass
class DemoConfig:
    """``python -m cluster.demo [key=value ...]``."""

    experiment: Optional[str] = None
    # Local folder for the generated images, the MLflow SQLite store and the step markers.
    workdir: str = "demo"
    # Where shards, runs, token shards and samples go: null -> <workdir>/store; or s3://bucket/prefix.
    store: Optional[str] = None
    # Training lengths (the demo experiment's are the defaults; smaller for a quick look / the e2e test).
    tokenizer_steps: Optional[int] = None
    generator_steps: Optional[int] = None
    train_per_class: int = 40
    val_per_class: int = 8
    samples_per_class: int = 8
    # Samples per class scored by the GAN-test classifier in step 7 (the first samples_per_class of
    # each class are the ones in samples.png).
    gan_test_samples_per_class: int = 50
    # Extra key=value overrides for each stage, e.g. tokenizer_overrides=[trainer.num_workers=2].
    tokenizer_overrides: List[str] = field(default_factory=list)
    generator_overrides: List[str] = field(default_factory=list)
    # The generator's run (runs/<name>) and samples folder: another name trains a second generator on
    # the same tokenizer and tokens, and MLflow holds both runs to compare, e.g. generator_name=no-labels
    # generator_overrides=[model.class_label_dropout=1.0] (a generator that never sees its labels).
    generator_name: str = "generator"
    # FID needs torch-fidelity's Inception weights: a path/URL, or null for its cached download.
    inception_weights: Optional[str] = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("train_per_class", "samples_per_class", "gan_test_samples_per_class"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("tokenizer_steps", "generator_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1 or null, got {getattr(self, name)}")
        name = self.generator_name
        if not name or name.startswith(".") or not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigError("generator_name", f"must be a folder name (letters, digits, - _ .), "
                                                f"got {self.generator_name!r}")


class StepFailed(RuntimeError):
    pass


@dataclass
class Paths:
    workdir: Path
    store: str
    generator_name: str = "generator"

    @property
    def images(self) -> Path:
        return self.workdir / "images"

    def url(self, *parts: str) -> str:
        from cluster import storage

        return storage.join(self.store, *parts)

    @property
    def shards(self) -> str:
        return self.url("shards")

    @property
    def tokenizer_run(self) -> str:
        return self.url("runs", "tokenizer")

    @property
    def tokens(self) -> str:
        return self.url("tokens")

    @property
    def generator_run(self) -> str:
        return self.url("runs", self.generator_name)

    @property
    def samples(self) -> str:
        if self.generator_name == "generator":
            return self.url("samples")
        return self.url(f"samples-{self.generator_name}")


def _banner(index: int, title: str) -> None:
    print(f"\n=== demo {index}/7: {title}", flush=True)


def _run(name: str, main: Callable[[list[str]], int], argv: list[str]) -> None:
    print("$ " + name + " " + " ".join(argv), flush=True)
    code = main(argv)
    if code:
        raise StepFailed(f"{name} exited with {code}")


def _latest_export_step(run_dir: str) -> int:
    from trainer.checkpoint import latest_export

    export = latest_export(run_dir)
    return export.step if export else 0


def _train(stage: str, run_dir: str, steps: int, argv: list[str]) -> str:
    """Train unless the run already has its final export; returns that export's URL."""
    from trainer import run as train_run
    from trainer.checkpoint import latest_export

    if _latest_export_step(run_dir) >= steps:
        print(f"{stage}: finished earlier ({run_dir}), skipped", flush=True)
    else:
        _run("python trainer/run.py", train_run.main, [f"stage={stage}", "experiment=demo", f"output_dir={run_dir}",
                                                       f"trainer.max_steps={steps}", *argv])
    export = latest_export(run_dir)
    assert export is not None and export.step >= steps, f"{run_dir} has no final export"
    return export.url


def _stage_steps(stage: str, configured: Optional[int]) -> int:
    from trainer.config import build_config
    from trainer.schema import STAGE_SCHEMAS, Stage

    if configured:
        return configured
    return build_config(stage, STAGE_SCHEMAS[Stage(stage)], ["experiment=demo"]).trainer.max_steps


def _worker_cpus(stage: str, overrides: list[str]) -> list[str]:
    """``trainer.cpus_per_worker`` that shares this Ray instance's CPUs among the stage's workers.

    The schema's default (1 CPU a worker) suits a cluster, where workers are packed onto nodes; the
    demo's one worker on a laptop would leave the other cores idle (torch runs as many threads as
    the worker has CPUs): on 2 cores the tokenizer's steps take ~20% less time with both. Placed
    before the user's overrides, so an explicit ``trainer.cpus_per_worker`` wins."""
    import ray

    from trainer.config import build_config
    from trainer.schema import STAGE_SCHEMAS, Stage

    trainer = build_config(stage, STAGE_SCHEMAS[Stage(stage)], ["experiment=demo", *overrides]).trainer
    workers = trainer.max_workers if trainer.elastic else trainer.num_workers
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return [f"trainer.cpus_per_worker={max(1, cpus // max(1, workers))}"]


def _demo_labels(shards: str) -> list[int]:
    from data_prep import manifest

    rows = manifest.read_table(manifest.samples_url(shards, "train")).column("label").to_pylist()
    return sorted(set(rows))


def _inception_available(source: Optional[str]) -> bool:
    """Weights given, or torch-fidelity's file already in the torch hub cache (nothing is downloaded here)."""
    import torch

    from cluster import storage
    from evals.inception import DEFAULT_WEIGHTS_URL

    if source:
        return source.startswith(("http://", "https://")) or storage.exists(source)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / DEFAULT_WEIGHTS_URL.rsplit("/", 1)[-1]
    return cached.exists()


def _mlflow_run(run_dir: str):
    """(MlflowClient, run id) of the MLflow run a training run recorded in ``run_dir``, or None."""
    from mlflow.tracking import MlflowClient

    from cluster import storage
    from trainer.tracking import RUN_FILE, RunRef

    record = storage.join(run_dir, RUN_FILE)
    if not storage.exists(record):
        return None
    ref = RunRef(**json.loads(storage.read_text(record)))
    return MlflowClient(ref.tracking_uri), ref.run_id


def _quality(paths: "Paths") -> dict:
    """The evaluation metrics of both runs as MLflow holds them (what the compare page shows)."""
    out: dict = {}
    for stage, run_dir in (("tokenizer", paths.tokenizer_run), ("generator", paths.generator_run)):
        client, run_id = _mlflow_run(run_dir)
        metrics = client.get_run(run_id).data.metrics
        out[stage] = {k: v for k, v in sorted(metrics.items()) if k.startswith("eval/")}
    return out


def _evaluated(run_dir: str, step: int, keys: list[str]) -> bool:
    """Whether the run's MLflow record already has every metric of ``keys`` at ``step`` (its final
    export's): a re-run of the demo then does not evaluate it again."""
    found = _mlflow_run(run_dir)
    if found is None:
        return False
    client, run_id = found
    return all(any(m.step == step for m in client.get_metric_history(run_id, key)) for key in keys)


def _print_quality(quality: dict) -> None:
    """The quality metrics next to what a perfect model would get."""
    from data_prep.make_demo_data import DEMO_CLASSES

    names = {c.wnid: c.name for c in DEMO_CLASSES}
    tok, gen = quality["tokenizer"], quality["generator"]
    lines = ["quality, as logged to MLflow (a perfect model's figure in brackets):"]
    if "eval/psnr" in tok:
        lines.append(f"  tokenizer  PSNR {tok['eval/psnr']:.2f} dB (inf)   SSIM {tok['eval/ssim']:.3f} (1)   "
                     f"codebook usage {tok.get('eval/codebook_usage', float('nan')):.3f} (up to 1), "
                     "on the validation images"
                     + (f"   rFID {tok['eval/rfid']:.2f} (0)" if "eval/rfid" in tok else ""))
    if "eval/gan_test" in gen:
        per_class = {k.rsplit("/", 1)[-1]: v for k, v in gen.items() if k.startswith("eval/gan_test_class/")}
        lines.append(f"  generator  GAN-test accuracy {gen['eval/gan_test']:.3f} ({gen['eval/gan_test_real']:.3f}: "
                     f"the classifier on real validation images; chance {1 / max(1, len(per_class)):.3f})"
                     + (f"   FID {gen['eval/fid']:.2f} (0)" if "eval/fid" in gen else ""))
        lines.append("             " + " | ".join(f"{names.get(w, w)} {a:.2f}" for w, a in per_class.items()))
    print("\n".join(lines), flush=True)


def run_demo(cfg: DemoConfig) -> dict:
    """Run (or resume) every step; returns where the results are."""
    from cluster import storage
    from cluster.local import apply_service_env
    from cluster.ray_session import connect_ray

    apply_service_env()
    workdir = Path(cfg.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    store = cfg.store or str(workdir / "store")
    storage.ensure_bucket(store)
    paths = Paths(workdir, store, cfg.generator_name)
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
    (workdir / "mlruns").mkdir(exist_ok=True)
    mlflow_args = [f"mlflow.tracking_uri={tracking_uri}", "mlflow.experiment=titok-demo"]
    started = time.time()
    timings: dict[str, float] = {}
    connect_ray()  # one local Ray (or RAY_ADDRESS) for every step

    def timed(name: str, fn: Callable[[], object]):
        t0 = time.time()
        out = fn()
        timings[name] = round(time.time() - t0, 1)
        return out

    from data_prep import make_demo_data

    _banner(1, "make demo images (ImageNet layout, with a few broken files)")
    marker = paths.images / ".complete"
    if marker.exists():
        print(f"images: present ({paths.images}), skipped", flush=True)
    else:
        timed("images", lambda: _run("python data_prep/make_demo_data.py", make_demo_data.main, [
            f"output={paths.images}", f"train_per_class={cfg.train_per_class}", f"val_per_class={cfg.val_per_class}"]))
        marker.write_text("")

    from data_prep import shard

    _banner(2, "shard into WebDataset tars + parquet manifests")
    progress = f"progress={str(cfg.progress).lower()}"
    for split in ("train", "val"):
        timed(f"shard_{split}", lambda split=split: _run("python data_prep/shard.py", shard.main, [
            f"input={paths.images}", f"output={paths.shards}", f"split={split}", "samples_per_shard=100", progress]))

    _banner(3, "train the tokenizer (single-stage, tiny ViT)")
    tokenizer_steps = _stage_steps("tokenizer", cfg.tokenizer_steps)
    train_shards = storage.join(paths.shards, "train-*.tar")
    tokenizer_export = timed("tokenizer", lambda: _train("tokenizer", paths.tokenizer_run, tokenizer_steps, [
        *_worker_cpus("tokenizer", cfg.tokenizer_overrides), f"data.train_shards={train_shards}", *mlflow_args,
        *cfg.tokenizer_overrides]))

    from data_prep import pretokenize

    _banner(4, "pre-tokenize the training images (+ flips) on Ray actors")
    timed("pretokenize", lambda: _run("python data_prep/pretokenize.py", pretokenize.main, [
        f"tokenizer={tokenizer_export}", f"shards={train_shards}", f"output={paths.tokens}", "augment=flip",
        progress]))

    _banner(5, "train the generator (masked-token transformer)")
    generator_steps = _stage_steps("generator", cfg.generator_steps)
    generator_export = timed("generator", lambda: _train("generator", paths.generator_run, generator_steps, [
        *_worker_cpus("generator", cfg.generator_overrides), f"data.train_shards={paths.tokens}",
        f"generator.tokenizer={tokenizer_export}", *mlflow_args, *cfg.generator_overrides]))

    from trainer import sample

    _banner(6, "sample class-conditional images")
    labels = _demo_labels(paths.shards)
    samples_npz = storage.join(paths.samples, "samples.npz")
    if storage.exists(samples_npz) and storage.exists(storage.join(paths.samples, "samples.png")):
        print(f"samples: present ({paths.samples}), skipped", flush=True)
    else:
        timed("sample", lambda: _run("python -m trainer.sample", sample.main, [
            f"generator={generator_export}", f"output={paths.samples}",
            f"num_samples={cfg.samples_per_class * len(labels)}", f"labels=[{','.join(map(str, labels))}]",
            f"grid_columns={len(labels)}", "experiment=demo", progress]))

    _banner(7, "evaluate: PSNR/SSIM/codebook usage of the tokenizer, GAN-test accuracy of the samples")
    from evals import run as eval_run

    fid = _inception_available(cfg.inception_weights)
    if not fid:
        print("notice: FID skipped: torch-fidelity's Inception weights are not available offline "
              "(download them once, or pass inception_weights=<file>); the metrics below need no download",
              flush=True)
    eval_args = ["experiment=demo", f"eval.fid={str(fid).lower()}", f"eval.data={_val_shards(paths)}",
                 *([f"eval.inception_weights={cfg.inception_weights}"] if cfg.inception_weights else []),
                 *mlflow_args, f"eval.progress={str(cfg.progress).lower()}"]
    if _evaluated(paths.tokenizer_run, tokenizer_steps, ["eval/psnr", *(["eval/rfid"] if fid else [])]):
        print("tokenizer evaluation: logged earlier for this export, skipped", flush=True)
    else:
        timed("eval_tokenizer", lambda: _run("python evals/run.py", eval_run.main, [
            "eval.kind=reconstruction", f"eval.checkpoint={tokenizer_export}", *eval_args]))
    if _evaluated(paths.generator_run, generator_steps, ["eval/gan_test", *(["eval/fid"] if fid else [])]):
        print("generator evaluation: logged earlier for this export, skipped", flush=True)
    else:
        # The classifier is trained on the training shards once (cached beside them); the samples are
        # drawn the way step 6 draws them (labels in turn, seeds from the index, the demo's sampling).
        timed("eval_generator", lambda: _run("python evals/run.py", eval_run.main, [
            "eval.kind=generation", f"eval.checkpoint={generator_export}", f"eval.gan_test.data={paths.shards}",
            f"eval.num_samples={cfg.gan_test_samples_per_class * len(labels)}",
            f"eval.labels=[{','.join(map(str, labels))}]", *eval_args]))
    evaluation = _quality(paths)

    summary = {"wall_s": round(time.time() - started, 1), "steps_s": timings, "store": store,
               "tokenizer_export": tokenizer_export, "generator_export": generator_export,
               "samples_grid": storage.join(paths.samples, "samples.png"), "samples_npz": samples_npz,
               "reconstructions": storage.join(paths.tokenizer_run, "previews (MLflow artifacts)"),
               "mlflow": tracking_uri, "evaluation": evaluation}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    ui = (f"mlflow ui --backend-store-uri {tracking_uri}" if tracking_uri.startswith("sqlite:")
          else f"open {tracking_uri}")
    print(f"\n=== demo done in {summary['wall_s']:.0f}s\n"
          f"  MLflow:        {ui}   (experiment titok-demo: tokenizer and generator runs; compare them there)\n"
          f"  outputs:       {store}\n"
          f"  sample grid:   {summary['samples_grid']}  (one column per class)\n"
          f"  tokenizer:     {tokenizer_export}\n"
          f"  generator:     {generator_export}\n"
          f"  summary:       {workdir / 'summary.json'}", flush=True)
    _print_quality(evaluation)
    return summary


def _val_shards(paths: Paths) -> str:
    from cluster import storage

    return storage.join(paths.shards, "val-*.tar")


def check_inputs(cfg: DemoConfig) -> None:
    """Before Ray starts (cluster/preflight.py): the work directory and the store can be written,
    and Inception weights that were named exist."""
    from cluster import preflight
    from cluster.local import apply_service_env

    apply_service_env()  # the local services' S3 endpoint, for store=s3://...
    preflight.require_writable("workdir", cfg.workdir)
    preflight.require_writable("store", cfg.store)
    preflight.require_file("inception_weights", cfg.inception_weights, "weight file")


def main(argv: list[str] | None = None) -> int:
    from cluster.storage import StorageError
    from trainer.config import EXIT_CONFIG_ERROR, load_config

    cfg = load_config("demo", DemoConfig, argv, description=__doc__)
    try:
        check_inputs(cfg)
    except ConfigError as err:  # cluster.preflight.BadInput: one line naming the key
        print(str(err), file=sys.stderr)
        return EXIT_CONFIG_ERROR
    try:
        run_demo(cfg)
    except (StepFailed, StorageError) as err:
        print(f"demo stopped: {err}. Fix the cause and re-run: finished steps are kept.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

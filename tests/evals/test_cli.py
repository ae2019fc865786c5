"""``python evals/run.py`` as users run it: JSON on the last stdout line, .npz reference statistics,
results in an MLflow eval run, config errors before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.evals.conftest import IMAGES_PER_SET

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args: list[str], ray_address: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address  # the session's Ray: no second local cluster to start
    return subprocess.run([sys.executable, "evals/run.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_config_errors_exit_2_before_any_work() -> None:
    result = _run(["eval.kind=folders", "eval.input1=/nowhere"])
    assert result.returncode == 2 and "eval.input2" in result.stderr and result.stdout == ""
    result = _run(["eval.kind=generaton"])
    assert result.returncode == 2 and "did you mean 'generation'" in result.stderr


def test_folders_job_against_npz_statistics_logs_an_eval_run(
        ray_local, mlflow_server, tmp_path, image_folders, inception_weights, fidelity_reference) -> None:
    from mlflow.tracking import MlflowClient

    from evals.stats import load_stats

    # Reference statistics of input2, computed once and saved as an ADM-style .npz.
    common = [f"eval.inception_weights={inception_weights}", "eval.num_workers=2", "eval.chunk_size=10",
              "eval.batch_size=10", "eval.progress=false"]
    stats_path = tmp_path / "ref_stats.npz"
    _folder_stats(image_folders[1], inception_weights).save(str(stats_path))

    address = ray_local.get_runtime_context().gcs_address
    result = _run(["eval.kind=folders", f"eval.input1={image_folders[0]}", f"eval.input2={stats_path}",
                   f"mlflow.tracking_uri={mlflow_server}", "mlflow.experiment=evals-cli", *common], address)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["fid"] == pytest.approx(fidelity_reference["frechet_inception_distance"], rel=1e-6)
    assert out["is_mean"] == pytest.approx(fidelity_reference["inception_score_mean"], rel=1e-6)
    assert out["count1"] == IMAGES_PER_SET and out["count2"] == IMAGES_PER_SET
    assert out["protocol"]["reference"]["stats_id"] == load_stats(str(stats_path)).stats_id
    assert out["protocol"]["metric"] == f"FID-{IMAGES_PER_SET}"

    client = MlflowClient(mlflow_server)
    run = client.get_run(out["mlflow"]["run_id"])
    assert run.data.tags["titok.kind"] == "eval"
    assert run.data.metrics["eval/fid"] == pytest.approx(out["fid"])
    assert "eval/fid_50k" not in run.data.metrics  # 20 images are not FID-50k
    assert run.data.params["eval/folders/reference_stats_id"] == out["protocol"]["reference"]["stats_id"]


def _folder_stats(folder: str, weights: str):
    """Statistics of ``folder`` from one in-process worker (no Ray), chunked as the job chunks it."""
    from evals.merge import ResultMerger
    from evals.sources import resolve_input
    from evals.worker import Chunk, EvalWorker, ScoreTask, WorkerSettings

    slices = resolve_input(folder, chunk_size=10, image_size=256).slices
    worker = EvalWorker(WorkerSettings(weights, batch_size=10), ScoreTask())
    merger = ResultMerger(len(slices))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each pool worker (cpus_per_worker=1)
    try:
        for i, part in enumerate(slices):
            merger.add(worker.run(Chunk(i, "x", part)))
    finally:
        torch.set_num_threads(threads)
    return merger.merged.sums["x"].to_stats(folder)

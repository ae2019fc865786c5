"""MLflow logging of eval results against a real MLflow server."""

from __future__ import annotations

import numpy as np

from evals.tracking import log_result
from trainer.schema import MLflowConfig


def _result(fid: float, stats_id: str) -> dict:
    return {"kind": "generation", "fid": fid, "is_mean": 3.0, "is_std": 0.1, "count": 50_000,
            "checkpoint": "/runs/a/exports/step_000000100",
            "protocol": {"metric": "FID-50k", "weights_sha256": "ab" * 32, "reference": {"stats_id": stats_id}}}


def test_eval_run_is_reused_per_run_dir_and_keeps_a_curve(mlflow_server) -> None:
    from mlflow.tracking import MlflowClient

    cfg = MLflowConfig(tracking_uri=mlflow_server, experiment="evals-tracking")
    grid = [np.zeros((2, 8, 8, 3), np.uint8)]
    first = log_result(cfg, _result(9.0, "ref-1"), 100, {"run_name": "a"}, "/runs/a", grid)
    second = log_result(cfg, _result(7.0, "ref-2"), 200, {"run_name": "a"}, "/runs/a")
    other = log_result(cfg, _result(5.0, "ref-1"), 100, {"run_name": "b"}, "/runs/b")
    assert first["run_id"] == second["run_id"] != other["run_id"]
    client = MlflowClient(mlflow_server)
    history = client.get_metric_history(first["run_id"], "eval/fid_50k")
    assert [(m.step, m.value) for m in history] == [(100, 9.0), (200, 7.0)]
    run = client.get_run(first["run_id"])
    # Params cannot change: the first reference stays the param, a later one is a tag.
    assert run.data.params["eval/generation/reference_stats_id"] == "ref-1"
    assert run.data.tags["eval/generation/reference_stats_id:latest"] == "ref-2"
    assert run.data.tags["eval/generation/last_metric"] == "FID-50k"
    paths = {a.path for a in client.list_artifacts(first["run_id"], "eval/step_000000100")}
    assert "eval/step_000000100/generation_samples.png" in paths
    assert log_result(MLflowConfig(tracking_uri=mlflow_server, enabled=False), _result(1.0, "x"), 1, {}, "/r") is None


def test_a_deleted_training_run_falls_back_to_an_eval_run(mlflow_server) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment_id = client.create_experiment("evals-deleted-train")
    train = client.create_run(experiment_id).info.run_id
    client.delete_run(train)
    ref = log_result(MLflowConfig(tracking_uri=mlflow_server, experiment="evals-tracking"), _result(4.0, "r"), 10,
                     {"mlflow_run_id": train, "run_name": "c"}, "/runs/c")
    assert ref["run_id"] != train
    run = client.get_run(ref["run_id"])
    assert run.data.tags["titok.training_run_id"] == train and run.data.metrics["eval/fid"] == 4.0

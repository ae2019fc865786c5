"""A run resumed on another number of workers is the same run: same losses, same samples per step.

The tokenizer (single-stage L2, no dropout, fp32) trains 12 steps on 2 workers; the same run is also
trained in three parts: 2 workers to step 6, resumed on 1 worker to step 9, resumed on 2 workers to
step 12, every part with the same ``trainer.max_steps`` (so the same LR schedule) and stopped with
``trainer.stop_at_step``. Real local Ray, DeepSpeed over gloo, MLflow server. The sample keys of
every step come from the run's own audit (``trainer.record_sample_keys``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from tests.trainer.conftest import metric_by_step, mlflow_run_id, tokenizer_overrides, train_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]


def _keys_by_step(run_dir: Path) -> dict[int, list[str]]:
    """Every step's sample keys, over all ranks and attempts (a step redone after a restart must
    read the same samples again, so it is recorded with the same set)."""
    found: dict[int, set[str]] = defaultdict(set)
    for path in (run_dir / "sample_keys").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            found[record["step"]].update(record["keys"])
    return {step: sorted(keys) for step, keys in found.items()}


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
# ZeRO-3 only, the stage whose parameters are partitioned too. ZeRO-2 is resized end to end by the
# generator's test (2 workers, then 1: the same losses; tests/trainer/test_train_generator.py), and its
# state restored exactly after 3 -> 2 workers in tests/trainer/test_engine_state.py. (Both stages ran
# here before; each costs ~70 s of the suite, four Ray Train launches.)
@pytest.mark.parametrize("zero", [3])
def test_run_resized_2_1_2_equals_the_straight_run(zero, tiny_shards, tmp_path, mlflow_server) -> None:
    common = [f"deepspeed.zero_stage={zero}", "trainer.max_steps=12", "trainer.checkpoint_every=3",
              "trainer.image_log_every=6", "trainer.record_sample_keys=true", "trainer.ema_decay=0.9",
              f"mlflow.tracking_uri={mlflow_server}", "mlflow.experiment=test-resize"]
    straight = tmp_path / "straight"
    train_tokenizer(tokenizer_overrides(tiny_shards, straight, *common, "trainer.num_workers=2"))
    resized = tmp_path / "resized"
    timings = {}
    # (A resume at the same size is the generator's case in tests/trainer/test_train_generator.py.)
    for workers, stop in ((2, 6), (1, 9), (2, 12)):
        started = time.perf_counter()
        train_tokenizer(tokenizer_overrides(tiny_shards, resized, *common, f"trainer.num_workers={workers}",
                                            f"trainer.stop_at_step={stop}"))
        timings[(workers, stop)] = time.perf_counter() - started

    straight_loss = metric_by_step(mlflow_server, mlflow_run_id(straight), "train/loss")
    resized_loss = metric_by_step(mlflow_server, mlflow_run_id(resized), "train/loss")
    workers = metric_by_step(mlflow_server, mlflow_run_id(resized), "perf/workers")
    assert sorted(straight_loss) == sorted(resized_loss) == list(range(1, 13))
    worst = max(abs(resized_loss[s] - straight_loss[s]) / abs(straight_loss[s]) for s in range(1, 13))
    restore = metric_by_step(mlflow_server, mlflow_run_id(resized), "perf/restore_s")
    print(f"\nZeRO-{zero}: largest relative loss difference across the resizes: {worst:.2e}; "
          f"part times (s): {', '.join(f'{w} worker(s) to step {s}: {t:.1f}' for (w, s), t in timings.items())}; "
          f"checkpoint load in the resized parts (s): {', '.join(f'{v:.2f}' for _, v in sorted(restore.items()))}")
    assert worst < 1e-4
    assert [workers[s] for s in (6, 7, 9, 10, 12)] == [2.0, 1.0, 1.0, 2.0, 2.0]
    for step in range(1, 7):
        assert resized_loss[step] == pytest.approx(straight_loss[step], rel=1e-5, abs=1e-7), step
    if zero == 2:
        _assert_logged_to_mlflow(mlflow_server, straight, resized, tmp_path)

    straight_keys, resized_keys = _keys_by_step(straight), _keys_by_step(resized)
    assert sorted(straight_keys) == sorted(resized_keys) == list(range(1, 13))
    for step in range(1, 13):
        assert resized_keys[step] == straight_keys[step], step
        assert len(straight_keys[step]) == 8  # the global batch: 2 workers x 4

    state = json.loads((resized / "checkpoints" / "step_000000009" / "train_state.json").read_text())
    assert state["world_size"] == 1 and state["global_batch_size"] == 8 and state["step"] == 9


def _assert_logged_to_mlflow(mlflow_server: str, straight: Path, resumed: Path, tmp_path: Path) -> None:
    """The straight run's MLflow record: params, metrics, tags, preview artifacts; the resumed jobs
    kept logging into one run."""
    from mlflow.tracking import MlflowClient
    from PIL import Image

    client = MlflowClient(mlflow_server)
    run = client.get_run(mlflow_run_id(straight))
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["deepspeed.zero_stage"] == "2" and params["trainer.num_workers"] == "2"
    assert params["model.num_latent_tokens"] == "16" and params["tokenizer.recipe"] == "single_stage"
    for key in ("train/loss", "train/loss_l2", "train/lr", "train/grad_norm", "train/psnr", "train/codebook_usage",
                "train/codebook_entropy", "perf/images_per_s", "perf/step_time_s", "perf/workers"):
        assert key in metrics, key
    assert 0 < metrics["train/codebook_usage"] <= 1
    loss = metric_by_step(mlflow_server, run.info.run_id, "train/loss")
    # Overfitting 16 images, the loss falls: to 0.60 of step 1's at the demo's lr 5e-4 (a model that
    # does not learn stays near 1).
    assert loss[12] < 0.75 * loss[1]
    assert tags["checkpoint"].endswith("checkpoints/step_000000012") and run.info.status == "FINISHED"
    previews = [a.path for a in client.list_artifacts(run.info.run_id, "previews")]
    assert previews == ["previews/step_000000006.png", "previews/step_000000012.png"]
    local = Path(client.download_artifacts(run.info.run_id, previews[0], str(tmp_path / "dl")))
    with Image.open(local) as grid:  # 2 rows (inputs, reconstructions) of 32 px images
        assert grid.size[1] == 2 * (32 + 2) + 2
    assert len({m.step for m in client.get_metric_history(mlflow_run_id(resumed), "train/loss")}) == 12


def _run_cli(overrides: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "trainer" / "run.py"), "stage=tokenizer", *overrides],
                          cwd=str(cwd), capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_ADDRESS": "", "DS_ACCELERATOR": "cpu"})


def test_worker_count_that_does_not_divide_the_global_batch_is_refused(tiny_shards, tmp_path) -> None:
    run_dir = tmp_path / "run"
    result = _run_cli(tokenizer_overrides(tiny_shards, run_dir, "trainer.global_batch_size=12",
                                          "trainer.num_workers=5", "mlflow.enabled=false"), tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["config error: trainer.num_workers: 5 does not divide the global batch 12 "
                     "(trainer.global_batch_size); valid: 1, 2, 3, 4, 6, 12"], result.stderr[-2000:]
    assert not run_dir.exists(), "nothing may be written before the refusal"


@pytest.mark.usefixtures("ray_local")
def test_resume_that_changes_an_invariant_is_refused_before_writing(tiny_shards, tmp_path, capsys) -> None:
    from trainer.config import EXIT_CONFIG_ERROR, build_config
    from trainer.launch import launch
    from trainer.resume import previous_run_config, resolve_run
    from trainer.schema import TokenizerTrainConfig

    run_dir = tmp_path / "run"
    train_tokenizer(tokenizer_overrides(tiny_shards, run_dir, "trainer.max_steps=2", "trainer.checkpoint_every=2",
                                        "trainer.num_workers=1", "mlflow.enabled=false"))
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    resume = ["trainer.max_steps=4", "trainer.num_workers=1", "mlflow.enabled=false"]
    # The command a user runs: one line on stderr, exit code 2, no traceback.
    result = _run_cli(tokenizer_overrides(tiny_shards, run_dir, *resume, "model.codebook_size=512"), tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "model.codebook_size: the run in" in lines[0], \
        result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    # The other invariants through the same launcher in this process (trainer/run.py only parses argv
    # before it: the refusal is the same code, without a new interpreter's 3 to 4 s start).
    for extra, expected in [("trainer.global_batch_size=8", "trainer.global_batch_size: the run in"),
                            ("seed=5", "seed: the run in")]:
        capsys.readouterr()
        code = launch(build_config("tokenizer", TokenizerTrainConfig,
                                   tokenizer_overrides(tiny_shards, run_dir, *resume, extra)))
        out, err = capsys.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == EXIT_CONFIG_ERROR and len(lines) == 1 and expected in lines[0], err[-3000:]
        assert not out.strip(), out[-3000:]
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    assert after == before, "a refused resume wrote to the run dir"
    # The deliberate change goes through the refusal (the run itself is not continued here).

    cfg = build_config("tokenizer", TokenizerTrainConfig, tokenizer_overrides(
        tiny_shards, run_dir, "trainer.global_batch_size=8", "trainer.allow_global_batch_change=true"))
    notices = resolve_run(cfg, previous_run_config(str(run_dir)))
    assert cfg.trainer.global_batch_size == 8 and any("global batch 4 -> 8" in n for n in notices)

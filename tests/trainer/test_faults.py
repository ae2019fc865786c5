"""Faults caused for real: a training worker SIGKILLed mid-run, and a loss that turns non-finite."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.trainer.conftest import tokenizer_overrides

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run_py(overrides: list[str], log: Path) -> subprocess.Popen:
    """`python trainer/run.py stage=tokenizer ...` as a user runs it (its own local Ray)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RAY_ADDRESS": ""}
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, str(REPO_ROOT / "trainer" / "run.py"), "stage=tokenizer", *overrides],
                                cwd=str(log.parent), env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _wait(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


@pytest.mark.slow
def test_killed_worker_is_restarted_from_the_last_checkpoint(tiny_shards, tmp_path) -> None:
    run_dir = tmp_path / "run"
    log = tmp_path / "train.log"
    proc = _run_py(tokenizer_overrides(tiny_shards, run_dir, "trainer.num_workers=1", "trainer.max_steps=120",
                                       "trainer.checkpoint_every=10", "trainer.max_failures=1",
                                       "trainer.log_every=10", "mlflow.enabled=false"), log)
    try:
        first = run_dir / "checkpoints" / "step_000000010" / "COMPLETE"
        deadline = time.time() + 240
        while not first.exists():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.2)
        pids = {int(p) for p in re.findall(r"RayTrainWorker pid=(\d+)", log.read_text())}
        assert pids, log.read_text()[-3000:]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)  # the worker dies with no chance to clean up
        killed_at = time.time()
        assert _wait(proc, 300) == 0, log.read_text()[-5000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    resumed = [int(s) for s in re.findall(r"\[tokenizer\] resumed from step (\d+)", text)]
    assert resumed and resumed[0] >= 10, text[-5000:]
    new_pids = {int(p) for p in re.findall(r"RayTrainWorker pid=(\d+)", text)} - pids
    assert new_pids, "no new worker process after the kill"
    assert (run_dir / "checkpoints" / "step_000000120" / "COMPLETE").exists()
    assert (run_dir / "exports" / "step_000000120" / "COMPLETE").exists()
    assert killed_at > 0


def test_non_finite_losses_are_skipped_then_abort_with_the_last_good_checkpoint(tiny_shards, tmp_path) -> None:
    """An absurd learning rate blows the weights up: the steps are skipped, counted, then the run stops."""
    run_dir = tmp_path / "run"
    log = tmp_path / "train.log"
    proc = _run_py(tokenizer_overrides(tiny_shards, run_dir, "trainer.num_workers=1", "trainer.max_steps=50",
                                       "trainer.checkpoint_every=1", "trainer.max_nonfinite_steps=3",
                                       "optim.lr=1e30", "optim.warmup_steps=0", "trainer.grad_clip=0",
                                       "mlflow.enabled=false"), log)
    rc = _wait(proc, 300)
    text = log.read_text()
    assert rc != 0, text[-3000:]
    skipped = re.findall(r"non-finite loss at step \d+ .*skipped \((\d) in a row\)", text)
    assert skipped[:3] == ["1", "2", "3"], text[-5000:]
    match = re.search(r"3 non-finite losses in a row at step (\d+); aborting\. Last good checkpoint: (\S+) ", text)
    assert match, text[-5000:]
    # Skipped steps change no weight and write no checkpoint: the last good one precedes the streak.
    first_skipped = int(re.search(r"non-finite loss at step (\d+) ", text).group(1))
    assert int(match.group(1)) == first_skipped + 2
    last_good = match.group(2)
    assert last_good.endswith(f"step_{first_skipped - 1:09d}") and Path(last_good, "COMPLETE").exists()
    assert not (run_dir / "checkpoints" / f"step_{first_skipped:09d}").exists()
    # The driver ends with the root cause on one line, not only Ray's wrapped traceback.
    assert re.search(r"^training failed: trainer\.loop\.NonFiniteLossError: 3 non-finite losses", text, re.M)

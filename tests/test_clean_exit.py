"""A command that starts its own local Ray ends cleanly: no traceback after success, nothing left running.

* ``python trainer/run.py stage=tokenizer experiment=demo ...`` as a user runs it (no ``RAY_ADDRESS``):
  Ray Train's controller and its detached ``PlacementGroupCleaner`` exit before Ray's GCS and
  dashboard go away (cluster/ray_session.py), so the console has no ``RpcError: Timed out while
  waiting for GCS`` traceback after the run succeeded, and no process of the run outlives it.
* :func:`cluster.ray_session.shutdown_ray` also ends what a worker left behind: a process re-parented
  to init that only its environment (``RAY_RAYLET_PID``) ties to the instance. (Whether Ray's own
  shutdown leaves such a process running differs between machines, so it is no control here.)
* Both hold while another Ray instance runs on the machine (a second user's, or the test session's
  own): the run's workers are told which instance's state API is theirs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
MARK = "TITOK_CLEAN_EXIT"


def _alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            continue
    return out


def _marked(value: str) -> list[int]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARK) == value:
                found.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return _alive(found)


def _isolated_env(ray_tmp: str, value: str) -> dict[str, str]:
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, MARK: value}
    env.pop("RAY_ADDRESS", None)  # the command starts a local Ray of its own, as on a laptop
    return env


def test_standalone_training_run_ends_without_a_traceback(ray_local, tiny_shards: Path, tmp_path: Path) -> None:
    # ray_local: the session's own Ray instance runs beside the command's (two instances on one machine)
    ray_tmp, value = tempfile.mkdtemp(prefix="ray", dir="/tmp"), uuid.uuid4().hex
    run_dir = tmp_path / "run"
    command = [sys.executable, "trainer/run.py", "stage=tokenizer", "experiment=demo",
               f"data.train_shards={tiny_shards}", f"output_dir={run_dir}", "trainer.max_steps=3",
               "trainer.batch_size_per_worker=4", "trainer.checkpoint_every=3", "trainer.log_every=1",
               "trainer.image_log_every=0", "data.loader_workers=0", "data.shuffle_buffer=16",
               f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    try:
        result = subprocess.run(command, cwd=REPO, env=_isolated_env(ray_tmp, value), capture_output=True, text=True,
                                timeout=600)
        sessions = list(Path(ray_tmp).rglob("session_2*"))
        time.sleep(1.0)  # a process that would outlive the command has had its chance to show
        left = _marked(value)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    console = result.stdout + result.stderr
    assert result.returncode == 0, console[-5000:]
    assert sessions, "the command did not start its own Ray instance"
    assert "done in" in console and (run_dir / "exports" / "step_000000003" / "COMPLETE").exists()
    assert "Traceback" not in console, console[-8000:]
    assert "PlacementGroupCleaner" not in console and "RpcError" not in console, console[-8000:]
    assert not left, f"processes of the run still alive after it ended: {left}"


_LEAVES_AN_ORPHAN = """
import json, subprocess, sys, time
import ray
from cluster.ray_session import connect_ray, local_instance_pids, shutdown_ray

connect_ray(num_cpus=1)

@ray.remote
class Spawner:
    def spawn(self, pid_file):
        # sh starts sleep in the background and exits: sleep is re-parented to init at once.
        subprocess.run(["sh", "-c", "sleep 300 & echo $! > " + pid_file], check=True)
        return open(pid_file).read().strip()

spawner = Spawner.remote()
orphan = int(ray.get(spawner.spawn.remote(sys.argv[1])))  # the driver's argv (a worker has its own)
print(json.dumps({"orphan": orphan, "known": orphan in local_instance_pids()}), flush=True)
shutdown_ray()
"""


def test_shutdown_ray_ends_processes_only_the_environment_ties_to_the_instance(tmp_path: Path) -> None:
    ray_tmp, value = tempfile.mkdtemp(prefix="ray", dir="/tmp"), uuid.uuid4().hex
    orphan = None
    try:
        result = subprocess.run([sys.executable, "-c", _LEAVES_AN_ORPHAN, str(tmp_path / "pid")], cwd=REPO,
                                env=_isolated_env(ray_tmp, value), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        facts = json.loads(result.stdout.strip().splitlines()[-1])
        orphan = facts["orphan"]
        assert int((tmp_path / "pid").read_text()) == orphan  # written where the test said, not in the repo
        assert facts["known"], "the orphan is not counted as a process of the instance"
        time.sleep(1.0)
        assert not _alive([orphan]) and not _marked(value)
    finally:
        if orphan is not None and _alive([orphan]):
            os.kill(orphan, 9)
        shutil.rmtree(ray_tmp, ignore_errors=True)

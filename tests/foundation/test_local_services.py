"""`python -m cluster.local up|down|status`: idempotent start, health, env file, stop only our own."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import local

REPO = Path(__file__).resolve().parents[2]


def _cli(state_dir: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.local", *args, "--state-dir", str(state_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_up_is_idempotent_and_down_stops_only_what_it_started(tmp_path: Path) -> None:
    state = tmp_path / "services"
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        first = _cli(state, "up")
        assert first.returncode == 0, first.stderr
        services = local.load_state(state)
        assert set(services) == {"s3", "mlflow", "ray"}
        pids = {name: s.pid for name, s in services.items()}
        assert all(s.healthy() for s in services.values())
        assert all(s.url.startswith("http://127.0.0.1:") or s.url.startswith("127.0.0.1:") for s in services.values())

        second = _cli(state, "up")
        assert second.returncode == 0 and second.stdout.count("already running") == 3
        assert {n: s.pid for n, s in local.load_state(state).items()} == pids

        status = _cli(state, "status")
        assert status.stdout.count(" running ") == 3, status.stdout

        env_file = (state / "env.sh").read_text()
        for key in ("AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_MODE"):
            assert f"export {key}=" in env_file

        # The env file is what clients need: use each service through it.
        client = subprocess.run(
            ["bash", "-c", f"set -a; . {state / 'env.sh'}; {sys.executable} -c '"
             "import boto3, mlflow, ray;"
             "boto3.client(\"s3\").create_bucket(Bucket=\"probe\");"
             "print(\"experiments\", len(mlflow.search_experiments()));"
             "ray.init(); print(\"cpus\", ray.cluster_resources()[\"CPU\"])'"],
            capture_output=True, text=True, timeout=120, cwd=REPO)
        assert client.returncode == 0, client.stderr[-2000:]
        assert "experiments 1" in client.stdout and "cpus" in client.stdout

        down = _cli(state, "down")
        assert down.returncode == 0, down.stderr
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(local.pid_alive(p) for p in pids.values()):
            time.sleep(0.5)
        assert not any(local.pid_alive(p) for p in pids.values())
        assert bystander.poll() is None, "down must not touch processes it did not start"
        assert local.load_state(state) == {}
        assert _cli(state, "status").stdout.count("stopped") == 3
        assert _cli(state, "down").returncode == 0  # down twice is fine
    finally:
        bystander.kill()
        local.down(state_dir=state, quiet=True)


def test_apply_service_env_never_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "services"
    service = local.start_s3(state, bucket="bucket-one")
    try:
        local.save_state({"s3": service}, state)
        monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
        applied = local.apply_service_env(state)
        assert os.environ["AWS_ENDPOINT_URL"] == service.url == applied["AWS_ENDPOINT_URL"]
        assert os.environ["AWS_DEFAULT_REGION"] == "eu-west-1" and "AWS_DEFAULT_REGION" not in applied
    finally:
        local.stop_service(service)
    assert not service.alive()
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert local.apply_service_env(state) == {}, "dead services contribute nothing"


def test_cli_rejects_unknown_services(tmp_path: Path) -> None:
    proc = _cli(tmp_path, "up", "--services", "s3,minio")
    assert proc.returncode == 2 and "minio" in proc.stderr and "s3,mlflow,ray" in proc.stderr.replace(", ", ",")

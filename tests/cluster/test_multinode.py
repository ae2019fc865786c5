"""A two-node Ray cluster on this machine runs a submitted training job across both nodes.

The cluster is what a user has on AWS, shrunk: a head started with ``ray start --head`` (token
authentication, dashboard for the job API) and a second node that joins it with
``ray start --address``, each offering 2 CPUs. The job is submitted with ``ray job submit`` and runs
the real ``trainer/run.py`` with 2 workers of 2 CPUs each, so Ray must place one worker per node.
Both nodes report 127.0.0.1: they are told apart by node id, read back from Ray's state API.

Every node runs in its own session (``ray start --block``); teardown stops those sessions' processes
only (never a machine-wide ``ray stop``, which would also stop unrelated Ray instances).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from cluster import local

REPO = Path(__file__).resolve().parents[2]
RAY = local._bin("ray")
HOST = "127.0.0.1"


class TwoNodeCluster:
    """Head + one worker node, each ``ray start --block`` in its own session."""

    def __init__(self) -> None:
        # Short root: Ray's unix sockets live under it (paths are limited to ~107 bytes).
        self.root = Path(tempfile.mkdtemp(prefix="rmn-", dir="/tmp"))
        token = self.root / "token"
        self.token = secrets.token_hex(32)
        token.write_text(self.token)
        token.chmod(0o600)
        self.port, self.dashboard_port = local.free_port(), local.free_port()
        self.dashboard = f"http://{HOST}:{self.dashboard_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        self.env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "DS_ACCELERATOR": "cpu",
                    "RAY_USAGE_STATS_ENABLED": "0"}
        self.nodes: list[local.Service] = []

    def _start(self, name: str, args: list[str]) -> None:
        log = self.root / f"{name}.log"
        cmd = [RAY, "start", "--block", f"--node-ip-address={HOST}", "--num-cpus=2", "--disable-usage-stats",
               f"--temp-dir={self.root / name}", f"--dashboard-agent-listen-port={local.free_port()}", *args]
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                                    cwd=REPO, start_new_session=True)
        self.nodes.append(local.Service(name, proc.pid, self.port, f"{HOST}:{self.port}", str(log)))

    def start(self, timeout_s: float = 90) -> None:
        self._start("head", ["--head", f"--port={self.port}", "--include-dashboard=true",
                             f"--dashboard-host={HOST}", f"--dashboard-port={self.dashboard_port}",
                             f"--ray-client-server-port={local.free_port()}"])
        self._wait(lambda: local._http_ok(f"{self.dashboard}/api/version"), timeout_s, "the head's dashboard")
        self._start("second", [f"--address={HOST}:{self.port}", '--resources={"second_node": 1}'])
        self._wait(lambda: len(self.alive_nodes()) == 2, timeout_s, "two alive nodes")

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [n.name for n in self.nodes if not n.alive()]
            assert not dead, f"ray start exited: {dead}\n{self.logs()}"
            if ready():
                return
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def state(self, kind: str, *filters: str) -> list[dict]:
        """What ``ray list <kind> --detail --filter key=value`` prints, from the state API endpoint that
        command reads (with the cluster's token): a few ms instead of a ~1.8 s CLI process a call."""
        params = [("limit", "1000"), ("detail", "True")]
        for item in filters:
            key, value = item.split("=", 1)
            params += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
        request = urllib.request.Request(f"{self.dashboard}/api/v0/{kind}?{urllib.parse.urlencode(params)}",
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.loads(response.read())
        assert body["result"], body["msg"]
        return body["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict]:
        try:
            return [n for n in self.state("nodes") if n["state"] == "ALIVE"]
        except (AssertionError, OSError, ValueError):  # the dashboard not up yet (URLError is an OSError)
            return []

    def logs(self) -> str:
        return "\n".join(f"--- {n.name}\n{local._tail(n.log, 30)}" for n in self.nodes)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            local.stop_service(node)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def two_nodes():
    cluster = TwoNodeCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_forwarded_env_leaves_the_jobs_own_variables_to_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster.ray_session import forwarded_env

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert {"DS_ACCELERATOR": "cpu", "AWS_DEFAULT_REGION": "us-west-2"}.items() <= forwarded_env().items()
    # What Ray's job supervisor sets for the driver of `ray job submit --runtime-env-json ...`.
    job = {"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": {"DS_ACCELERATOR": "cpu"}}, "metadata": {}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    env = forwarded_env()
    assert "DS_ACCELERATOR" not in env and env["AWS_DEFAULT_REGION"] == "us-west-2"


@pytest.mark.slow
def test_job_runs_one_worker_on_each_node(two_nodes: TwoNodeCluster, tiny_shards: Path, tmp_path: Path) -> None:
    from trainer.checkpoint import list_checkpoints, list_exports

    nodes = {n["node_id"]: n for n in two_nodes.alive_nodes()}
    second = [i for i, n in nodes.items() if n["resources_total"].get("second_node")]
    assert len(nodes) == 2 and len(second) == 1
    assert len({n["node_ip"] for n in nodes.values()}) == 1, "one machine, one IP: nodes differ by id only"

    output = tmp_path / "run"
    job_id = f"multinode-{uuid.uuid4().hex[:8]}"
    overrides = ["stage=tokenizer", "experiment=demo", f"data.train_shards={tiny_shards}", f"output_dir={output}",
                 "trainer.num_workers=2", "trainer.cpus_per_worker=2", "trainer.max_steps=4", "trainer.log_every=2",
                 "trainer.checkpoint_every=4", "trainer.image_log_every=0", "trainer.batch_size_per_worker=4",
                 "data.loader_workers=0", "data.shuffle_buffer=16", "model.vit_enc_width=64",
                 "model.vit_dec_width=64", "mlflow.enabled=false"]
    # The repository is on the nodes' filesystem already (as the file-mounted repo on a real cluster):
    # no --working-dir upload. The job's own env_vars name a variable the driver forwards too: Ray
    # refuses a driver runtime_env that repeats one, so this also checks that connect_ray leaves them out.
    submit = two_nodes.ray("job", "submit", "--address", two_nodes.dashboard, "--submission-id", job_id,
                           "--runtime-env-json", json.dumps({"env_vars": {"DS_ACCELERATOR": "cpu"}}),
                           "--", sys.executable, str(REPO / "trainer" / "run.py"), *overrides, timeout=240)
    log = submit.stdout + submit.stderr
    jobs = two_nodes.state("jobs", f"submission_id={job_id}")
    assert [j["status"] for j in jobs] == ["SUCCEEDED"], f"{jobs}\n{log[-6000:]}\n{two_nodes.logs()}"
    assert submit.returncode == 0, log[-6000:]

    workers = two_nodes.state("actors", "class_name=RayTrainWorker")
    assert len(workers) == 2, workers
    assert {w["node_id"] for w in workers} == set(nodes), "one trainer worker on each node"
    assert "step 4/4" in log, log[-6000:]  # rank 0's progress line, streamed back by `ray job submit`

    assert [step for step, _ in list_checkpoints(str(output))] == [4]
    assert [e.step for e in list_exports(str(output))] == [4]

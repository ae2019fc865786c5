"""An elastic run on a two-node Ray cluster survives a lost node, grows back, and checkpoints on preemption.

Two ``ray start`` nodes on 127.0.0.1 (as in test_multinode.py), each with room for one training worker.
The tokenizer trains with ``trainer.num_workers=[1,2]``. During the run the test

1. kills the second node without notice: the run goes on from its last complete checkpoint on the one
   worker left, with no operator;
2. starts the node again: the run grows back to two workers;
3. drains the node as a spot reclaim does (``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION
   --deadline-remaining-seconds N``): the workers checkpoint at the next step boundary and wait; at the
   deadline Ray Train restarts the run on the head alone, from that checkpoint, and the test kills the
   drained node, as the cloud would.

The run must reach its last step, keep its global batch (every step reads 8 samples), report
``perf/workers`` to MLflow, and redo no step after the preemption.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster.test_multinode import HOST, REPO, TwoNodeCluster

PREEMPTION_DEADLINE_S = 8


class ElasticCluster(TwoNodeCluster):
    """The two-node cluster, with fast node-failure detection and a second node that comes and goes."""

    def __init__(self) -> None:
        super().__init__()
        # Ray's GCS marks a node dead after health_check_failure_threshold missed checks (default ~15 s).
        # Ray Train's preemption watcher polls the drain state every 5 s by default.
        self.env.update({"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "3000",
                         "RAY_health_check_failure_threshold": "5", "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",
                         # Ray Train's default poll (tests/conftest.py lowers it): the run's pace, and so
                         # max_steps below, assume its ~2 s a checkpoint report.
                         "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2",
                         # Right after a node is lost (or drained), before Ray has marked it dead, Ray Train
                         # still sees room for 2 workers and waits for that group until this timeout
                         # (default 60 s) before it falls back to 1: measured 60 s of each restart here.
                         # A worker group starts in ~8 to 15 s on 2 cores.
                         "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30"})

    def second(self):
        return next(n for n in self.nodes if n.name == "second")

    def kill_second(self) -> None:
        from cluster import local

        node = self.second()
        local.stop_service(node)
        self.nodes.remove(node)

    def start_second(self, timeout_s: float = 90) -> None:
        self._start("second", [f"--address={HOST}:{self.port}", '--resources={"second_node": 1}'])
        self._wait(lambda: len(self.alive_nodes()) == 2, timeout_s, "the second node to come back")

    def second_node_id(self) -> str:
        nodes = [n for n in self.alive_nodes() if n["resources_total"].get("second_node")]
        assert len(nodes) == 1, nodes
        return nodes[0]["node_id"]


class Run:
    """``python trainer/run.py`` as a user starts it against the cluster, its console in a file."""

    def __init__(self, cluster: ElasticCluster, overrides: list[str], log: Path) -> None:
        self.log = log
        env = {**cluster.env, "RAY_ADDRESS": f"{HOST}:{cluster.port}"}
        with log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, str(REPO / "trainer" / "run.py"), "stage=tokenizer",
                                          *overrides], cwd=str(log.parent), env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout_s: float, after: int = 0) -> re.Match:
        """The first match of ``pattern`` in the console past character ``after``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = re.compile(pattern, re.M).search(self.text(), after)
            if match:
                return match
            assert self.proc.poll() is None, f"the run ended early:\n{self.text()[-6000:]}"
            time.sleep(0.5)
        raise AssertionError(f"no {pattern!r} within {timeout_s} s:\n{self.text()[-6000:]}")

    def restarted_with(self, workers: int, after: int) -> None:
        """Past console position ``after``, the run restarts with ``workers`` workers, resumes from a
        checkpoint and takes steps again."""
        header = self.wait_for(HEADER, 240, after)
        assert header.group(1) == str(workers), self.text()[after:][-4000:]
        resumed = self.wait_for(r"resumed from step (\d+)", 60, after)
        self.wait_for(rf"\[tokenizer\] step {int(resumed.group(1)) + 2}/", 120, header.end())

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture
def elastic_cluster():
    cluster = ElasticCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


HEADER = r"\[tokenizer\] (\d) worker\(s\), global batch 8"


@pytest.mark.slow
def test_elastic_run_survives_node_loss_grows_back_and_checkpoints_on_preemption(
        elastic_cluster: ElasticCluster, tiny_shards: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    output = tmp_path / "run"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Still running when the drain notice comes: the preemption checkpoint came at steps 66 to 86 in three
    # runs. The pace (~2.3 steps/s) is set by the checkpoint reports every 5 steps (Ray Train polls every
    # 2 s), not the CPU, so the margin is ~30 s of running whatever the machine's speed.
    max_steps = 160
    overrides = ["experiment=demo", f"data.train_shards={tiny_shards}", f"output_dir={output}",
                 "trainer.num_workers=[1,2]", "trainer.cpus_per_worker=2", f"trainer.max_steps={max_steps}",
                 "trainer.log_every=1", "trainer.checkpoint_every=5", "trainer.image_log_every=0",
                 "trainer.batch_size_per_worker=4", "trainer.elastic_resize_interval_s=2",
                 "trainer.record_sample_keys=true", "trainer.preemption_check_every=1",  # the default (demo: 10)
                 "data.loader_workers=0", "data.shuffle_buffer=16",
                 "model.vit_enc_width=64", "model.vit_dec_width=64", f"mlflow.tracking_uri={tracking}",
                 "mlflow.experiment=test-elastic"]
    run = Run(elastic_cluster, overrides, tmp_path / "train.log")
    try:
        first = run.wait_for(HEADER, 240)
        assert first.group(1) == "2", run.text()[-4000:]
        run.wait_for(r"\[tokenizer\] step 12/", 240, first.end())

        # 1. The second node dies without notice: the run goes on with one worker.
        elastic_cluster.kill_second()
        run.restarted_with(1, after=len(run.text()))

        # 2. It comes back: the group grows to two workers again.
        back = len(run.text())
        elastic_cluster.start_second()
        run.restarted_with(2, after=back)

        # 3. A preemption notice for the second node.
        drained = len(run.text())
        drain = elastic_cluster.ray("drain-node", "--address", f"{HOST}:{elastic_cluster.port}",
                                    "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim",
                                    "--deadline-remaining-seconds", str(PREEMPTION_DEADLINE_S),
                                    "--node-id", elastic_cluster.second_node_id())
        assert drain.returncode == 0, drain.stdout + drain.stderr
        saved = run.wait_for(r"preemption checkpoint \S+step_(\d+) written", 120, drained)
        checkpoint_step = int(saved.group(1))
        time.sleep(PREEMPTION_DEADLINE_S)
        elastic_cluster.kill_second()  # the reclaim itself
        after = run.wait_for(HEADER, 240, saved.end())
        assert after.group(1) == "1", run.text()[saved.end():][-4000:]
        restart = run.wait_for(r"resumed from step (\d+)", 60, saved.end())
        before_restart = run.text()[drained:restart.start()]
        last_logged = max(int(s) for s in re.findall(r"\[tokenizer\] step (\d+)/", before_restart, re.M))
        redone = last_logged - int(restart.group(1))
        print(f"\nsteps redone per preemption: {redone} (checkpoint at step {checkpoint_step}, resumed from "
              f"{restart.group(1)}, last step logged before the restart {last_logged})")
        assert int(restart.group(1)) == checkpoint_step and redone == 0

        assert run.proc.wait(timeout=600) == 0, run.text()[-6000:]
    finally:
        run.stop()
    text = run.text()
    assert f"done at step {max_steps}" in text
    assert (output / "checkpoints" / f"step_{max_steps:09d}" / "COMPLETE").exists()
    # The global batch never changed: every step read 8 samples, whatever the workers.
    per_step: dict[int, set[str]] = {}
    for path in (output / "sample_keys").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            per_step.setdefault(record["step"], set()).update(record["keys"])
    assert sorted(per_step) == list(range(1, max_steps + 1))
    assert {len(keys) for keys in per_step.values()} == {8}
    run_id = json.loads((output / "mlflow_run.json").read_text())["run_id"]
    workers = {m.step: m.value for m in MlflowClient(tracking).get_metric_history(run_id, "perf/workers")}
    assert set(workers.values()) == {1.0, 2.0} and workers[max_steps] == 1.0

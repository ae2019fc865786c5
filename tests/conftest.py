"""Shared fixtures: real services, started once per test session.

* ``s3_server``: moto's standalone S3 server on 127.0.0.1; the AWS variables point at it for the whole
  session, set *before* Ray starts so Ray workers inherit them.
* ``s3_bucket`` / ``store_root``: a fresh bucket, or a fresh root that is a local dir or an s3 prefix.
* ``ray_local``: one local Ray instance for the session.
* ``mlflow_server``: a real ``mlflow server`` with a SQLite store.

The services are started through ``cluster.local``, the same code users run.

The suite leaves nothing running: every process it starts carries :data:`tests.process_guard.MARKER`
in its environment, and ``_no_process_outlives_the_session`` (torn down after every other fixture)
turns any such process still alive at the end into an error, then kills it.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Every test runs on the CPU; DeepSpeed must not probe for accelerators.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# (DeepSpeed would JIT-build a CPU communication op, 30-60 s, when a process group first starts; training
# never uses it, and trainer/distributed.py's setup_worker keeps it from being built.)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Keep storage tests quick: small multipart parts (S3's minimum part size is 5 MiB) and short retries.
os.environ.setdefault("TITOK_S3_MULTIPART_THRESHOLD", str(5 * 1024 * 1024))
os.environ.setdefault("TITOK_S3_MULTIPART_CHUNKSIZE", str(5 * 1024 * 1024))
# Entry points must not pick up services a developer left running in ./.titok.
os.environ["TITOK_HOME"] = str(Path(os.environ.get("PYTEST_TITOK_HOME", "/tmp")) / f"titok-test-{os.getpid()}")

sys.path.insert(0, str(REPO_ROOT))

from tests import process_guard  # noqa: E402

# Inherited by every process the suite starts (Ray's workers too), so the end-of-session check finds
# them even after they were re-parented to init. One value per session: other sessions are not ours.
SESSION_MARKER_VALUE = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
os.environ[process_guard.MARKER] = SESSION_MARKER_VALUE
# How long processes that are shutting down get before they count as left running.
LEFTOVER_GRACE_S = 20.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running test (minutes); kept few")


@pytest.fixture(scope="session", autouse=True)
def _no_process_outlives_the_session():
    """Set up before every other fixture, so torn down after all of them (Ray, S3, MLflow servers):
    then nothing the suite started may still run. Leftovers are an error of the last test, listed,
    and killed so that they do not run on after the suite."""
    yield
    from cluster.ray_session import shutdown_ray

    shutdown_ray()  # a Ray instance an in-process entry point started (the trainer tests' launch())
    left = process_guard.wait_for_exit(SESSION_MARKER_VALUE, LEFTOVER_GRACE_S)
    if left:
        process_guard.kill(left)
        raise AssertionError(f"{len(left)} process(es) started by the test session were still running "
                             f"{LEFTOVER_GRACE_S:.0f} s after its end (now killed):\n"
                             + "\n".join(item.line() for item in left))


@pytest.fixture(autouse=True)
def _no_train_controller_outlives_its_test():
    """A test that calls ``TorchTrainer.fit()`` itself must give SIGINT back afterwards
    (``with cluster.ray_session.train_controller_released():``): fit()'s handler holds the run's controller, which
    then polls with its helpers for the rest of the session and makes the session's end wait ~15 s."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    yield
    after = signal.getsignal(signal.SIGINT)
    if after is not before:
        signal.signal(signal.SIGINT, before)
        raise AssertionError(f"the test left SIGINT's handler changed ({after!r}): a Ray Train controller "
                             "held alive; wrap fit() in cluster.ray_session.train_controller_released()")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real S3-speaking server (moto_server) for the whole session, with AWS env pointing at it."""
    from cluster import local

    service = local.start_s3(tmp_path_factory.mktemp("s3-service"), bucket="")
    saved = {k: os.environ.get(k) for k in service.env}
    os.environ.update(service.env)
    yield service
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    local.stop_service(service)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket: ``s3://<name>``."""
    from cluster import storage

    url = f"s3://test-{uuid.uuid4().hex[:12]}"
    storage.ensure_bucket(url)
    return url


@pytest.fixture(params=["local", "s3"])
def store_root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store root on each backend, for tests that must pass on both."""
    if request.param == "local":
        return str(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/root"


# Ray Train's controller takes one report off a worker's queue (of size 1) per poll, every 2 s by
# default, so a report with a checkpoint blocks until the one before it is taken: ~1.8 s a checkpoint
# when tests checkpoint every few steps. Set before any Ray starts, so the session's instance and the
# runs tests start as subprocesses inherit it. (tests/cluster/test_elastic.py keeps the default.)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray instance for the session (after the S3 env is set, so workers inherit it), started
    and stopped as the entry points do it (cluster/ray_session.py): at the end nothing of it runs on."""
    import ray

    from cluster.ray_session import connect_ray, shutdown_ray

    if "RAY_ADDRESS" in os.environ:  # the session's instance is local, whatever the developer's shell says
        os.environ.pop("RAY_ADDRESS")
    # More logical CPUs than cores: tests co-schedule trainer workers, controllers and actors.
    connect_ray(num_cpus=8)
    yield ray
    shutdown_ray()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real MLflow tracking server (SQLite backend, local artifacts); yields its tracking URI."""
    from cluster import local

    service = local.start_mlflow(tmp_path_factory.mktemp("mlflow-service"))
    yield service.url
    local.stop_service(service)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 training images of 2 demo classes in 2 shards: a handful a tiny tokenizer can overfit."""
    from data_prep.make_demo_data import make_demo_tree
    from tests.reader.conftest import build_shards

    root = tmp_path_factory.mktemp("tiny-shards")
    tree = make_demo_tree(root / "tree", classes=2, train_per_class=8, val_per_class=0, min_size=40, max_size=72,
                          quirks=False, seed=3)
    return build_shards(tree.root, root / "shards", "train", samples_per_shard=8)

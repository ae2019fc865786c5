"""Fixtures of the data-preparation tests: a small demo tree in ImageNet's layout, with its quirks."""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import pytest

from data_prep.make_demo_data import DemoTree, make_demo_tree

TREE = dict(classes=4, train_per_class=10, val_per_class=4, min_size=48, max_size=96, seed=3)


@pytest.fixture(scope="session")
def demo_tree(tmp_path_factory: pytest.TempPathFactory) -> DemoTree:
    """Read-only: 4 classes x 10 train + 4 val images, plus the five quirk files in train."""
    return make_demo_tree(tmp_path_factory.mktemp("demo") / "imagenet", **TREE)


@pytest.fixture
def demo_copy(demo_tree: DemoTree, tmp_path: Path) -> DemoTree:
    """A copy of the demo tree that a test may change."""
    root = tmp_path / "imagenet"
    shutil.copytree(demo_tree.root, root)
    return DemoTree(root, list(demo_tree.files))


def reference_shard_digest(data: bytes) -> str:
    """The shard digest computed independently of the writer, with tarfile's member offsets: the bytes
    around each member's content as they are, each content replaced by its sha256."""
    digest, position = hashlib.sha256(), 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            digest.update(data[position:member.offset_data])
            digest.update(hashlib.sha256(data[member.offset_data:member.offset_data + member.size]).digest())
            position = member.offset_data + member.size
    digest.update(data[position:])
    return digest.hexdigest()

"""Shards for the reader tests, written by the same functions the shard.py Ray tasks run (no Ray here)."""

from __future__ import annotations

import io
import itertools
import tarfile
from pathlib import Path

import pytest

from data_prep import manifest
from data_prep.make_demo_data import make_demo_tree
from data_prep.shard_plan import fingerprint, plan_shards
from data_prep.shard_writer import ShardOptions, ensure_shard
from data_prep.sources import list_split


def build_shards(tree_root: Path, output: Path, split: str = "train", samples_per_shard: int = 10, seed: int = 0) -> Path:
    listing = list_split(str(tree_root), split)
    specs = plan_shards(listing.items, split, seed, samples_per_shard)
    options = ShardOptions(output=str(output), split=split, fingerprint=fingerprint(listing.items, {"test": 1}))
    for spec in specs:
        ensure_shard(spec, options)
    manifest.write_manifests(str(output), split, len(specs), [r.row() for r in listing.rejected])
    return output


@pytest.fixture(scope="session")
def shards_80(tmp_path_factory) -> Path:
    """8 shards x 10 samples (4 classes x 20 train images, no quirks), 16 val images in 2 shards."""
    root = tmp_path_factory.mktemp("reader")
    tree = make_demo_tree(root / "tree", classes=4, train_per_class=20, val_per_class=4, min_size=40, max_size=90,
                          quirks=False)
    build_shards(tree.root, root / "shards", "train", samples_per_shard=10)
    build_shards(tree.root, root / "shards", "val", samples_per_shard=8)
    return root / "shards"


@pytest.fixture(scope="session")
def shards_48(tmp_path_factory) -> Path:
    """2 shards x 24 samples: fewer shards than 2 ranks x 2 workers (sample-level split)."""
    root = tmp_path_factory.mktemp("reader-few")
    tree = make_demo_tree(root / "tree", classes=4, train_per_class=12, val_per_class=0, min_size=40, max_size=90,
                          quirks=False, seed=5)
    return build_shards(tree.root, root / "shards", "train", samples_per_shard=24)


def manifest_labels(shards: Path, split: str = "train") -> dict[str, int]:
    rows = manifest.read_table(manifest.samples_url(str(shards), split)).to_pylist()
    return {r["key"]: r["label"] for r in rows}


def take(iterator, n: int) -> list:
    return list(itertools.islice(iterator, n))


def rewrite_with_garbage(path: Path, victim_indices: list[int]) -> list[str]:
    """Replace some samples' images by bytes that look like a JPEG but do not decode; their keys."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    jpgs = [m.name for m, _ in members if m.name.endswith(".jpg")]
    victims = {jpgs[i] for i in victim_indices}
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for member, payload in members:
            if member.name in victims:
                payload = b"\xff\xd8\xff\xe0garbage" + bytes(200) + b"\xff\xd9"
                member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    return [jpgs[i][:-4] for i in victim_indices]


def truncate_shard(path: Path, keep: int) -> list[str]:
    """Cut a shard a few bytes into the first file of sample ``keep``: samples ``0..keep-1`` stay
    whole, the rest is gone. Returns the kept keys (read with tarfile, independently of the reader)."""
    with tarfile.open(path) as tar:
        members = [m for m in tar if m.isfile()]
    keys = list(dict.fromkeys(m.name.rsplit(".", 1)[0] for m in members))
    first_of_cut = next(m for m in members if m.name.rsplit(".", 1)[0] == keys[keep])
    path.write_bytes(path.read_bytes()[: first_of_cut.offset_data + 10])
    return keys[:keep]

"""Which input goes into which shard, decided once and reproducibly.

The listing (sorted by source name) is shuffled with the seed and cut into shards of at most
``samples_per_shard`` images and ``max_bytes`` source bytes. The plan's fingerprint covers the
listing and every setting that changes shard contents; a shard record carries the fingerprint, so a
re-run keeps exactly the shards that this plan would write again.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np

from data_prep.sources import SourceItem
from data_prep.wnids import wnid_to_label

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class ShardSpec:
    index: int
    name: str                      # <split>-NNNNNN.tar
    items: tuple[SourceItem, ...]
    keys: tuple[str, ...]          # sample keys, unique within the split

    @property
    def source_bytes(self) -> int:
        return sum(item.size for item in self.items)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def record_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.json"


def sample_keys(items: list[SourceItem]) -> list[str]:
    """WebDataset keys from file stems (``n01440764_10026``); no dots (they start the extension), unique."""
    keys, seen = [], set()
    for item in items:
        base = _KEY_UNSAFE.sub("_", item.name.rsplit("/", 1)[-1].split(".", 1)[0]) or "sample"
        key, n = base, 1
        while key in seen:
            key, n = f"{base}_dup{n}", n + 1
        seen.add(key)
        keys.append(key)
    return keys


def plan_shards(items: list[SourceItem], split: str, seed: int, samples_per_shard: int,
                max_bytes: int = 0) -> list[ShardSpec]:
    """Shuffle ``items`` (already sorted by name) with ``seed`` and cut them into shards."""
    keys = sample_keys(items)
    order = np.random.default_rng(seed).permutation(len(items))
    shards: list[ShardSpec] = []
    current: list[int] = []
    current_bytes = 0

    def close() -> None:
        nonlocal current, current_bytes
        if current:
            index = len(shards)
            shards.append(ShardSpec(index, shard_name(split, index), tuple(items[i] for i in current),
                                    tuple(keys[i] for i in current)))
        current, current_bytes = [], 0

    for i in order.tolist():
        size = items[i].size
        if current and (len(current) >= samples_per_shard or (max_bytes and current_bytes + size > max_bytes)):
            close()
        current.append(i)
        current_bytes += size
    close()
    return shards


def fingerprint(items: list[SourceItem], settings: dict) -> str:
    """Digest of the listing and of the settings that decide shard bytes."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    labels = wnid_to_label()
    for item in items:
        digest.update(f"{item.name}\t{item.size}\t{labels[item.wnid]}\n".encode())
    return digest.hexdigest()

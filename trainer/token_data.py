"""Token shards (written by ``data_prep/pretokenize.py``) and the generator stage's batch stream.

Layout of a token dataset directory (local or s3://):

    tokens-000000.parquet ...   columns: key (string), label (int32), tokens (list<uint16>, K per row),
                                flip (bool: the row encodes the horizontally flipped image), crop (int8,
                                optional: index into the metadata's ``crops``; 0 when absent)
    manifest.parquet            one row per token shard: shard, rows, bytes, sha256 (and source, images),
                                plus dataset metadata (num_tokens, codebook_size, tokenizer, image_size,
                                crop policy, augment, crops, ...) as JSON under schema metadata key b"titok"

The whole dataset fits in memory (ImageNet at 32 tokens is ~82 MB as uint16), so the stream is
index arithmetic over seeded per-epoch permutations: batch ``b`` of every rank is known without
reading batches ``0..b-1``, which makes resuming exact and free.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from cluster import storage

TOKEN_SHARD_PREFIX = "tokens-"
MANIFEST = "manifest.parquet"


@dataclass
class TokenDataset:
    tokens: torch.Tensor      # int16/uint16-range values as int32 [N, K]
    labels: torch.Tensor      # int64 [N]
    keys: list[str]
    flips: torch.Tensor       # bool [N]
    metadata: dict
    crops: torch.Tensor | None = None   # int64 [N], index into metadata["crops"] (zeros without the column)

    def __len__(self) -> int:
        return self.tokens.shape[0]


def token_shard_urls(root: str) -> list[str]:
    return [f.url for f in storage.list_files(root)
            if f.url.rsplit("/", 1)[-1].startswith(TOKEN_SHARD_PREFIX) and f.url.endswith(".parquet")]


def read_metadata(root: str) -> dict:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(root, MANIFEST))))
    raw = (table.schema.metadata or {}).get(b"titok", b"{}")
    return json.loads(raw)


def load_token_dataset(root: str) -> TokenDataset:
    """Read every token shard under ``root`` (sorted by name, so every worker sees one order)."""
    import pyarrow.parquet as pq

    urls = token_shard_urls(root)
    if not urls:
        raise FileNotFoundError(f"no token shards ({TOKEN_SHARD_PREFIX}*.parquet) under {root}; "
                                "run data_prep/pretokenize.py first")
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(u))) for u in urls]
    keys: list[str] = []
    token_rows, labels, flips, crops = [], [], [], []
    for table in tables:
        if not table.num_rows:  # a shard whose images all failed to decode
            continue
        keys.extend(table.column("key").to_pylist())
        labels.append(table.column("label").to_numpy())
        flips.append(table.column("flip").to_numpy(zero_copy_only=False))
        crops.append(table.column("crop").to_numpy() if "crop" in table.column_names
                     else np.zeros(table.num_rows, np.int64))
        column = table.column("tokens").combine_chunks()
        token_rows.append(column.flatten().to_numpy().reshape(len(column), -1))
    metadata = read_metadata(root) if storage.exists(storage.join(root, MANIFEST)) else {}
    if not token_rows:
        raise ValueError(f"the token shards under {root} hold no rows")
    return TokenDataset(tokens=torch.from_numpy(np.concatenate(token_rows).astype(np.int32)),
                        labels=torch.from_numpy(np.concatenate(labels).astype(np.int64)),
                        keys=keys, flips=torch.from_numpy(np.concatenate(flips).astype(bool)),
                        metadata=metadata, crops=torch.from_numpy(np.concatenate(crops).astype(np.int64)))


class EpochPermutations:
    """Seeded permutation of the dataset for each epoch; keeps the last two (a batch may straddle)."""

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples, self.seed = num_samples, seed
        self._cache: dict[int, torch.Tensor] = {}

    def __call__(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._cache = {e: p for e, p in self._cache.items() if e >= epoch - 1}
            self._cache[epoch] = torch.randperm(self.num_samples, generator=generator)
        return self._cache[epoch]


def sample_indices(permutations: EpochPermutations, batch_size: int, rank: int, world_size: int,
                   batch_index: int) -> torch.Tensor:
    """Dataset indices of micro-batch ``batch_index`` on ``rank``.

    The global index stream is the concatenation of per-epoch permutations; micro-batch ``b`` of rank
    ``r`` is stream positions ``[(b * world + r) * B, ... + B)``. Ranks are disjoint within an epoch,
    and a batch may straddle two epochs when N is not a multiple of world * B.
    """
    n = permutations.num_samples
    start = (batch_index * world_size + rank) * batch_size
    positions = torch.arange(start, start + batch_size)
    epochs = positions // n
    out = torch.empty(batch_size, dtype=torch.int64)
    for epoch in epochs.unique().tolist():
        selected = epochs == epoch
        out[selected] = permutations(epoch)[positions[selected] % n]
    return out


def token_batches(root: str, batch_size: int, rank: int, world_size: int, seed: int,
                  start_batch: int = 0, dataset: TokenDataset | None = None
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (tokens LongTensor[B, K], labels LongTensor[B]) micro-batches from ``start_batch`` on."""
    data = dataset or load_token_dataset(root)
    permutations = EpochPermutations(len(data), seed)
    batch_index = start_batch
    while True:
        idx = sample_indices(permutations, batch_size, rank, world_size, batch_index)
        yield data.tokens[idx].long(), data.labels[idx]
        batch_index += 1

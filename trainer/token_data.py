"""Token shards (written by ``data_prep/pretokenize.py``) and the generator stage's batch stream.

Layout of a token dataset directory (local or s3://):

    tokens-000000.parquet ...   columns: key (string), label (int32), tokens (list<uint16>, K per row),
                                flip (bool: the row encodes the horizontally flipped image), crop (int8,
                                optional: index into the metadata's ``crops``; 0 when absent)
    manifest.parquet            one row per token shard: shard, rows, bytes, sha256 (and source, images),
                                plus dataset metadata (num_tokens, codebook_size, tokenizer, image_size,
                                crop policy, augment, crops, ...) as JSON under schema metadata key b"titok"

**Training order.** The whole dataset fits in memory (ImageNet at 32 tokens is ~82 MB as uint16),
so it is read as one logical stream (``trainer/batch_layout.py`` with ``streams=1``): the run's
order is the concatenation of seeded per-epoch permutations of the rows (:class:`EpochPermutations`),
and slot ``i`` of step ``s`` is the sample at position ``s * G + i`` of that order (counted from the
layout's origin when ``G`` was changed deliberately). Rank ``m`` computes the slots
``layout.rank_slots(m)``, cut into ``layout.micro_batches(m)``. Hence:

* the rows of every step depend on neither the number of ranks nor the micro-batch size;
* within an epoch every row is used exactly once, across any sequence of resizes (a step may
  straddle two epochs when ``N`` is not a multiple of ``G``);
* any step is index arithmetic, so resuming at step ``k`` is exact and free;
* a sample's ``position`` identifies it in the run, so per-sample randomness seeded by it (the
  generator stage's masking) does not depend on where the sample is computed either.
"""

from __future__ import annotations

import io
import itertools
import json
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import torch

from cluster import storage
from trainer.batch_layout import StepLayout

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


def dataset_rows(permutations: EpochPermutations, positions: torch.Tensor) -> torch.Tensor:
    """The dataset rows at ``positions`` (int64) of the run's order, the concatenation of the epochs'
    permutations."""
    n = permutations.num_samples
    epochs = positions // n
    rows = torch.empty_like(positions)
    for epoch in epochs.unique().tolist():
        selected = epochs == epoch
        rows[selected] = permutations(epoch)[positions[selected] % n]
    return rows


class TokenBatch(NamedTuple):
    tokens: torch.Tensor      # int64 [b, K]
    labels: torch.Tensor      # int64 [b]
    rows: torch.Tensor        # int64 [b]: dataset row indices
    positions: torch.Tensor   # int64 [b]: the samples' positions in the run's order (step * G + slot)
    step: int                 # the optimizer step the micro-batch belongs to
    micro: int                # its index among the step's micro-batches of this rank
    padding: bool = False     # a stand-in for an empty micro-batch (one real sample; loss weight 0)


def token_step_batches(dataset: TokenDataset, layout: StepLayout, rank: int, seed: int, start_step: int = 0
                       ) -> Iterator[TokenBatch]:
    """Rank ``rank``'s micro-batches, ``layout.accumulation`` per step, from ``start_step`` on (endless).

    An empty micro-batch (a world size that does not divide ``G``, with fewer slots than micro-batches)
    is replaced by a stand-in holding the rank's first sample of the step, ``padding=True``."""
    if layout.streams != 1:
        raise ValueError(f"token data is read as one stream; the layout has {layout.streams}")
    if not 0 <= rank < layout.world_size or start_step < 0:
        raise ValueError(f"rank must be in [0, {layout.world_size}) and start_step >= 0, got {rank}, {start_step}")
    permutations = EpochPermutations(len(dataset), seed)
    first = layout.rank_slots(rank).start
    micro_batches = [(slots, False) if slots else (range(first, first + 1), True) for slots in layout.micro_batches(rank)]
    for step in itertools.count(start_step):
        origin = layout.slot_source(step, 0)[1]   # one stream: slot i of the step is position origin + i
        for micro, (slots, padding) in enumerate(micro_batches):
            positions = torch.arange(origin + slots.start, origin + slots.stop, dtype=torch.int64)
            rows = dataset_rows(permutations, positions)
            yield TokenBatch(dataset.tokens[rows].long(), dataset.labels[rows], rows, positions, step, micro, padding)

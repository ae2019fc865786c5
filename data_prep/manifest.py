"""The manifests of a sharded split, under ``<output>/manifest/``.

* ``<split>.parquet``: one row per sample (key, shard, label, wnid, source, width, height, bytes,
  sha256 of the stored image bytes, converted, resized, offset of the image in the shard tar).
* ``<split>_rejected.parquet``: one row per input that could not be used (source, wnid, reason, detail).
* ``<split>_shards.parquet``: one row per shard (shard, samples, bytes, digest: see
  ``data_prep/shard_writer.py``); readers take the sample counts from here.
* ``<split>_plan.json``: the plan's fingerprint and settings; ``parts/<split>-NNNNNN.json``: the
  per-shard records the above are assembled from (the ledger that makes re-runs resume).
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from cluster import storage

SAMPLE_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("label", pa.int32()), ("wnid", pa.string()),
    ("source", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("bytes", pa.int64()),
    ("sha256", pa.string()), ("converted", pa.bool_()), ("resized", pa.bool_()), ("offset", pa.int64()),
])
REJECTED_SCHEMA = pa.schema([("source", pa.string()), ("wnid", pa.string()), ("reason", pa.string()),
                             ("detail", pa.string())])
ROW_GROUP_ROWS = 100_000
SHARD_SCHEMA = pa.schema([("shard", pa.string()), ("samples", pa.int64()), ("bytes", pa.int64()),
                          ("digest", pa.string())])


def manifest_dir(output: str) -> str:
    return storage.join(output, "manifest")


def samples_url(output: str, split: str) -> str:
    return storage.join(output, "manifest", f"{split}.parquet")


def rejected_url(output: str, split: str) -> str:
    return storage.join(output, "manifest", f"{split}_rejected.parquet")


def shards_url(output: str, split: str) -> str:
    return storage.join(output, "manifest", f"{split}_shards.parquet")


def plan_url(output: str, split: str) -> str:
    return storage.join(output, "manifest", f"{split}_plan.json")


def _write_table(url: str, rows: Iterable[dict[str, Any]], schema: pa.Schema) -> None:
    table = pa.Table.from_pylist(list(rows), schema=schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    storage.write_bytes(url, buffer.getvalue())


def read_table(url: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(url)))


def read_records(output: str, split: str, count: int, threads: int = 8) -> Iterator[dict[str, Any]]:
    """The shard records ``parts/<split>-000000.json ...`` in shard order (fetched a few at a time)."""
    from data_prep.shard_writer import record_url

    def fetch(index: int) -> dict[str, Any]:
        return json.loads(storage.read_bytes(record_url(output, split, index)))

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, count, 4 * threads):  # bounded look-ahead: memory stays at a few records
            yield from pool.map(fetch, range(start, min(count, start + 4 * threads)))


def write_manifests(output: str, split: str, shard_count: int, listing_rejected: list[dict[str, Any]]) -> None:
    """Assemble the three parquet manifests from the shard records, streaming one record at a time."""
    rejected = list(listing_rejected)
    shards = []
    with storage.open_write(samples_url(output, split)) as f, \
            pq.ParquetWriter(f, SAMPLE_SCHEMA, compression="zstd") as writer:
        batch: list[dict[str, Any]] = []
        for record in read_records(output, split, shard_count):
            batch.extend(record["samples"])
            rejected.extend(record["rejected"])
            shards.append({"shard": record["shard"], "samples": len(record["samples"]), "bytes": record["bytes"],
                           "digest": record["digest"]})
            if len(batch) >= ROW_GROUP_ROWS:
                writer.write_table(pa.Table.from_pylist(batch, schema=SAMPLE_SCHEMA))
                batch = []
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=SAMPLE_SCHEMA))
    _write_table(rejected_url(output, split), sorted(rejected, key=lambda x: x["source"]), REJECTED_SCHEMA)
    _write_table(shards_url(output, split), shards, SHARD_SCHEMA)


def read_plan(output: str, split: str) -> dict[str, Any] | None:
    url = plan_url(output, split)
    if not storage.exists(url):
        return None
    return json.loads(storage.read_bytes(url))


def write_plan(output: str, split: str, plan: dict[str, Any]) -> None:
    storage.write_bytes(plan_url(output, split), json.dumps(plan, sort_keys=True, indent=1).encode())


def shard_sample_counts(output: str, split: str) -> dict[str, int] | None:
    """``{shard file name: samples}`` from ``<split>_shards.parquet``, or None when there is none."""
    url = shards_url(output, split)
    if not storage.exists(url):
        return None
    table = read_table(url)
    return dict(zip(table.column("shard").to_pylist(), table.column("samples").to_pylist()))

"""The manifests of a sharded split, under ``<output>/manifest/``.

* ``<split>.parquet``: one row per sample (key, shard, label, wnid, source, width, height, bytes,
  sha256 of the stored image bytes, converted, resized, offset of the image in the shard tar).
* ``<split>_rejected.parquet``: one row per input that could not be used (source, wnid, reason, detail).
* ``<split>_shards.parquet``: one row per shard (shard, samples, bytes, sha256); readers take the
  sample counts from here.
* ``<split>_plan.json``: the plan's fingerprint and settings; ``parts/<split>-NNNNNN.json``: the
  per-shard records the above are assembled from (the ledger that makes re-runs resume).
"""

from __future__ import annotations

import io
import json
from typing import Any, Iterable

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
SHARD_SCHEMA = pa.schema([("shard", pa.string()), ("samples", pa.int64()), ("bytes", pa.int64()),
                          ("sha256", pa.string())])


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


def write_manifests(output: str, split: str, records: list[dict[str, Any]], listing_rejected: list[dict[str, Any]]) -> None:
    """Assemble the three parquet manifests from the shard records (in shard order)."""
    records = sorted(records, key=lambda r: r["index"])
    _write_table(samples_url(output, split), (s for r in records for s in r["samples"]), SAMPLE_SCHEMA)
    rejected = sorted(listing_rejected + [x for r in records for x in r["rejected"]], key=lambda x: x["source"])
    _write_table(rejected_url(output, split), rejected, REJECTED_SCHEMA)
    _write_table(shards_url(output, split), ({"shard": r["shard"], "samples": len(r["samples"]), "bytes": r["bytes"],
                                              "sha256": r["sha256"]} for r in records), SHARD_SCHEMA)


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

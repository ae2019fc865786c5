"""One token shard: tokenize an image shard (the body of a Ray actor's task), recognise a finished one,
or verify one.

Token shard ``tokens-NNNNNN.parquet`` holds, in the order of its image shard, one row per image and view
(``augment``): key (string), label (int32), tokens (list<uint16>, K per row), flip (bool), crop (int8,
index into the dataset's ``crops``). It is written atomically, then its record
``parts/tokens-NNNNNN.json`` (plan fingerprint, source and its size, rows, bytes, sha256, undecodable
samples). A token shard without a matching record is unfinished, and so is one whose image shard
changed size. Parquet bytes depend only on the rows (no timestamps), so a redone shard is
byte-identical to the first.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster import storage
from data_prep.schema import Augment
from data_prep.shard_writer import file_sha256
from trainer.token_data import TOKEN_SHARD_PREFIX

RECORD_VERSION = 1
TOKEN_SCHEMA = pa.schema([("key", pa.string()), ("label", pa.int32()), ("tokens", pa.list_(pa.uint16())),
                          ("flip", pa.bool_()), ("crop", pa.int8())])
# ten_crop: LlamaGen's recipe: the center square of side int(1.1 * image_size), then torchvision's
# five crops of image_size (row order: center first, then the corners), each also mirrored.
TEN_CROP_RANGE = 1.1
CROP_NAMES = {Augment.none: ("center",), Augment.flip: ("center",),
              Augment.ten_crop: ("center", "top_left", "top_right", "bottom_left", "bottom_right")}
DECODE_AHEAD = 64        # images decoded ahead of the encoder
ROWS_PER_CALL = 64       # rows moved to the device at once (a multiple of batch_size)


class InputShardError(RuntimeError):
    """An image shard that cannot be read to its end (truncated or not a tar)."""


def token_shard_name(index: int) -> str:
    return f"{TOKEN_SHARD_PREFIX}{index:06d}.parquet"


def token_shard_url(output: str, index: int) -> str:
    return storage.join(output, token_shard_name(index))


def record_url(output: str, index: int) -> str:
    return storage.join(output, "parts", f"{TOKEN_SHARD_PREFIX}{index:06d}.json")


def crop_size(image_size: int, augment: Augment) -> int:
    """Side of the center square the views are cut from."""
    return int(image_size * TEN_CROP_RANGE) if augment == Augment.ten_crop else image_size


def views_per_image(augment: Augment) -> list[tuple[int, bool]]:
    """(crop index, flipped) of each row an image becomes, in row order."""
    flips = (False,) if augment == Augment.none else (False, True)
    return [(crop, flip) for crop in range(len(CROP_NAMES[augment])) for flip in flips]


@dataclass(frozen=True)
class EncodeOptions:
    """Everything a tokenizer actor needs besides its shards (the same for every shard of a run)."""

    tokenizer: str
    output: str
    fingerprint: str
    image_size: int
    augment: Augment
    jpeg_draft: bool
    batch_size: int          # images per encoder call (1: each image alone)
    device: str              # "cpu" | "cuda"
    decode_threads: int = 1


@dataclass(frozen=True)
class ShardOutcome:
    """What a task reports to the driver (the rows stay in the token shard)."""

    record: dict[str, Any]   # what parts/tokens-NNNNNN.json holds
    start: float
    end: float


# ----------------------------------------------------------------------------------------------
# Reading and decoding: trainer.data's evaluation path, sample by sample


def image_views(files: dict[str, bytes], image_size: int, augment: Augment, draft: bool) -> list[np.ndarray]:
    """The HWC uint8 views of one sample, in :func:`views_per_image` order.

    The center crop is exactly what ``trainer.data.eval_batches`` yields for the sample (same decode,
    resize and crop functions); a flipped view is that array mirrored left-right."""
    from trainer.data import image_bytes_of, center_crop, decode_resized

    data = image_bytes_of(files)
    if data is None:
        raise ValueError(f"no image member (one of jpg, jpeg, png, webp) among {sorted(files)}")
    side = crop_size(image_size, augment)
    square = center_crop(decode_resized(data, side, draft), side)
    if augment == Augment.ten_crop:
        margin, middle = side - image_size, int(round((side - image_size) / 2.0))
        corners = [(middle, middle), (0, 0), (0, margin), (margin, 0), (margin, margin)]
        crops = [square[top:top + image_size, left:left + image_size] for top, left in corners]
    else:
        crops = [square]
    return [crops[crop][:, ::-1] if flip else crops[crop] for crop, flip in views_per_image(augment)]


def _samples(source: str) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """Every sample of an image shard, in order (trainer.data's tar reader); a damaged shard raises
    :class:`InputShardError` naming it."""
    from trainer.data import tar_samples

    seen = 0
    try:
        for sample in tar_samples(source, lambda index: True):
            seen += 1
            yield sample
    except Exception as err:  # noqa: BLE001 - I/O and tar errors alike: the shard cannot be read to its end
        raise InputShardError(f"image shard {source} is unreadable after {seen} samples ({type(err).__name__}: "
                              f"{str(err)[:300]}); re-create it (data_prep/shard.py redoes damaged shards)") from None


def _ordered_map(pool: ThreadPoolExecutor, fn, items: Iterable, ahead: int) -> Iterator:
    """``map(fn, items)`` on the pool, in order, with at most ``ahead`` items in flight."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# ----------------------------------------------------------------------------------------------
# The actor


class TokenizerWorker:
    """Holds one tokenizer and turns image shards into token shards (run as a Ray actor by pretokenize.py).

    CPU: torch runs on one thread, so an image's tokens never depend on the actor's CPU count (the
    encoder's 1x1 output convolution rounds differently with more threads). GPU: no TF32, cuDNN
    deterministic and never benchmarking, so every run picks the same kernels."""

    def __init__(self, options: EncodeOptions) -> None:
        import torch

        from trainer.models import load_tokenizer

        if options.device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("device=cuda but this actor sees no CUDA device")
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        else:
            torch.set_num_threads(1)
        storage.register_webdataset_s3()
        self.options = options
        self.device = torch.device(options.device)
        self.model = load_tokenizer(options.tokenizer).to(self.device).eval()
        self.pool = ThreadPoolExecutor(max_workers=max(1, options.decode_threads))

    def ready(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()} on {self.device}"

    def encode(self, views: list[np.ndarray]) -> np.ndarray:
        """Token ids (n, K) uint16 of HWC uint8 views, ``batch_size`` images per encoder call."""
        import torch

        from trainer.data import to_float_images

        images = to_float_images(torch.from_numpy(np.stack(views))).to(self.device)
        step = self.options.batch_size
        ids = torch.cat([self.model.encode(images[i:i + step]) for i in range(0, len(images), step)])
        return ids.cpu().numpy().astype(np.uint16)

    def tokenize(self, source: str) -> tuple[pa.Table, int, list[dict[str, str]]]:
        """(rows, images, undecodable samples) of one image shard. Raises :class:`InputShardError`."""
        opts = self.options
        views_of = views_per_image(opts.augment)
        columns: dict[str, list] = {"key": [], "label": [], "flip": [], "crop": []}
        tokens: list[np.ndarray] = []
        pending: list[np.ndarray] = []
        undecodable: list[dict[str, str]] = []
        images = 0
        # Rows go to the encoder in fixed groups counted from the start of the shard, so batch_size > 1
        # batches the same rows together in every run.
        per_call = opts.batch_size * max(1, ROWS_PER_CALL // opts.batch_size)

        def decode(sample: tuple[int, str, dict[str, bytes]]):
            _, key, files = sample
            try:
                return key, int(files["cls"]), image_views(files, opts.image_size, opts.augment, opts.jpeg_draft)
            except Exception as err:  # noqa: BLE001 - an undecodable sample is skipped, as in evaluation
                return key, None, f"{type(err).__name__}: {err}"[:300]

        for key, label, views in _ordered_map(self.pool, decode, _samples(source), DECODE_AHEAD):
            if label is None:
                undecodable.append({"key": key, "error": views})
                continue
            images += 1
            for (crop, flip), view in zip(views_of, views):
                columns["key"].append(key)
                columns["label"].append(label)
                columns["flip"].append(flip)
                columns["crop"].append(crop)
                pending.append(view)
            while len(pending) >= per_call:
                tokens.append(self.encode(pending[:per_call]))
                pending = pending[per_call:]
        if pending:
            tokens.append(self.encode(pending))
        width = self.model.config.num_latent_tokens
        flat = np.concatenate(tokens).reshape(-1) if tokens else np.zeros(0, np.uint16)
        offsets = pa.array(np.arange(0, flat.size + 1, width, dtype=np.int32))
        table = pa.Table.from_arrays(
            [pa.array(columns["key"], pa.string()), pa.array(columns["label"], pa.int32()),
             pa.ListArray.from_arrays(offsets, pa.array(flat, pa.uint16())), pa.array(columns["flip"], pa.bool_()),
             pa.array(columns["crop"], pa.int8())], schema=TOKEN_SCHEMA)
        return table, images, undecodable

    def encode_shard(self, index: int, source: str, source_bytes: int) -> ShardOutcome:
        """Tokenize image shard ``source`` (of ``source_bytes``) into token shard ``index``, then write its record."""
        start = time.time()
        opts = self.options
        table, images, undecodable = self.tokenize(source)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        data = buffer.getvalue()
        storage.write_bytes(token_shard_url(opts.output, index), data)
        record = {"version": RECORD_VERSION, "fingerprint": opts.fingerprint, "index": index,
                  "shard": token_shard_name(index), "source": source, "source_bytes": source_bytes, "images": images,
                  "rows": table.num_rows,
                  "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "undecodable": undecodable}
        storage.write_bytes(record_url(opts.output, index), json.dumps(record, sort_keys=True).encode())
        return ShardOutcome(record, start, time.time())


# ----------------------------------------------------------------------------------------------
# Resume and verify


def completed_record(output: str, index: int, fingerprint: str, source_bytes: int) -> dict[str, Any] | None:
    """The record of token shard ``index`` when the shard on storage is the one this plan writes from its
    image shard as it is now (same size: a repaired image shard is tokenized again), else None."""
    try:
        record = json.loads(storage.read_bytes(record_url(output, index)))
    except (storage.StorageError, ValueError):
        return None
    if (record.get("version") != RECORD_VERSION or record.get("fingerprint") != fingerprint
            or record.get("source_bytes") != source_bytes):
        return None
    url = token_shard_url(output, index)
    try:
        if storage.size(url) != record["bytes"] or file_sha256(url) != record["sha256"]:
            return None
    except storage.StorageError:
        return None
    return record


def verify_token_shard(url: str, expected: dict[str, Any], num_tokens: int, codebook_size: int) -> list[str]:
    """Re-read one token shard and compare it with its manifest row; returns the problems found."""
    name = url.rsplit("/", 1)[-1]
    try:
        data = storage.read_bytes(url)
    except storage.StorageError as err:
        return [f"{name}: cannot read ({err})"]
    problems = []
    if len(data) != expected["bytes"]:
        problems.append(f"{name}: {len(data)} bytes, manifest says {expected['bytes']}")
    if hashlib.sha256(data).hexdigest() != expected["sha256"]:
        problems.append(f"{name}: sha256 differs from the manifest")
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as err:  # noqa: BLE001 - any parse failure is a finding
        return problems + [f"{name}: unreadable parquet ({type(err).__name__}: {err})"]
    if not table.schema.equals(TOKEN_SCHEMA):
        return problems + [f"{name}: schema {table.schema.types} differs from {TOKEN_SCHEMA.types}"]
    if table.num_rows != expected["rows"]:
        problems.append(f"{name}: {table.num_rows} rows, manifest says {expected['rows']}")
    column = table.column("tokens").combine_chunks()
    lengths = column.value_lengths().to_numpy(zero_copy_only=False)
    if lengths.size and (lengths != num_tokens).any():
        problems.append(f"{name}: rows with other than {num_tokens} tokens")
    values = column.flatten().to_numpy()
    if values.size and int(values.max()) >= codebook_size:
        problems.append(f"{name}: token id {int(values.max())} >= codebook_size {codebook_size}")
    return problems

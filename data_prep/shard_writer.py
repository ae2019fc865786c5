"""One shard: write it (the body of a Ray task), recognise it as complete, or verify it.

A shard is a tar of samples ``<key>.jpg`` (stored image bytes), ``<key>.cls`` (label, ASCII) and
``<key>.json`` (wnid, label, source, width, height, converted, resized). Tar headers carry no time,
owner or permissions that vary, so the same plan always produces the same bytes. The tar is written
atomically, then its record ``manifest/parts/<split>-NNNNNN.json`` (size, sha256, one row per sample
and per rejected input); a shard without a matching record is incomplete.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from dataclasses import dataclass
from typing import IO, Any

from cluster import storage
from data_prep.image_check import RejectedImage, prepare_image
from data_prep.shard_plan import ShardSpec, record_name
from data_prep.sources import ItemReader, Reason, Rejection, SourceItem
from data_prep.wnids import wnid_to_label

TAR_FORMAT = tarfile.GNU_FORMAT
MEMBER_MODE = 0o444
RECORD_VERSION = 1


@dataclass(frozen=True)
class ShardOptions:
    """Everything a shard task needs besides its items (the same for every shard of a run)."""

    output: str
    split: str
    fingerprint: str
    full_decode: bool = False
    resize: int | None = None
    jpeg_quality: int = 95
    verify_checksum: bool = True    # when deciding whether an existing shard is complete


def shard_url(output: str, name: str) -> str:
    return storage.join(output, name)


def record_url(output: str, split: str, index: int) -> str:
    return storage.join(output, "manifest", "parts", record_name(split, index))


class _HashingWriter:
    """File wrapper that counts and hashes what passes through (one pass over the shard bytes)."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self.size


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, MEMBER_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class _TarWriter:
    """Appends members to a tar stream; the bytes are what ``tarfile`` writes (its header encoder),
    without its buffering layer, which costs more than the rest of a shard task's CPU time."""

    def __init__(self, out: _HashingWriter) -> None:
        self._out, self.offset = out, 0

    def add(self, name: str, data: bytes) -> int:
        """Append one member; returns the offset of its data in the tar."""
        header = _member(name, len(data)).tobuf(TAR_FORMAT, "utf-8", "surrogateescape")
        padding = -len(data) % tarfile.BLOCKSIZE
        self._out.write(header)
        self._out.write(data)
        if padding:
            self._out.write(tarfile.NUL * padding)
        data_offset = self.offset + len(header)
        self.offset = data_offset + len(data) + padding
        return data_offset

    def close(self) -> None:
        """End-of-archive blocks, then padding to a whole record (as tarfile does)."""
        end = self.offset + 2 * tarfile.BLOCKSIZE
        self._out.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))


def sample_json(wnid: str, label: int, source: str, width: int, height: int, converted: bool, resized: bool) -> bytes:
    return json.dumps({"wnid": wnid, "label": label, "source": source, "width": width, "height": height,
                       "converted": converted, "resized": resized}, sort_keys=True, separators=(",", ":")).encode()


# ----------------------------------------------------------------------------------------------
# Write


@dataclass(frozen=True)
class ShardOutcome:
    """What a shard task reports to the driver (the rows stay in the record on storage)."""

    index: int
    shard: str
    samples: int
    rejected: int
    bytes: int
    skipped: bool        # already complete: kept as it was
    start: float
    end: float


def ensure_shard(spec: ShardSpec, options: ShardOptions) -> ShardOutcome:
    """Make shard ``spec`` complete: keep it when its record and bytes match, otherwise (re)write it
    and then its record. Bad inputs become rejections in the record; storage failures raise."""
    start = time.time()
    record = completed_record(spec, options)
    skipped = record is not None
    if record is None:
        record = write_shard(spec, options)
        storage.write_bytes(record_url(options.output, options.split, spec.index),
                            json.dumps(record, sort_keys=True).encode())
    return ShardOutcome(spec.index, spec.name, len(record["samples"]), len(record["rejected"]), record["bytes"],
                        skipped, start, time.time())


def completed_record(spec: ShardSpec, options: ShardOptions) -> dict[str, Any] | None:
    """The shard's record when the shard on storage is the one this plan writes, else None."""
    rec_url = record_url(options.output, options.split, spec.index)
    try:
        record = json.loads(storage.read_bytes(rec_url))
    except (storage.StorageError, ValueError):
        return None
    if record.get("version") != RECORD_VERSION or record.get("fingerprint") != options.fingerprint:
        return None
    url = shard_url(options.output, spec.name)
    try:
        if storage.size(url) != record["bytes"]:
            return None
        if options.verify_checksum and file_sha256(url) != record["sha256"]:
            return None
    except storage.StorageError:
        return None
    return record


def file_sha256(url: str) -> str:
    digest = hashlib.sha256()
    with storage.open_read(url) as f:
        while chunk := f.read(4 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_shard(spec: ShardSpec, options: ShardOptions) -> dict[str, Any]:
    """Write the tar of ``spec`` atomically and return its record."""
    samples: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    with ItemReader() as reader, storage.open_write(shard_url(options.output, spec.name)) as raw:
        out = _HashingWriter(raw)
        tar = _TarWriter(out)
        for item, key in zip(spec.items, spec.keys):
            try:
                samples.append(_add_sample(tar, reader, item, key, spec.name, options))
            except RejectedImage as err:
                rejected.append(Rejection(item.name, item.wnid, err.reason, err.detail).row())
        tar.close()
    return {"version": RECORD_VERSION, "fingerprint": options.fingerprint, "shard": spec.name, "index": spec.index,
            "bytes": out.size, "sha256": out.sha256.hexdigest(), "samples": samples, "rejected": rejected}


def _add_sample(tar: _TarWriter, reader: ItemReader, item: SourceItem, key: str, shard: str,
                options: ShardOptions) -> dict[str, Any]:
    """Append one sample's three members; returns its manifest row. Raises RejectedImage."""
    try:
        source_bytes = reader.read(item)
    except Exception as err:  # noqa: BLE001 - a file we cannot read is a rejected input
        raise RejectedImage(Reason.UNREADABLE, f"{type(err).__name__}: {err}"[:300]) from None
    image = prepare_image(source_bytes, full_decode=options.full_decode, resize=options.resize,
                          jpeg_quality=options.jpeg_quality)
    label = wnid_to_label()[item.wnid]
    offset = tar.add(f"{key}.jpg", image.data)
    tar.add(f"{key}.cls", str(label).encode())
    tar.add(f"{key}.json", sample_json(item.wnid, label, item.name, image.width, image.height, image.converted,
                                       image.resized))
    return {"key": key, "shard": shard, "label": label, "wnid": item.wnid, "source": item.name,
            "width": image.width, "height": image.height, "bytes": len(image.data),
            "sha256": hashlib.sha256(image.data).hexdigest(), "converted": image.converted,
            "resized": image.resized, "offset": offset}


# ----------------------------------------------------------------------------------------------
# Verify


def verify_shard(url: str, expected_bytes: int, expected_sha256: str, rows: list[dict[str, Any]]) -> list[str]:
    """Re-read one shard and compare it with its manifest rows; returns the problems found."""
    name = url.rsplit("/", 1)[-1]
    problems: list[str] = []
    digest, size = hashlib.sha256(), 0
    members: dict[str, dict[str, bytes]] = {}
    try:
        with storage.open_read(url) as raw:
            class _Tee(io.RawIOBase):
                def readable(self) -> bool:
                    return True

                def readinto(self, buffer) -> int:
                    nonlocal size
                    data = raw.read(len(buffer))
                    digest.update(data)
                    size += len(data)
                    buffer[: len(data)] = data
                    return len(data)

            with tarfile.open(fileobj=io.BufferedReader(_Tee()), mode="r|") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    key, _, ext = info.name.partition(".")
                    members.setdefault(key, {})[ext] = tar.extractfile(info).read()  # type: ignore[union-attr]
            while raw.read(1 << 20):  # hash the end-of-archive padding too
                pass
    except storage.StorageError as err:
        return [f"{name}: cannot read ({err})"]
    except (tarfile.TarError, EOFError, OSError) as err:
        problems.append(f"{name}: unreadable tar ({type(err).__name__}: {err})")
    if size != expected_bytes:
        problems.append(f"{name}: {size} bytes, manifest says {expected_bytes}")
    if digest.hexdigest() != expected_sha256:
        problems.append(f"{name}: sha256 differs from the manifest")
    expected = {row["key"]: row for row in rows}
    for key in sorted(set(members) - set(expected)):
        problems.append(f"{name}: sample {key} is not in the manifest")
    for key, row in expected.items():
        files = members.get(key)
        if files is None:
            problems.append(f"{name}: sample {key} is missing")
            continue
        image = files.get("jpg", b"")
        if len(image) != row["bytes"] or hashlib.sha256(image).hexdigest() != row["sha256"]:
            problems.append(f"{name}: sample {key}: image bytes differ from the manifest")
        if files.get("cls", b"").decode(errors="replace") != str(row["label"]):
            problems.append(f"{name}: sample {key}: label differs from the manifest")
        try:
            meta = json.loads(files.get("json", b""))
            if meta.get("label") != row["label"] or meta.get("wnid") != row["wnid"]:
                problems.append(f"{name}: sample {key}: json metadata differs from the manifest")
        except ValueError:
            problems.append(f"{name}: sample {key}: json metadata unreadable")
    return problems

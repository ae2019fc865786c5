"""One shard: write it (the body of a Ray task), recognise it as complete, or verify it.

A shard is a tar of samples ``<key>.jpg`` (stored image bytes), ``<key>.cls`` (label, ASCII) and
``<key>.json`` (wnid, label, source, width, height, converted, resized). Tar headers carry no time,
owner or permissions that vary, so the same plan always produces the same bytes. The tar is written
atomically, then its record ``manifest/parts/<split>-NNNNNN.json`` (size, digest, one row per sample
with the sha256 of its image, one per rejected input); a shard without a matching record is incomplete.

**Digest.** sha256 of the tar in which every regular member's content is replaced by the sha256 of
that content (headers, padding and long-name blocks as they are). It covers every byte of the file, yet each image is
hashed only once, for its manifest row (hashing the file again cost as much as the rest of the
writer's work together). :func:`scan_shard` recomputes it from the bytes on storage.
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
RECORD_VERSION = 2   # 2: the shard's "digest" (1: "sha256" of the file)


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


class _DigestWriter:
    """File wrapper that counts what passes through and feeds the shard digest: raw bytes for headers
    and padding (:meth:`write`), the content's sha256 for member contents (:meth:`write_content`)."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f, self.digest, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self._f.write(data)

    def write_content(self, data: bytes, sha256: bytes) -> int:
        self.digest.update(sha256)
        self.size += len(data)
        return self._f.write(data)


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, MEMBER_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


# Header fields (POSIX ustar layout, which GNU format shares): name [0, 100), size [124, 136) as 11
# octal digits and NUL, checksum [148, 156) as 6 octal digits, NUL, space.
_NAME_END, _SIZE, _CHKSUM = 100, slice(124, 136), slice(148, 155)
_HEADER_TEMPLATE = _member("", 0).tobuf(TAR_FORMAT, "utf-8", "surrogateescape")
_TEMPLATE_CHKSUM_BASE = (256 + sum(_HEADER_TEMPLATE[_NAME_END:_SIZE.start]) + sum(_HEADER_TEMPLATE[_SIZE.stop:148])
                         + sum(_HEADER_TEMPLATE[156:]))
_MAX_OCTAL_SIZE = 8 ** 11 - 1


def member_header(name: str, size: int) -> bytes:
    """The tar header ``tarfile`` writes for a member of ours (see :func:`_member`), byte for byte.

    Filled into a header that ``tarfile`` made once: encoding one with ``TarInfo.tobuf`` costs ~20 us,
    a third of a shard task's CPU per image. Long or non-ASCII names and huge sizes, which need extra
    header blocks or other encodings, are left to ``tarfile``."""
    encoded = name.encode("ascii", "replace")
    if len(encoded) >= _NAME_END or size > _MAX_OCTAL_SIZE or not name.isascii():
        return _member(name, size).tobuf(TAR_FORMAT, "utf-8", "surrogateescape")
    size_field = b"%011o\0" % size
    header = bytearray(_HEADER_TEMPLATE)
    header[:len(encoded)] = encoded
    header[_SIZE] = size_field
    header[_CHKSUM] = b"%06o\0" % (_TEMPLATE_CHKSUM_BASE + sum(encoded) + sum(size_field))
    return bytes(header)


class _TarWriter:
    """Appends members to a tar stream; the bytes are what ``tarfile`` writes (its header encoder),
    without its buffering layer, which costs more than the rest of a shard task's CPU time."""

    def __init__(self, out: _DigestWriter) -> None:
        self._out, self.offset = out, 0

    def add(self, name: str, data: bytes, sha256: bytes | None = None) -> int:
        """Append one member (``sha256``: its content's digest, when the caller has it); returns the
        offset of its data in the tar."""
        header = member_header(name, len(data))
        padding = -len(data) % tarfile.BLOCKSIZE
        self._out.write(header)
        self._out.write_content(data, sha256 or hashlib.sha256(data).digest())
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
    cpu_s: float = 0.0   # CPU time of the task's process meanwhile (its waits on storage are not in it)


def ensure_shard(spec: ShardSpec, options: ShardOptions) -> ShardOutcome:
    """Make shard ``spec`` complete: keep it when its record and bytes match, otherwise (re)write it
    and then its record. Bad inputs become rejections in the record; storage failures raise."""
    start, cpu_start = time.time(), time.process_time()
    record = completed_record(spec, options)
    skipped = record is not None
    if record is None:
        record = write_shard(spec, options)
        storage.write_bytes(record_url(options.output, options.split, spec.index),
                            json.dumps(record, sort_keys=True).encode())
    return ShardOutcome(spec.index, spec.name, len(record["samples"]), len(record["rejected"]), record["bytes"],
                        skipped, start, time.time(), time.process_time() - cpu_start)


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
        if options.verify_checksum and scan_shard(url).digest != record["digest"]:
            return None
    except (storage.StorageError, tarfile.TarError, EOFError):
        return None
    return record


def file_sha256(url: str) -> str:
    digest = hashlib.sha256()
    with storage.open_read(url) as f:
        while chunk := f.read(4 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class ShardScan:
    """What :func:`scan_shard` read: size, digest, and (when asked) the members' contents by key."""

    size: int = 0
    digest: str = ""
    members: dict[str, dict[str, bytes]] | None = None


def scan_shard(url: str, keep_members: bool = False) -> ShardScan:
    """Stream a shard once: its size and digest (see the module docstring), and with ``keep_members``
    ``{key: {extension: bytes}}``. Raises ``tarfile.TarError`` (a damaged header) or ``EOFError``
    (the file ends inside a member) after reading what it could."""
    scan, digest = ShardScan(members={} if keep_members else None), hashlib.sha256()
    long_name: str | None = None
    with storage.open_read(url) as raw, io.BufferedReader(raw, 1 << 20) as f:  # type: ignore[arg-type]
        while True:
            header = f.read(tarfile.BLOCKSIZE)
            digest.update(header)
            scan.size += len(header)
            if len(header) < tarfile.BLOCKSIZE or header == tarfile.NUL * tarfile.BLOCKSIZE:
                break  # the end-of-archive blocks (or a truncated file): the rest is hashed as it is
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
            content = f.read(info.size)
            padding = f.read(-info.size % tarfile.BLOCKSIZE)
            digest.update(hashlib.sha256(content).digest() if info.isreg() else content)
            digest.update(padding)
            scan.size += len(content) + len(padding)
            if len(content) < info.size:
                raise EOFError(f"{url} ends inside member {info.name}")
            if info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = content.rstrip(tarfile.NUL).decode("utf-8", "surrogateescape")
                continue
            name, long_name = long_name or info.name, None
            if scan.members is not None and info.isfile():
                key, _, ext = name.partition(".")
                scan.members.setdefault(key, {})[ext] = content
        while rest := f.read(1 << 20):
            digest.update(rest)
            scan.size += len(rest)
    scan.digest = digest.hexdigest()
    return scan


def write_shard(spec: ShardSpec, options: ShardOptions) -> dict[str, Any]:
    """Write the tar of ``spec`` atomically and return its record."""
    samples: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    with ItemReader() as reader, storage.open_write(shard_url(options.output, spec.name)) as raw:
        out = _DigestWriter(raw)
        tar = _TarWriter(out)
        for (item, source), key in zip(reader.read_all(spec.items), spec.keys):
            try:
                samples.append(_add_sample(tar, item, source, key, spec.name, options))
            except RejectedImage as err:
                rejected.append(Rejection(item.name, item.wnid, err.reason, err.detail).row())
        tar.close()
    return {"version": RECORD_VERSION, "fingerprint": options.fingerprint, "shard": spec.name, "index": spec.index,
            "bytes": out.size, "digest": out.digest.hexdigest(), "samples": samples, "rejected": rejected}


def _add_sample(tar: _TarWriter, item: SourceItem, source: bytes | Exception, key: str, shard: str,
                options: ShardOptions) -> dict[str, Any]:
    """Append one sample's three members; returns its manifest row. Raises RejectedImage."""
    if isinstance(source, Exception):  # a file we cannot read is a rejected input
        raise RejectedImage(Reason.UNREADABLE, f"{type(source).__name__}: {source}"[:300])
    image = prepare_image(source, full_decode=options.full_decode, resize=options.resize,
                          jpeg_quality=options.jpeg_quality)
    label = wnid_to_label()[item.wnid]
    image_sha256 = hashlib.sha256(image.data).digest()
    offset = tar.add(f"{key}.jpg", image.data, image_sha256)
    tar.add(f"{key}.cls", str(label).encode())
    tar.add(f"{key}.json", sample_json(item.wnid, label, item.name, image.width, image.height, image.converted,
                                       image.resized))
    return {"key": key, "shard": shard, "label": label, "wnid": item.wnid, "source": item.name,
            "width": image.width, "height": image.height, "bytes": len(image.data),
            "sha256": image_sha256.hex(), "converted": image.converted,
            "resized": image.resized, "offset": offset}


# ----------------------------------------------------------------------------------------------
# Verify


def verify_shard(url: str, expected_bytes: int, expected_digest: str, rows: list[dict[str, Any]]) -> list[str]:
    """Re-read one shard and compare it with its manifest rows; returns the problems found."""
    name = url.rsplit("/", 1)[-1]
    problems: list[str] = []
    members: dict[str, dict[str, bytes]] = {}
    try:
        scan = scan_shard(url, keep_members=True)
    except storage.StorageError as err:
        return [f"{name}: cannot read ({err})"]
    except (tarfile.TarError, EOFError, OSError) as err:
        problems.append(f"{name}: unreadable tar ({type(err).__name__}: {err})")
    else:
        members = scan.members or {}
        if scan.size != expected_bytes:
            problems.append(f"{name}: {scan.size} bytes, manifest says {expected_bytes}")
        if scan.digest != expected_digest:
            problems.append(f"{name}: digest differs from the manifest")
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

"""Find the images of one ImageNet split in whatever form the user has it.

Forms (see ``data_prep/shard.py``):

* extracted folders ``<input>/<split>/<wnid>/*.JPEG`` (local or ``s3://``);
* a flat folder ``<input>/<split>/*.JPEG`` labelled by ``LOC_val_solution.csv`` (Kaggle) or
  ``ILSVRC2012_validation_ground_truth.txt`` (devkit IDs, mapped through the devkit synset order);
* the original archives ``ILSVRC2012_img_train.tar`` (a tar of one ``<wnid>.tar`` per class) and
  ``ILSVRC2012_img_val.tar`` (flat), indexed in place: no extraction, each image is a byte range of
  the archive. Archives must be on a local (or mounted) filesystem.

Listing never opens images; what cannot be used at this stage (zero bytes, unknown class, no label,
an unreadable archive member) is returned as a :class:`Rejection`.
"""

from __future__ import annotations

import csv
import io
import os
import tarfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import BinaryIO, Iterable, Iterator, Sequence

from cluster import storage
from data_prep.wnids import devkit_synsets, is_wnid, read_synset_order, wnid_to_label

KAGGLE_LABELS = "LOC_val_solution.csv"
DEVKIT_LABELS = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
DEVKIT_TARBALL = "ILSVRC2012_devkit_t12.tar.gz"


class Reason:
    """Why an input was rejected (the ``reason`` column of ``<split>_rejected.parquet``)."""

    UNREADABLE = "unreadable"
    TRUNCATED = "truncated"
    ZERO_BYTES = "zero_bytes"
    NOT_AN_IMAGE = "not_an_image"
    UNKNOWN_CLASS = "unknown_class"


class InputError(ValueError):
    """The input as a whole cannot be used (missing, unrecognised layout, no labels)."""


@dataclass(frozen=True, slots=True)
class SourceItem:
    """One input image: ``url`` whole, or bytes ``[offset, offset + size)`` of the archive ``url``."""

    name: str                 # shown in manifests, relative to the input (archives: archive/member/...)
    wnid: str
    size: int
    url: str
    offset: int = -1

    @property
    def in_archive(self) -> bool:
        return self.offset >= 0


@dataclass(frozen=True, slots=True)
class Rejection:
    source: str
    wnid: str | None
    reason: str
    detail: str = ""

    def row(self) -> dict:
        return {"source": self.source, "wnid": self.wnid, "reason": self.reason, "detail": self.detail}


@dataclass
class Listing:
    form: str                                   # folders | flat | train_archive | val_archive
    items: list[SourceItem] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Entry point


def list_split(input_url: str, split: str, labels: str | None = None, synsets: str | None = None) -> Listing:
    """All images of ``split`` under ``input_url``, sorted by name, with listing-time rejections."""
    input_url = _absolute(input_url)
    archive = _find_archive(input_url, split)
    if archive is not None:
        listing = _list_archive(archive, split, labels, synsets)
    else:
        split_url = storage.join(input_url, split)
        files = [f for f in storage.list_files(split_url) if not _hidden(f.url)]
        if not files:
            raise InputError(
                f"no images for split '{split}' under {input_url}: expected {split}/<wnid>/*.JPEG, a flat "
                f"{split}/ folder with labels, or ILSVRC2012_img_{split}.tar")
        listing = _list_folder(input_url, split_url, files, labels, synsets)
    listing.items.sort(key=lambda item: item.name)
    listing.rejected.sort(key=lambda r: r.source)
    return listing


def _absolute(url: str) -> str:
    return url if storage.is_remote(url) else os.path.abspath(url)


def _hidden(url: str) -> bool:
    return url.rstrip("/").rsplit("/", 1)[-1].startswith(".")


def _find_archive(input_url: str, split: str) -> str | None:
    if input_url.endswith(".tar"):
        if storage.is_remote(input_url) or not os.path.isfile(input_url):
            raise InputError(f"{input_url}: archives must be local files (or on a mounted filesystem)")
        return input_url
    candidate = storage.join(input_url, f"ILSVRC2012_img_{split}.tar")
    if not storage.is_remote(candidate) and os.path.isfile(candidate):
        return candidate
    return None


def _label_of(wnid: str) -> bool:
    return wnid in wnid_to_label()


# ----------------------------------------------------------------------------------------------
# Extracted folders


def _list_folder(input_url: str, split_url: str, files: Iterable[storage.FileInfo], labels: str | None,
                 synsets: str | None) -> Listing:
    prefix = split_url.rstrip("/") + "/"
    listing = Listing("folders")
    flat_labels: dict[str, str] | None = None
    label_files = {KAGGLE_LABELS, DEVKIT_LABELS}
    for info in files:
        rel = info.url[len(prefix):] if info.url.startswith(prefix) else PurePosixPath(info.url).name
        parts = rel.split("/")
        name = f"{PurePosixPath(split_url).name}/{rel}"
        if len(parts) == 1:
            if parts[0] in label_files:
                continue
            listing.form = "flat"
            if flat_labels is None:
                flat_labels = load_val_labels(find_labels(input_url, labels), synsets)
            wnid = flat_labels.get(_stem(parts[0]))
            if wnid is None:
                listing.rejected.append(Rejection(name, None, Reason.UNKNOWN_CLASS, "no label for this file"))
                continue
        else:
            wnid = parts[0]
        _add(listing, SourceItem(name, wnid, info.size, info.url))
    return listing


def _add(listing: Listing, item: SourceItem) -> None:
    if item.size == 0:
        listing.rejected.append(Rejection(item.name, item.wnid, Reason.ZERO_BYTES))
    elif not _label_of(item.wnid):
        detail = "not one of the 1000 ImageNet-1k classes" if is_wnid(item.wnid) else "not a wnid"
        listing.rejected.append(Rejection(item.name, item.wnid, Reason.UNKNOWN_CLASS, detail))
    else:
        listing.items.append(item)


def _stem(filename: str) -> str:
    return filename.split(".", 1)[0]


# ----------------------------------------------------------------------------------------------
# Validation labels


def find_labels(input_url: str, labels: str | None) -> str:
    """The labels file for a flat validation set: ``labels`` or one found next to the input."""
    if labels:
        labels = _absolute(labels)
        if not storage.exists(labels):
            raise InputError(f"labels file {labels} does not exist")
        return labels
    base = input_url if not input_url.endswith(".tar") else input_url.rsplit("/", 1)[0]
    candidates = [storage.join(base, KAGGLE_LABELS), storage.join(base, DEVKIT_LABELS),
                  storage.join(base, DEVKIT_DIR, "data", DEVKIT_LABELS), storage.join(base, DEVKIT_TARBALL)]
    for candidate in candidates:
        if storage.exists(candidate):
            return candidate
    raise InputError(f"flat validation images need labels: put {KAGGLE_LABELS}, {DEVKIT_LABELS} or "
                     f"{DEVKIT_TARBALL} in {base}, or pass labels=<file>")


def load_val_labels(labels_url: str, synsets: str | None = None) -> dict[str, str]:
    """``{"ILSVRC2012_val_00000001": "n01751748", ...}`` from a Kaggle CSV, a devkit ground-truth
    file (IDs in the devkit synset order), or the devkit tarball that contains the latter."""
    name = labels_url.rsplit("/", 1)[-1]
    data = storage.read_bytes(labels_url)
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        data = _member_of(data, DEVKIT_LABELS, labels_url)
        name = DEVKIT_LABELS
    text = data.decode("utf-8-sig")
    if name.endswith(".csv"):
        return _kaggle_labels(text, labels_url)
    order = read_synset_order(synsets) if synsets else devkit_synsets()
    out = {}
    for i, line in enumerate(l for l in text.splitlines() if l.strip()):
        try:
            out[f"ILSVRC2012_val_{i + 1:08d}"] = order[int(line) - 1]
        except (ValueError, IndexError):
            raise InputError(f"{labels_url}: line {i + 1}: expected a class ID in 1..{len(order)}, got {line!r}") from None
    return out


def _kaggle_labels(text: str, url: str) -> dict[str, str]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
        raise InputError(f"{url}: expected columns ImageId,PredictionString (Kaggle LOC_val_solution.csv)")
    out = {}
    for row in reader:
        tokens = (row["PredictionString"] or "").split()
        if tokens:
            out[_stem(row["ImageId"])] = tokens[0]
    return out


def _member_of(archive: bytes, member_name: str, url: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(member_name):
                return tar.extractfile(member).read()  # type: ignore[union-attr]
    raise InputError(f"{url} has no {member_name}")


# ----------------------------------------------------------------------------------------------
# Original archives, indexed in place


class _Window(io.RawIOBase):
    """Bytes ``[start, start + length)`` of a seekable file, as a seekable file (own handle)."""

    def __init__(self, fileobj: BinaryIO, start: int, length: int) -> None:
        self._f, self._start, self._length, self._pos = fileobj, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._length}[whence]
        self._pos = max(0, min(self._length, base + pos))
        return self._pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._length - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _list_archive(path: str, split: str, labels: str | None, synsets: str | None) -> Listing:
    archive = os.path.basename(path)
    file_size = os.path.getsize(path)
    with open(path, "rb") as headers, open(path, "rb") as data:
        members = _members(headers, archive)
        if any(m.name.endswith(".tar") for m, _ in members if m is not None):
            return _list_train_archive(path, archive, members, data, file_size)
        flat_labels = load_val_labels(find_labels(path, labels), synsets)
        listing = Listing("val_archive")
        for member, problem in members:
            if problem is not None:
                listing.rejected.append(problem)
                continue
            name = f"{archive}/{member.name}"
            wnid = flat_labels.get(_stem(PurePosixPath(member.name).name))
            if wnid is None:
                listing.rejected.append(Rejection(name, None, Reason.UNKNOWN_CLASS, "no label for this file"))
            elif member.offset_data + member.size > file_size:
                listing.rejected.append(Rejection(name, wnid, Reason.TRUNCATED, "archive ends inside this member"))
            else:
                _add(listing, SourceItem(name, wnid, member.size, path, member.offset_data))
        return listing


def _members(fileobj: BinaryIO, source: str) -> list[tuple[tarfile.TarInfo | None, Rejection | None]]:
    """Regular-file members of a tar; a damaged tail becomes one rejection instead of an error."""
    out: list[tuple[tarfile.TarInfo | None, Rejection | None]] = []
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            for member in tar:
                if member.isfile() and not _hidden(member.name):
                    out.append((member, None))
    except (tarfile.TarError, EOFError, OSError) as err:
        out.append((None, Rejection(source, None, Reason.TRUNCATED, f"unreadable after {len(out)} members: {err}")))
    return out


def _list_train_archive(path: str, archive: str, members, data: BinaryIO, file_size: int) -> Listing:
    listing = Listing("train_archive")
    for member, problem in members:
        if problem is not None:
            listing.rejected.append(problem)
            continue
        class_tar = f"{archive}/{member.name}"
        if not member.name.endswith(".tar"):
            listing.rejected.append(Rejection(class_tar, None, Reason.UNKNOWN_CLASS, "not a per-class tar"))
            continue
        wnid = _stem(PurePosixPath(member.name).name)
        length = min(member.size, max(0, file_size - member.offset_data))
        window = io.BufferedReader(_Window(data, member.offset_data, length))
        for inner, inner_problem in _members(window, class_tar):  # type: ignore[arg-type]
            if inner_problem is not None:
                listing.rejected.append(Rejection(inner_problem.source, wnid, inner_problem.reason, inner_problem.detail))
                continue
            name = f"{class_tar}/{inner.name}"
            if inner.offset_data + inner.size > length:
                listing.rejected.append(Rejection(name, wnid, Reason.TRUNCATED, "archive ends inside this member"))
                continue
            _add(listing, SourceItem(name, wnid, inner.size, path, member.offset_data + inner.offset_data))
    return listing


# ----------------------------------------------------------------------------------------------
# Reading


class ItemReader:
    """Reads items' bytes; keeps one handle per archive open (a shard reads many of its members)."""

    REMOTE_THREADS = 16   # S3 GETs in flight per shard task: each waits ~10-50 ms for the first byte

    def __init__(self) -> None:
        self._handles: dict[str, BinaryIO] = {}

    def read_all(self, items: Sequence[SourceItem]) -> Iterator[tuple[SourceItem, bytes | Exception]]:
        """(item, its bytes or the error that reading it raised), in order.

        Remote items are fetched :attr:`REMOTE_THREADS` at a time ahead of the consumer; local ones
        inline (from the page cache a read takes less CPU than handing it to a thread)."""
        if not any(storage.is_remote(item.url) for item in items):
            for item in items:
                yield item, self._read_or_error(item)
            return
        with ThreadPoolExecutor(self.REMOTE_THREADS) as pool:
            ahead: deque[tuple[SourceItem, Future]] = deque()
            for item in items:
                ahead.append((item, pool.submit(self._read_or_error, item)))
                if len(ahead) >= 2 * self.REMOTE_THREADS:  # bounded: memory stays at a few dozen images
                    first, future = ahead.popleft()
                    yield first, future.result()
            while ahead:
                first, future = ahead.popleft()
                yield first, future.result()

    def _read_or_error(self, item: SourceItem) -> bytes | Exception:
        try:
            return self.read(item)
        except Exception as err:  # noqa: BLE001 - the caller turns it into a rejection
            return err

    def read(self, item: SourceItem) -> bytes:
        if not item.in_archive:
            return storage.read_bytes(item.url)
        handle = self._handles.get(item.url)
        if handle is None:
            handle = self._handles[item.url] = open(item.url, "rb")
        handle.seek(item.offset)
        data = handle.read(item.size)
        if len(data) != item.size:
            raise EOFError(f"archive ends after {len(data)} of {item.size} bytes")
        return data

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> "ItemReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

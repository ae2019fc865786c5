"""One small storage API over local paths and ``s3://bucket/key`` URLs.

Every path-taking part of the system goes through here, so a local directory and an S3 bucket (AWS,
MinIO, moto's server, ...) are interchangeable by URL alone.

* S3 endpoint and credentials come from the standard AWS chain (``AWS_ENDPOINT_URL``, env vars,
  profiles, instance roles); nothing here reads secrets itself.
* Writes are atomic: a local file is written to a temp name and renamed; an S3 object becomes visible
  only when its (possibly multipart) upload completes, and an aborted upload leaves no object.
* Transient errors are retried by botocore's own retry machinery (``standard`` mode, exponential
  backoff with jitter); connection errors and throttling included.
* Errors are :class:`StorageError` with the URL and a reason; secret values never appear in them.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Iterator

S3_SCHEME = "s3://"

# Multipart threshold/chunk size (bytes). Env overrides let tests exercise multipart with small data.
MULTIPART_THRESHOLD = int(os.environ.get("TITOK_S3_MULTIPART_THRESHOLD", 64 * 1024 * 1024))
MULTIPART_CHUNKSIZE = int(os.environ.get("TITOK_S3_MULTIPART_CHUNKSIZE", 64 * 1024 * 1024))
# botocore attempts (first try included); with standard-mode backoff (base 2, capped at 20 s) the
# default of 10 attempts rides out roughly a minute of an unreachable endpoint.
MAX_ATTEMPTS = int(os.environ.get("TITOK_S3_MAX_ATTEMPTS", 10))


class StorageError(RuntimeError):
    """A storage operation that failed for a reason the user must act on."""


@dataclass(frozen=True)
class FileInfo:
    url: str
    size: int


def is_remote(url: str) -> bool:
    return str(url).startswith(S3_SCHEME)


def join(base: str, *parts: str) -> str:
    """Join path components; keeps ``s3://`` URLs as URLs."""
    base = str(base)
    if is_remote(base):
        out = base.rstrip("/")
        for part in parts:
            out = f"{out}/{str(part).strip('/')}"
        return out
    return str(Path(base, *[str(p) for p in parts]))


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_remote(url):
        raise StorageError(f"not an s3 URL: {url}")
    bucket, _, key = url[len(S3_SCHEME):].partition("/")
    if not bucket:
        raise StorageError(f"s3 URL without a bucket: {url}")
    return bucket, key


# ----------------------------------------------------------------------------------------------
# S3 client (one per process and thread; boto3 clients are thread-safe but sessions are not)

_local = threading.local()


def s3_client():
    """A boto3 S3 client configured for retries; cached per thread and per endpoint/process."""
    key = (os.getpid(), os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ENDPOINT_URL_S3"))
    cache = getattr(_local, "clients", None)
    if cache is None:
        cache = _local.clients = {}
    if key not in cache:
        import boto3
        from botocore.config import Config

        config = Config(
            retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
            connect_timeout=10,
            read_timeout=120,
            # Path-style addressing works against every S3-compatible server (moto, MinIO).
            s3={"addressing_style": "path"} if os.environ.get("AWS_ENDPOINT_URL") else {},
        )
        session = boto3.session.Session()
        cache[key] = session.client("s3", config=config,
                                    region_name=session.region_name or os.environ.get("AWS_DEFAULT_REGION")
                                    or "us-east-1")
    return cache[key]


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNKSIZE,
                          max_concurrency=4)


@contextlib.contextmanager
def _s3_errors(url: str, action: str) -> Iterator[None]:
    """Translate botocore/boto3 failures into StorageError messages without any secret values."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (ClientError, BotoCoreError, S3UploadFailedError) as err:
        # boto3's transfer manager wraps the client error of a failed upload.
        cause = err.__cause__ or err.__context__ if isinstance(err, S3UploadFailedError) else err
        raise StorageError(f"cannot {action} {url}: {_reason(cause or err, url)}") from None


def _reason(err: BaseException, url: str) -> str:
    from botocore.exceptions import (ClientError, EndpointConnectionError, NoCredentialsError,
                                     PartialCredentialsError)

    bucket = split_s3(url)[0]
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", "Unknown"))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return f"bucket '{bucket}' does not exist"
        if code in ("NoSuchKey", "404", "NotFound"):
            return "no such object"
        if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"access denied ({code}); check the credentials and the bucket policy for '{bucket}'"
        return f"{code} (HTTP {status})"
    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        return ("no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, "
                "or an instance role)")
    if isinstance(err, EndpointConnectionError):
        return f"endpoint unreachable ({err.kwargs.get('endpoint_url')}) after {MAX_ATTEMPTS} attempts"
    return type(err).__name__


def _not_found(url: str) -> StorageError:
    return StorageError(f"cannot read {url}: no such file or object")


# ----------------------------------------------------------------------------------------------
# Reading


def open_read(url: str) -> BinaryIO:
    """A streaming binary reader. Use as a context manager."""
    if is_remote(url):
        bucket, key = split_s3(url)
        with _s3_errors(url, "read"):
            body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        return _StreamingBody(body)  # type: ignore[return-value]
    try:
        return open(url, "rb")
    except FileNotFoundError:
        raise _not_found(url) from None


class _StreamingBody(io.RawIOBase):
    """botocore's StreamingBody as a file object (readinto, context manager)."""

    def __init__(self, body) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self._body.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)

    def read(self, size: int = -1) -> bytes:
        return self._body.read(None if size is None or size < 0 else size)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


def read_bytes(url: str, start: int | None = None, end: int | None = None) -> bytes:
    """The whole object, or bytes ``[start, end)``."""
    if is_remote(url):
        bucket, key = split_s3(url)
        kwargs = {}
        if start is not None or end is not None:
            first = start or 0
            kwargs["Range"] = f"bytes={first}-{'' if end is None else end - 1}"
            if end is not None and end <= first:
                return b""
        with _s3_errors(url, "read"):
            return s3_client().get_object(Bucket=bucket, Key=key, **kwargs)["Body"].read()
    try:
        with open(url, "rb") as f:
            if start:
                f.seek(start)
            if end is None:
                return f.read()
            return f.read(max(0, end - (start or 0)))
    except FileNotFoundError:
        raise _not_found(url) from None


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def download_file(url: str, local_path: str | os.PathLike) -> None:
    local_path = Path(local_path)
    local_path.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(url):
        bucket, key = split_s3(url)
        tmp = local_path.with_name(f".{local_path.name}.part")
        with _s3_errors(url, "download"):
            s3_client().download_file(bucket, key, str(tmp), Config=_transfer_config())
        os.replace(tmp, local_path)
    else:
        if not os.path.exists(url):
            raise _not_found(url)
        shutil.copyfile(url, local_path)


# ----------------------------------------------------------------------------------------------
# Writing (atomic)


def write_bytes(url: str, data: bytes) -> None:
    """Write an object atomically (a reader never sees part of it)."""
    with open_write(url) as f:
        f.write(data)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


class _WritebackWriter(io.BufferedWriter):
    """A buffered local file that asks the kernel to start writing every ``chunk`` bytes to disk as
    soon as they are written, so the final fsync waits for the last chunk only, not the whole file:
    for big files the disk works while the bytes are produced, as ``tar`` gets from the kernel's
    background writeback. (Linux: ``posix_fadvise(DONTNEED)`` starts writeback of dirty pages.)"""

    def __init__(self, raw: io.FileIO, chunk: int) -> None:
        super().__init__(raw, buffer_size=io.DEFAULT_BUFFER_SIZE)
        self._chunk, self._written, self._kicked = chunk, 0, 0

    def write(self, data) -> int:  # type: ignore[override]
        n = super().write(data)
        self._written += n  # counted here: tell() would cost a system call per write
        if self._written - self._kicked >= self._chunk:
            self.flush()
            os.posix_fadvise(self.fileno(), self._kicked, self._written - self._kicked, os.POSIX_FADV_DONTNEED)
            self._kicked = self._written
        return n


WRITEBACK_CHUNK = 1024 * 1024


@contextlib.contextmanager
def open_write(url: str) -> Iterator[IO[bytes]]:
    """A binary file to write; the object appears atomically on clean exit, not at all on error.

    Local: temp file in the target folder (its writeback to disk starts every MB on Linux), fsync,
    rename. S3: spooled to a local temp file, then one upload (multipart above the threshold), which
    S3 publishes only when complete.
    """
    if is_remote(url):
        tmp = tempfile.NamedTemporaryFile(prefix="titok-upload-", delete=False)
        try:
            with tmp:
                yield tmp
            upload_file(tmp.name, url)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp.name)
        return
    target = Path(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        raw = io.FileIO(fd, "w")
        with (_WritebackWriter(raw, WRITEBACK_CHUNK) if hasattr(os, "posix_fadvise") else io.BufferedWriter(raw)) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def upload_file(local_path: str | os.PathLike, url: str) -> None:
    """Copy a local file to ``url`` atomically (multipart upload for large files on S3)."""
    if is_remote(url):
        bucket, key = split_s3(url)
        with _s3_errors(url, "write"):
            s3_client().upload_file(str(local_path), bucket, key, Config=_transfer_config())
        return
    with open(local_path, "rb") as src, open_write(url) as dst:
        shutil.copyfileobj(src, dst, length=4 * 1024 * 1024)


# ----------------------------------------------------------------------------------------------
# Metadata, listing, delete, copy


def exists(url: str) -> bool:
    if is_remote(url):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(url)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as err:
            if str(err.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return False
            with _s3_errors(url, "stat"):
                raise
    return os.path.exists(url)


def size(url: str) -> int:
    if is_remote(url):
        bucket, key = split_s3(url)
        with _s3_errors(url, "stat"):
            return int(s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    try:
        return os.path.getsize(url)
    except FileNotFoundError:
        raise _not_found(url) from None


def list_files(prefix_url: str) -> list[FileInfo]:
    """Every object/file under a prefix (recursive), sorted by URL. A missing prefix lists nothing.

    For a local path the prefix is a directory; for S3 it is a key prefix (``s3://b/dir`` lists
    ``dir/...`` only, not ``dir2/...``).
    """
    if is_remote(prefix_url):
        bucket, key = split_s3(prefix_url)
        prefix = key.rstrip("/") + "/" if key else ""
        out: list[FileInfo] = []
        with _s3_errors(prefix_url, "list"):
            pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    out.append(FileInfo(f"{S3_SCHEME}{bucket}/{obj['Key']}", int(obj["Size"])))
        return sorted(out, key=lambda f: f.url)
    root = Path(prefix_url)
    if root.is_file():
        return [FileInfo(str(root), root.stat().st_size)]
    if not root.is_dir():
        return []
    found = [FileInfo(str(p), p.stat().st_size) for p in root.rglob("*") if p.is_file()]
    return sorted(found, key=lambda f: f.url)


def delete(url: str) -> None:
    """Delete one object/file (missing is fine)."""
    if is_remote(url):
        bucket, key = split_s3(url)
        with _s3_errors(url, "delete"):
            s3_client().delete_object(Bucket=bucket, Key=key)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(url)


def delete_prefix(prefix_url: str) -> None:
    """Delete everything under a prefix/directory."""
    if is_remote(prefix_url):
        for info in list_files(prefix_url):
            delete(info.url)
        return
    shutil.rmtree(prefix_url, ignore_errors=True)


def copy(src: str, dst: str) -> None:
    """Copy one object; server-side when both are on S3."""
    if is_remote(src) and is_remote(dst):
        sb, sk = split_s3(src)
        db, dk = split_s3(dst)
        with _s3_errors(src, "copy"):
            s3_client().copy({"Bucket": sb, "Key": sk}, db, dk, Config=_transfer_config())
        return
    if is_remote(src):
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp, "obj")
            download_file(src, local)
            upload_file(local, dst)
        return
    if not os.path.exists(src):
        raise _not_found(src)
    upload_file(src, dst)


def ensure_bucket(url: str) -> None:
    """Create the bucket of an s3 URL if it is missing (local services and tests)."""
    if not is_remote(url):
        return
    from botocore.exceptions import ClientError

    bucket, _ = split_s3(url)
    client = s3_client()
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError:
        with _s3_errors(url, "create bucket for"):
            client.create_bucket(Bucket=bucket)


def local_dir(url: str) -> str:
    """For local URLs the directory itself (created); for S3 a fresh temp directory."""
    if is_remote(url):
        return tempfile.mkdtemp(prefix="titok-")
    Path(url).mkdir(parents=True, exist_ok=True)
    return url


def upload_dir(local_path: str | os.PathLike, url: str) -> None:
    """Copy a directory tree to ``url`` file by file (each file atomic)."""
    local_path = Path(local_path)
    for path in sorted(p for p in local_path.rglob("*") if p.is_file()):
        upload_file(path, join(url, path.relative_to(local_path).as_posix()))


def download_dir(url: str, local_path: str | os.PathLike) -> None:
    """Copy every object under ``url`` into a local directory."""
    prefix = url.rstrip("/") + ("/" if is_remote(url) else os.sep)
    for info in list_files(url):
        rel = info.url[len(prefix):] if info.url.startswith(prefix) else Path(info.url).name
        download_file(info.url, Path(local_path, rel))


# ----------------------------------------------------------------------------------------------
# webdataset integration

def _wds_s3_opener(url: str, mode: str = "rb", bufsize: int = 8192, **_kw):
    if "r" not in mode:
        raise StorageError(f"webdataset may only read s3 URLs here, not write ({url})")
    return io.BufferedReader(open_read(url), buffer_size=max(bufsize, 1024 * 1024))


def register_webdataset_s3() -> None:
    """Let webdataset open ``s3://`` URLs by streaming ``get_object`` bodies through boto3."""
    import webdataset

    webdataset.gopen_schemes["s3"] = _wds_s3_opener


__all__ = [
    "StorageError", "FileInfo", "is_remote", "join", "split_s3", "open_read", "read_bytes", "read_text",
    "download_file", "write_bytes", "write_text", "open_write", "upload_file", "exists", "size", "list_files",
    "delete", "delete_prefix", "copy", "ensure_bucket", "local_dir", "upload_dir", "download_dir",
    "register_webdataset_s3", "s3_client",
]


def pyarrow_filesystem(url: str):
    """(pyarrow filesystem, path) for libraries that take one (Ray Train's storage): S3 with the
    same endpoint/credential chain as boto3, or the local filesystem."""
    import pyarrow.fs as pafs

    if not is_remote(url):
        return pafs.LocalFileSystem(), str(Path(url).resolve())
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {"region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or endpoint, scheme=scheme if host else "https")
    return pafs.S3FileSystem(**kwargs), url[len(S3_SCHEME):].rstrip("/")

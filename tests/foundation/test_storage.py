"""Storage API on a local directory and on a real S3-speaking server, through the same test bodies."""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time

import pytest

from cluster import storage
from cluster.storage import StorageError


def test_round_trip_exists_size_range(store_root: str) -> None:
    url = storage.join(store_root, "a", "b.bin")
    assert not storage.exists(url)
    payload = bytes(range(256)) * 40
    storage.write_bytes(url, payload)
    assert storage.exists(url) and storage.size(url) == len(payload)
    assert storage.read_bytes(url) == payload
    assert storage.read_bytes(url, 10, 20) == payload[10:20]
    assert storage.read_bytes(url, start=len(payload) - 5) == payload[-5:]
    with storage.open_read(url) as f:
        assert f.read(7) == payload[:7]
        assert f.read() == payload[7:]
    storage.write_text(url, "replaced")
    assert storage.read_text(url) == "replaced"


def test_listing_is_recursive_sorted_and_prefix_exact(store_root: str) -> None:
    for name in ["d/x/2.txt", "d/1.txt", "d2/3.txt"]:
        storage.write_bytes(storage.join(store_root, name), name.encode())
    listed = storage.list_files(storage.join(store_root, "d"))
    assert [f.url for f in listed] == [storage.join(store_root, "d/1.txt"), storage.join(store_root, "d/x/2.txt")]
    assert [f.size for f in listed] == [len("d/1.txt"), len("d/x/2.txt")]
    assert storage.list_files(storage.join(store_root, "missing")) == []


def test_copy_delete_and_missing_objects(store_root: str, tmp_path) -> None:
    src = storage.join(store_root, "src.bin")
    storage.write_bytes(src, b"payload")
    dst = storage.join(store_root, "copies", "dst.bin")
    storage.copy(src, dst)
    assert storage.read_bytes(dst) == b"payload"
    storage.copy(src, str(tmp_path / "local-copy.bin"))          # across backends
    assert (tmp_path / "local-copy.bin").read_bytes() == b"payload"
    storage.delete(dst)
    storage.delete(dst)                                          # deleting twice is fine
    assert not storage.exists(dst)
    with pytest.raises(StorageError, match="no such"):
        storage.read_bytes(dst)
    storage.delete_prefix(store_root)
    assert storage.list_files(store_root) == []


def test_open_write_is_atomic(store_root: str) -> None:
    url = storage.join(store_root, "atomic.bin")
    with storage.open_write(url) as f:
        f.write(b"x" * 1000)
        assert not storage.exists(url), "a reader must not see a half-written object"
    assert storage.read_bytes(url) == b"x" * 1000

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with storage.open_write(url) as f:
            f.write(b"partial")
            raise Boom
    assert storage.read_bytes(url) == b"x" * 1000, "a failed write must leave the old object intact"
    assert [i.url for i in storage.list_files(store_root)] == [url], "no temp files left behind"


def test_streamed_writes_past_the_writeback_chunk_keep_every_byte(store_root: str) -> None:
    """Local writes start the disk writeback every MB while the file grows; the bytes, tell() and
    the atomic publish are unaffected (pieces of every size, across several chunk boundaries)."""
    rng = random.Random(0)
    pieces = [os.urandom(rng.choice((1, 511, 4096, 100_000, 700_000))) for _ in range(40)]
    url = storage.join(store_root, "streamed.bin")
    with storage.open_write(url) as f:
        for i, piece in enumerate(pieces):
            f.write(piece)
            if i == 20:
                assert f.tell() == sum(map(len, pieces[:21]))
        assert not storage.exists(url)
    assert sum(map(len, pieces)) > 3 * storage.WRITEBACK_CHUNK
    assert storage.read_bytes(url) == b"".join(pieces)


def test_large_objects_use_multipart(store_root: str, tmp_path) -> None:
    data = os.urandom(storage.MULTIPART_THRESHOLD * 2 + 12345)
    local = tmp_path / "big.bin"
    local.write_bytes(data)
    url = storage.join(store_root, "big.bin")
    storage.upload_file(local, url)
    assert storage.read_bytes(url) == data
    if storage.is_remote(url):
        bucket, key = storage.split_s3(url)
        etag = storage.s3_client().head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
        assert etag.endswith("-3"), f"expected a 3-part multipart ETag, got {etag}"
    storage.download_file(url, tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data


def test_webdataset_reads_through_the_store(store_root: str) -> None:
    import io
    import tarfile

    import webdataset as wds

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(3):
            body = f"sample {i}".encode()
            info = tarfile.TarInfo(f"{i:04d}.txt")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    url = storage.join(store_root, "shard-000000.tar")
    storage.write_bytes(url, buf.getvalue())
    storage.register_webdataset_s3()
    samples = list(wds.WebDataset(url, shardshuffle=False))
    assert [s["txt"] for s in samples] == [f"sample {i}".encode() for i in range(3)]


# ------------------------------------------------------------------------------------------------
# Failure behaviour (S3 only)


class _Forwarder:
    """A TCP forwarder to the S3 server that we can bring up late: a real unreachable endpoint."""

    def __init__(self, target_port: int) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.target_port = target_port
        self._server: socket.socket | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._server.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        if self._server:
            self._server.close()


def test_operation_started_while_unreachable_completes_when_server_returns(
        s3_server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    forwarder = _Forwarder(s3_server.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{forwarder.port}")  # nothing listens yet
    url = f"{s3_bucket}/late.bin"
    result: dict[str, object] = {}

    def write() -> None:
        try:
            storage.write_bytes(url, b"made it")
            result["ok"] = True
        except Exception as err:  # noqa: BLE001 - reported below
            result["error"] = err

    worker = threading.Thread(target=write)
    started = time.monotonic()
    worker.start()
    time.sleep(2.0)
    assert worker.is_alive(), f"the write should still be retrying, got {result}"
    forwarder.start()
    worker.join(timeout=90)
    forwarder.close()
    assert result.get("ok"), result
    assert time.monotonic() - started >= 2.0
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.url)
    assert storage.read_bytes(url) == b"made it"


def test_clear_errors_never_print_secrets(s3_server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture, tmp_path) -> None:
    secret = "TopSecretValue-9f8e7d6c5b4a"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    caplog.set_level(logging.DEBUG)
    messages = []

    with pytest.raises(StorageError) as info:
        storage.read_bytes("s3://no-such-bucket-xyz/key")
    assert "bucket 'no-such-bucket-xyz' does not exist" in str(info.value)
    messages.append(str(info.value))

    with pytest.raises(StorageError) as info:
        storage.read_bytes(f"{s3_bucket}/missing")
    assert "no such object" in str(info.value)
    messages.append(str(info.value))

    # No credentials anywhere in the chain.
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.url + "/")  # a distinct client cache key
    with pytest.raises(StorageError, match="no AWS credentials"):
        storage.read_bytes(f"{s3_bucket}/x")
    messages.append(str(info.value))
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert secret not in logged and all(secret not in m for m in messages)


def test_access_denied_is_reported_without_the_secret(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A second S3 server that enforces authentication rejects unknown credentials."""
    from cluster import local

    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")  # moto: authenticate every request
    server = local.start_s3(tmp_path / "authed", bucket="")
    try:
        secret = "Denied-Secret-0123456789"
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        caplog.set_level(logging.DEBUG)
        with pytest.raises(StorageError) as info:
            storage.write_bytes("s3://some-bucket/obj", b"data")
        assert "access denied" in str(info.value)
        assert secret not in str(info.value)
        assert secret not in "\n".join(r.getMessage() for r in caplog.records)
    finally:
        local.stop_service(server)

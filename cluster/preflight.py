"""Checks every entry point runs before any expensive work: do its inputs exist, can it write its output.

An entry point validates its config (``trainer.config.load_config``), then calls these helpers on
the keys that name inputs and outputs, and only then loads weights, starts Ray, contacts MLflow or
downloads anything. Each helper raises :class:`BadInput` naming the key; the entry point prints
``str(err)`` (one line) and exits with :data:`trainer.config.EXIT_CONFIG_ERROR` (2).

What is checked is what costs nothing: a local path's existence and permissions, and on S3 one
``HEAD``/``LIST`` request (an unusable bucket is reported here, as one line, instead of as a
traceback from the middle of the work). ``http(s)://`` URLs and HuggingFace hub ids are left to the
code that downloads them: checking them would mean downloading.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from cluster import storage
from trainer.config import ConfigError

# owner/name, as the hub spells repository ids (compare trainer.models.hub).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
MODEL_FILES = ("model.safetensors", "pytorch_model.bin")


class BadInput(ConfigError):
    """An input that does not exist or an output that cannot be written; ``str(err)`` is the line shown."""

    def __init__(self, key: str, message: str) -> None:
        ValueError.__init__(self, f"input error: {key}: {message}")
        self.key = key


def is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def looks_like_hub_id(value: str) -> bool:
    """``owner/name`` that is not meant as a local path: nothing of it exists here (``runs/tok`` with a
    ``runs/`` folder is a local path that is missing, not a hub repository)."""
    return (bool(_HUB_ID.fullmatch(value)) and not value.startswith((".", "/"))
            and not os.path.exists(value.split("/", 1)[0]))


def _exists(key: str, url: str) -> bool:
    try:
        return storage.exists(url)
    except storage.StorageError as err:
        raise BadInput(key, str(err)) from None


def _has_files(key: str, url: str) -> bool:
    """A local directory, or an S3 prefix with at least one object under it."""
    if not storage.is_remote(url):
        return os.path.isdir(url)
    try:
        return bool(storage.list_files(url))
    except storage.StorageError as err:
        raise BadInput(key, str(err)) from None


def path_exists(key: str, url: str) -> bool:
    """Whether ``url`` is an existing file or folder, an S3 object or a non-empty S3 prefix (an error
    of the store is a :class:`BadInput` of ``key``)."""
    return _exists(key, url) or _has_files(key, url)


def require_path(key: str, url: str | None, what: str = "file or folder") -> str:
    """``url`` (local or ``s3://``) is an existing file, folder or non-empty prefix."""
    if not url:
        raise BadInput(key, "is required")
    if not path_exists(key, url):
        raise BadInput(key, f"{url}: no such {what}")
    return url


def require_file(key: str, url: str | None, what: str = "file") -> str | None:
    """A single file/object (weights, a labels file). URLs are not checked (that would be the download)."""
    if not url or is_url(url):
        return url
    if storage.is_remote(url):
        if not _exists(key, url):
            raise BadInput(key, f"{url}: no such {what}")
    elif not os.path.isfile(url):
        raise BadInput(key, f"{url}: {'is a folder, not a ' + what if os.path.isdir(url) else 'no such ' + what}")
    return url


def require_model(key: str, source: str | None) -> str | None:
    """A model as the loaders take it: an export directory (``config.json`` + weights), a single
    weight file, an ``http(s)`` URL or a hub id (those two are not checked here)."""
    if not source or is_url(source):
        return source
    if not storage.is_remote(source):
        if os.path.isfile(source):
            return source
        if not os.path.exists(source):
            if looks_like_hub_id(source):
                return source
            raise BadInput(key, f"{source}: no such directory, weight file or hub id")
    elif _exists(key, source):  # an s3 weight file
        return source
    if not any(_exists(key, storage.join(source, name)) for name in MODEL_FILES):
        raise BadInput(key, f"{source}: not a model export (no {' or '.join(MODEL_FILES)} in it)")
    return source


def require_export(key: str, source: str | None) -> str | None:
    """An export directory with its ``config.json`` (what evaluations read before the weights)."""
    if not source:
        return source
    if not (_exists(key, storage.join(source, "config.json"))):
        if not storage.is_remote(source) and not os.path.exists(source):
            raise BadInput(key, f"{source}: no such export directory")
        raise BadInput(key, f"{source}: not an export directory (no config.json)")
    return source


def require_writable(key: str, url: str | None) -> str | None:
    """An output location this process can write: a local folder, or the nearest existing folder
    above it, that takes a file (nothing is created), or an S3 prefix whose bucket exists or can be
    created."""
    if not url:
        return url
    if storage.is_remote(url):
        try:
            storage.ensure_bucket(url)
        except storage.StorageError as err:
            raise BadInput(key, str(err)) from None
        return url
    path = Path(url).absolute()
    if path.exists() and not path.is_dir():
        raise BadInput(key, f"{url} is a file, not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise BadInput(key, f"{url}: cannot write there ({existing} is a file)")
    # Permission bits do not tell (root ignores them; read-only mounts and /proc refuse anyway): a
    # temporary file in the nearest existing folder does, and nothing is left behind.
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise BadInput(key, f"{url}: cannot write there ({existing}: {err.strerror or type(err).__name__})") from None
    return url


def require_writable_file(key: str, url: str | None) -> str | None:
    """A file to be written (e.g. a SQLite database): its folder must be writable."""
    if not url or storage.is_remote(url):
        return require_writable(key, url)
    if os.path.isdir(url):
        raise BadInput(key, f"{url} is a folder, not a file")
    require_writable(key, str(Path(url).absolute().parent))
    return url


def require_local_tracking(key: str, tracking_uri: str | None) -> str | None:
    """An MLflow store on this machine (``sqlite:///path``, ``file:`` or a plain path) must be
    writable; tracking servers are not contacted here."""
    from urllib.parse import urlparse

    if not tracking_uri:
        return tracking_uri
    if tracking_uri.startswith("sqlite:///"):
        require_writable_file(key, tracking_uri[len("sqlite:///"):])
    elif tracking_uri.startswith("file:"):
        require_writable(key, urlparse(tracking_uri).path)
    elif "://" not in tracking_uri:
        require_writable(key, tracking_uri)
    return tracking_uri


__all__ = ["BadInput", "MODEL_FILES", "is_url", "looks_like_hub_id", "path_exists", "require_path", "require_file",
           "require_model", "require_export", "require_writable", "require_writable_file", "require_local_tracking"]

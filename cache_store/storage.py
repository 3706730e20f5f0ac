"""Where caches live: a local path, a shared directory, or any fsspec URL (s3://bucket/prefix).

Everything the cache store reads or writes goes through ``Location``, so the same code
serves a laptop directory and an object store. Local writes are atomic renames; on an
object store each object appears whole when its upload completes, and a shard's own
``shard.json`` is uploaded last, after its data.
"""

from __future__ import annotations

import mmap
import os
import posixpath
import shutil
import socket
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem


class Location:
    """A directory on some file system, addressed by URL or path.

    Args:
        url: a local path or an fsspec URL; ``storage_options`` go to the file system
            (for example ``{"client_kwargs": {"endpoint_url": ...}}`` for S3).
    """

    def __init__(self, url: str | os.PathLike, **storage_options):
        self.url = str(url)
        if "://" in self.url and not self.url.startswith("file://"):
            # other processes add shards: listings must never come from a stale cache
            storage_options.setdefault("use_listings_cache", False)
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **storage_options)
        self.root = self.root.rstrip("/") or "/"

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def __truediv__(self, relative: str) -> Location:
        child = object.__new__(Location)
        child.fs = self.fs
        child.root = posixpath.join(self.root, relative)
        child.url = child.root if self.is_local else f"{self.url.rstrip('/')}/{relative}"
        return child

    def __str__(self) -> str:
        return self.url

    @property
    def name(self) -> str:
        return posixpath.basename(self.root)

    def path(self, relative: str = "") -> str:
        return posixpath.join(self.root, relative) if relative else self.root

    def exists(self, relative: str = "") -> bool:
        return self.fs.exists(self.path(relative))

    def read_bytes(self, relative: str) -> bytes:
        return self.fs.cat_file(self.path(relative))

    def read_many(self, relatives: list[str], *, mapped: bool = False) -> dict[str, bytes | mmap.mmap]:
        """Read several files at once (concurrently on object stores). With ``mapped``, local files are
        memory-mapped read-only instead of copied: arrays built on them are the page cache's own pages."""
        if not relatives:
            return {}
        if mapped and self.is_local:
            return {r: _mapped(self.path(r)) for r in relatives}
        paths = {self.path(r): r for r in relatives}
        fetched = self.fs.cat(list(paths), on_error="return")
        out = {}
        for path, data in fetched.items():
            if isinstance(data, BaseException):
                raise data
            out[paths[path]] = data
        return out

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write a whole file so that readers see either nothing or all of it."""
        target = self.path(relative)
        if not self.is_local:
            self.fs.pipe_file(target, data)
            return
        os.makedirs(posixpath.dirname(target), exist_ok=True)
        tmp = f"{target}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(posixpath.dirname(target))

    def list_dirs(self, relative: str = "") -> list[str]:
        """Names of the sub-directories (or object prefixes) directly under ``relative``."""
        try:
            entries = self.fs.ls(self.path(relative), detail=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory")

    def file_sizes(self, relative: str) -> dict[str, int]:
        """Size of every file under ``relative``, by path relative to it (one listing on object stores)."""
        base = self.path(relative)
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        return {posixpath.relpath(path, base): int(info["size"]) for path, info in found.items()}

    def modified(self, relative: str):
        """The file's modification time as a datetime, or None where the store has none."""
        try:
            return self.fs.modified(self.path(relative))
        except (NotImplementedError, OSError, KeyError):
            return None

    def remove(self, relative: str = "") -> None:
        if self.exists(relative):
            self.fs.rm(self.path(relative), recursive=True)

    def staging_dir(self, name: str) -> Path:
        """A local directory to build ``name`` in before ``commit_dir`` publishes it."""
        if self.is_local:
            owner = f"{os.getpid()}@{socket.gethostname()}"
            staging = Path(self.path(f".staging/{name}.tmp-{owner}-{os.urandom(4).hex()}"))
        else:
            import tempfile

            return Path(tempfile.mkdtemp(prefix=f"kdcache-{name}-"))
        staging.mkdir(parents=True)
        return staging

    def commit_dir(self, staging: Path, relative: str, *, last: str) -> bool:
        """Publish a finished staging directory at ``relative``; the file ``last`` appears last.

        Returns False when another writer already committed ``relative`` (ours is dropped).
        """
        target = self.path(relative)
        try:
            if self.is_local:
                parent = posixpath.dirname(target)
                os.makedirs(parent, exist_ok=True)
                _fsync_tree(staging)  # the data is on disk before the rename makes it visible
                try:
                    os.rename(staging, target)  # atomic: the whole shard appears at once
                except OSError:
                    if (Path(target) / last).exists():
                        return False
                    raise
                _fsync_dir(parent)  # and the rename itself survives a power loss
                return True
            if self.exists(f"{relative}/{last}"):
                return False
            files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != last)
            for p in files:
                self.fs.put_file(str(p), posixpath.join(target, str(p.relative_to(staging))))
            self.fs.put_file(str(staging / last), posixpath.join(target, last))
            return True
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _mapped(path: str) -> bytes | mmap.mmap:
    fd = os.open(path, os.O_RDONLY)
    try:
        return mmap.mmap(fd, 0, prot=mmap.PROT_READ) if os.fstat(fd).st_size else b""
    finally:
        os.close(fd)  # the mapping holds the file on its own


def _fsync_tree(directory: Path) -> None:
    """fsync every file under ``directory``, then every directory (deepest first)."""
    folders = []
    for root, _, files in os.walk(directory):
        folders.append(root)
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    for folder in reversed(folders):
        _fsync_dir(folder)


def _fsync_dir(directory: str) -> None:
    """fsync a directory, so the names created or renamed in it are durable (POSIX local file systems)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

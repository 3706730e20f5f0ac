"""Reading a committed cache: the manifest, verified shards, and dask views for inspection."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import CacheCorruptError, CacheFormatError, CacheNotFoundError
from .manifest import MANIFEST_NAME, STRING, ColumnSpec, FileEntry, Manifest, ShardEntry, SplitEntry
from .shard import TENSORS_DIR, ShardData, decode, file_problem, read_shard, verify_shard
from .storage import Location


class Cache:
    """A committed cache, opened read-only, on any file system fsspec reaches.

    Args:
        location: the cache directory: a path, an fsspec URL or a Location.

    Raises:
        CacheNotFoundError: no manifest there (no cache, or one that never finished).
        CacheFormatError: the manifest is malformed or of an unknown format version.
    """

    def __init__(self, location, **storage_options):
        self.location = location if isinstance(location, Location) else Location(location, **storage_options)
        try:
            text = self.location.read_bytes(MANIFEST_NAME)
        except FileNotFoundError as e:
            raise CacheNotFoundError(f"no complete cache at {self.location} (no {MANIFEST_NAME})") from e
        self.manifest: Manifest = Manifest.from_json(text, where=f"{self.location}/{MANIFEST_NAME}")
        self._specs = {spec.name: spec for spec in self.manifest.tensors}

    @property
    def key(self) -> str:
        return self.manifest.key

    def split(self, name: str) -> SplitEntry:
        try:
            return self.manifest.splits[name]
        except KeyError:
            raise CacheFormatError(
                f"cache {self.key} has no split {name!r}; it has {sorted(self.manifest.splits)}"
            ) from None

    def shards(self, split: str) -> tuple[ShardEntry, ...]:
        return self.split(split).shards

    def read_shard(self, entry: ShardEntry, wanted: list[tuple[str, int]] = (), *,
                   distribution: bool = False) -> ShardData:  # fmt: skip
        """Load one shard's rows, the ``wanted`` (tensor, layer) arrays and, with ``distribution``, the
        teacher's per-token distributions, verifying their checksums.

        Raises:
            CacheCorruptError: a file of the shard is missing or damaged (the error names it).
        """
        for name, layer in wanted:
            self._check_layer(name, layer)
        if distribution and self.manifest.distribution is None:
            raise CacheFormatError(f"cache {self.key} stores no per-token teacher distribution")
        sparse = self.manifest.distribution if distribution else None
        return read_shard(self.location, entry, self._specs, list(wanted), self.manifest.columns, sparse)

    def _check_layer(self, name: str, layer: int):
        spec = self.manifest.tensor(name)
        if layer not in spec.layers:
            raise CacheFormatError(f"cache {self.key} stores {name} for layers {list(spec.layers)}, not {layer}")
        return spec

    def attachment(self, name: str) -> Path:
        """A local folder holding the attachment ``name`` (a tokenizer, a model), every file verified.

        A local cache's own folder is verified in place; a remote one's is downloaded once into
        ``$KDCACHE_HOME/attachments/<key>/<name>`` (default ``~/.cache/kdcache``) and reused.

        Raises:
            CacheFormatError: the cache has no such attachment.
            CacheCorruptError: a file is missing or does not match its checksum.
        """
        if name not in self.manifest.attachments:
            raise CacheFormatError(
                f"cache {self.key} has no attachment {name!r}; it has {sorted(self.manifest.attachments)}"
            )
        files = self.manifest.attachments[name]
        local = attachment_home() / self.key / name
        if not self.location.is_local and _sound_copy(local, files):
            return local  # downloaded and verified before
        blobs = {f: _read_or_none(self.location, f"{name}/{f}") for f in files}
        problems = _attachment_problems(files, blobs)
        if problems:
            raise CacheCorruptError(f"attachment {name} of {self.location}: {'; '.join(problems)}")
        if self.location.is_local:
            return Path(self.location.path(name))
        staging = local.with_name(f".{name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
        for f, data in blobs.items():
            (staging / f).parent.mkdir(parents=True, exist_ok=True)
            (staging / f).write_bytes(data)
        if _sound_copy(local, files):  # another process (a torchrun rank) put a copy there meanwhile
            shutil.rmtree(staging)
            return local
        shutil.rmtree(local, ignore_errors=True)  # damaged, if there at all
        try:
            os.replace(staging, local)
        except OSError:  # another process won the race; its copy is the same verified bytes
            shutil.rmtree(staging, ignore_errors=True)
        return local

    def iter_shards(self, split: str, wanted: list[tuple[str, int]] = ()) -> Iterator[ShardData]:
        for entry in self.shards(split):
            yield self.read_shard(entry, wanted)

    def rows(self, split: str):
        """The split's rows as a dask DataFrame, one partition per shard.

        Columns: example_id, length, then each declared column (a scalar as itself, a vector
        ``logits`` of C values as ``logits_0`` .. ``logits_{C-1}``, a ragged or matrix one as lists),
        and input_ids (lists).
        """
        import dask
        import dask.dataframe as dd  # here, not at the top: training never needs dask (0.5 s to import)

        meta = self._rows_frame_meta()
        with dask.config.set({"dataframe.convert-string": False}):  # lists stay lists, not their text
            return dd.from_map(self._rows_frame, list(self.shards(split)), meta=meta, enforce_metadata=False)

    def _rows_frame(self, entry: ShardEntry):
        import pandas as pd

        rows = self.read_shard(entry).rows
        frame = pd.DataFrame({"example_id": rows.example_id, "length": rows.lengths})
        for spec in self.manifest.columns:
            for name, values in _frame_columns(spec, rows[spec.name]):
                frame[name] = values
        frame["input_ids"] = [ids.tolist() for ids in rows.input_ids]
        frame.index = pd.RangeIndex(entry.row_start, entry.row_end)
        return frame

    def _rows_frame_meta(self):
        import pandas as pd

        meta = pd.DataFrame({"example_id": pd.Series(dtype=np.int64), "length": pd.Series(dtype=np.int32)})
        for spec in self.manifest.columns:
            if spec.dtype == STRING:
                meta[spec.name] = pd.Series(dtype=object)
                continue
            for name, _ in _frame_columns(spec, np.zeros((0, *spec.tail), spec.dtype)):
                flat = not spec.ragged and len(spec.tail) <= 1
                meta[name] = pd.Series(dtype=spec.dtype if flat else object)
        meta["input_ids"] = pd.Series(dtype=object)
        return meta

    def tensor(self, split: str, name: str, layer: int):
        """One stored tensor of one layer as a dask array chunked by shard.

        Hidden states are ``(total_tokens, width)``; use ``rows(split).length`` for offsets.
        """
        import dask
        import dask.array as da

        spec = self._check_layer(name, layer)
        path = f"{TENSORS_DIR}/{spec.array_path(layer)}"
        dtype = decode(np.zeros(0, spec.stored_dtype), spec).dtype
        read = dask.delayed(lambda entry: self.read_shard(entry, [(name, layer)]).tensors[(name, layer)], pure=True)
        parts = [da.from_delayed(read(entry), shape=entry.arrays[path], dtype=dtype) for entry in self.shards(split)]
        return da.concatenate(parts, axis=0)


def _frame_columns(spec: ColumnSpec, values) -> list[tuple[str, object]]:
    """A declared column as DataFrame columns: a scalar as itself, a vector split into one column
    per entry, anything else as one column of lists."""
    if spec.dtype == STRING:
        return [(spec.name, values)]
    if spec.ragged or len(spec.tail) > 1:
        return [(spec.name, [np.asarray(v).tolist() for v in values])]
    if not spec.tail:
        return [(spec.name, values)]
    return [(f"{spec.name}_{c}", values[:, c]) for c in range(spec.tail[0])]


def attachment_home() -> Path:
    """Where attachments of remote caches are kept locally: ``$KDCACHE_HOME/attachments``."""
    return Path(os.environ.get("KDCACHE_HOME", "~/.cache/kdcache")).expanduser() / "attachments"


def _attachment_problems(files: dict[str, FileEntry], blobs: dict[str, bytes | None]) -> list[str]:
    problems = []
    for name, recorded in files.items():
        data = blobs.get(name)
        problem = f"{name} is missing" if data is None else file_problem(name, data, recorded)
        if problem:
            problems.append(problem)
    return problems


def open_cache(location, **storage_options) -> Cache:
    """Open the committed cache at a path or fsspec URL (``storage_options`` go to fsspec)."""
    return Cache(location, **storage_options)


def verify_cache(location, **storage_options) -> dict[str, list[str]]:
    """Recompute every checksum of a cache: {shard path: problems} for each damaged shard (empty: sound).

    Raises:
        CacheNotFoundError, CacheFormatError: there is no readable manifest.
    """
    cache = open_cache(location, **storage_options)
    bad = {}
    for split in cache.manifest.splits.values():
        for entry in split.shards:
            problems = verify_shard(cache.location, entry)
            if problems:
                bad[entry.path] = problems
    for name, files in cache.manifest.attachments.items():
        problems = _attachment_problems(files, {f: _read_or_none(cache.location, f"{name}/{f}") for f in files})
        if problems:
            bad[name] = problems
    return bad


def _sound_copy(folder: Path, files: dict[str, FileEntry]) -> bool:
    """Whether a local folder holds every one of ``files``, each matching its entry."""
    return folder.is_dir() and not _attachment_problems(
        files, {f: _read_or_none(Location(str(folder)), f) for f in files}
    )


def _read_or_none(location: Location, relative: str) -> bytes | None:
    try:
        return location.read_bytes(relative)
    except FileNotFoundError:
        return None

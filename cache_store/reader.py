"""Reading a committed cache: the manifest, its shards, and dask views for inspection."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from .errors import CacheFormatError
from .manifest import Manifest, ShardEntry, read_manifest
from .shard import ShardData, read_shard


class Cache:
    """A committed cache directory, opened read-only.

    Raises:
        CacheNotFoundError: no manifest at ``path``.
        CacheFormatError: the manifest is malformed or of an unknown version.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.manifest: Manifest = read_manifest(self.path)
        self._specs = {spec.name: spec for spec in self.manifest.tensors}

    @property
    def key(self) -> str:
        return self.manifest.key

    def split(self, name: str):
        try:
            return self.manifest.splits[name]
        except KeyError:
            raise CacheFormatError(
                f"cache {self.key} has no split {name!r}; it has {sorted(self.manifest.splits)}"
            ) from None

    def shards(self, split: str) -> tuple[ShardEntry, ...]:
        return self.split(split).shards

    def read_shard(self, entry: ShardEntry, wanted: list[tuple[str, int]] = ()) -> ShardData:
        """Load one shard's rows and the ``wanted`` (tensor, layer) arrays."""
        for name, layer in wanted:
            if layer not in self.manifest.tensor(name).layers:
                raise CacheFormatError(
                    f"cache {self.key} stores {name} for layers {list(self.manifest.tensor(name).layers)}, not {layer}"
                )
        return read_shard(self.path / entry.path, entry, self._specs, list(wanted))

    def iter_shards(self, split: str, wanted: list[tuple[str, int]] = ()) -> Iterator[ShardData]:
        for entry in self.shards(split):
            yield self.read_shard(entry, wanted)


def open_cache(path: Path | str) -> Cache:
    """Open the committed cache at ``path``."""
    return Cache(path)

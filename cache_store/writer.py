"""CacheWriter: fills a cache directory shard by shard and commits it with the manifest."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from .errors import CacheError
from .manifest import MANIFEST_NAME, Manifest, ShardEntry, SplitEntry, TensorSpec, write_manifest
from .shard import ShardRows, write_shard


class CacheWriter:
    """Writes one cache: ``write_shard`` for each shard of each split, then ``finish``.

    Args:
        cache_dir: the cache's directory, conventionally ``<root>/<key>``.
        key: the content key the caller computed for this cache.
        num_labels: width of the stored logits.
        tensors: the ragged tensors each example carries (hidden states, attention maps).
        metadata: free-form JSON recorded in the manifest (teacher, dataset, capture spec).

    Raises:
        CacheError: the directory already holds a complete cache.
    """

    def __init__(self, cache_dir: Path, *, key: str, num_labels: int, tensors: list[TensorSpec], metadata: dict):
        self.cache_dir = Path(cache_dir)
        if (self.cache_dir / MANIFEST_NAME).exists():
            raise CacheError(f"{self.cache_dir} already holds a complete cache; refusing to overwrite it")
        if self.cache_dir.exists():  # an unfinished earlier attempt: start again from nothing
            shutil.rmtree(self.cache_dir)
        self.cache_dir.mkdir(parents=True)
        self.key = key
        self.num_labels = num_labels
        self.specs = {spec.name: spec for spec in tensors}
        self.metadata = metadata
        self._shards: dict[str, list[ShardEntry]] = {}
        self._tokens: dict[str, int] = {}

    def write_shard(self, split: str, rows: ShardRows, tensors: dict[tuple[str, int], list[np.ndarray]]) -> ShardEntry:
        """Write the next shard of ``split``: rows in order, plus every (tensor, layer) in the spec."""
        expected = {(spec.name, layer) for spec in self.specs.values() for layer in spec.layers}
        if set(tensors) != expected:
            raise ValueError(f"shard tensors {sorted(tensors)} differ from the cache's spec {sorted(expected)}")
        if rows.logits.shape != (len(rows), self.num_labels):
            raise ValueError(f"logits must be ({len(rows)}, {self.num_labels}); got {rows.logits.shape}")
        shards = self._shards.setdefault(split, [])
        row_start = shards[-1].row_end if shards else 0
        relative = f"{split}/shard-{len(shards):05d}"
        entry = write_shard(
            self.cache_dir / relative,
            rows,
            tensors,
            self.specs,
            num_labels=self.num_labels,
            relative_path=relative,
            row_start=row_start,
        )
        shards.append(entry)
        self._tokens[split] = self._tokens.get(split, 0) + int(rows.lengths.sum())
        return entry

    def finish(self) -> Manifest:
        """Write the manifest, which commits the cache; returns it."""
        manifest = Manifest(
            key=self.key,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            num_labels=self.num_labels,
            tensors=tuple(self.specs.values()),
            splits={
                split: SplitEntry(rows=shards[-1].row_end, tokens=self._tokens[split], shards=tuple(shards))
                for split, shards in self._shards.items()
            },
            metadata=self.metadata,
        )
        write_manifest(self.cache_dir, manifest)
        return manifest

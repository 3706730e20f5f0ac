"""The manifest: the one JSON file that describes a cache and marks it complete.

It is written last (to a temporary name, then renamed), so a directory without
``manifest.json`` is never mistaken for a finished cache. Every path it holds is relative
to the cache directory; a reader refuses absolute paths and ``..`` so that a manifest from
someone else cannot point it outside the cache.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from .errors import CacheFormatError, CacheNotFoundError

FORMAT_NAME = "kdcache"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENS = "L"  # the placeholder for an example's token count in a tensor's shape


@dataclass(frozen=True)
class TensorSpec:
    """A ragged per-example tensor stored without padding.

    ``example_shape`` is a template whose ``"L"`` entries stand for the example's token
    count: ``["L", 384]`` for hidden states, ``[12, "L", "L"]`` for attention maps.
    Each example's array is stored flattened, C order, as a contiguous run along axis 0
    of one Zarr array per layer; trailing fixed dimensions stay as columns (so hidden
    states are a ``(total_tokens, width)`` array).
    """

    name: str
    layers: tuple[int, ...]
    example_shape: tuple[int | str, ...]
    dtype: str = "float16"
    codec: str = "zstd"

    def __post_init__(self):
        if not self.layers:
            raise ValueError(f"tensor {self.name!r} needs at least one layer")
        if TOKENS not in self.example_shape:
            raise ValueError(f"tensor {self.name!r} shape {self.example_shape} has no {TOKENS!r} axis")

    @property
    def tail(self) -> tuple[int, ...]:
        """Fixed dimensions after the last token axis: the stored array's trailing shape."""
        last = max(i for i, d in enumerate(self.example_shape) if d == TOKENS)
        return tuple(int(d) for d in self.example_shape[last + 1 :])

    def shape_for(self, length: int) -> tuple[int, ...]:
        return tuple(length if d == TOKENS else int(d) for d in self.example_shape)

    def leading_count(self, length: int) -> int:
        """How many rows of the stored array one example of ``length`` tokens occupies."""
        return math.prod(self.shape_for(length)) // math.prod(self.tail)

    def array_path(self, layer: int) -> str:
        return f"{self.name}/layer_{layer:02d}"


@dataclass(frozen=True)
class FileEntry:
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardEntry:
    """One committed shard: a contiguous row range with its files and their checksums."""

    path: str
    row_start: int
    row_end: int
    files: dict[str, FileEntry]

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files.values())


@dataclass(frozen=True)
class SplitEntry:
    rows: int
    tokens: int
    shards: tuple[ShardEntry, ...]


@dataclass(frozen=True)
class Manifest:
    key: str
    created: str
    num_labels: int
    tensors: tuple[TensorSpec, ...]
    splits: dict[str, SplitEntry]
    metadata: dict = field(default_factory=dict)  # who made it: teacher, dataset, capture spec
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @property
    def bytes(self) -> int:
        return sum(s.bytes for split in self.splits.values() for s in split.shards)

    @property
    def rows(self) -> int:
        return sum(split.rows for split in self.splits.values())

    def tensor(self, name: str) -> TensorSpec:
        for spec in self.tensors:
            if spec.name == name:
                return spec
        raise CacheFormatError(f"cache {self.key} stores no tensor {name!r}; it has {[t.name for t in self.tensors]}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, where: str) -> Manifest:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise CacheFormatError(f"{where}: manifest is not valid JSON ({e})") from e
        if raw.get("format") != FORMAT_NAME:
            raise CacheFormatError(f"{where}: not a kdcache manifest (format={raw.get('format')!r})")
        if raw.get("format_version") != FORMAT_VERSION:
            raise CacheFormatError(
                f"{where}: cache format version {raw.get('format_version')!r} is not supported "
                f"by this kdcache, which reads version {FORMAT_VERSION}"
            )
        try:
            splits = {
                name: SplitEntry(
                    rows=s["rows"],
                    tokens=s["tokens"],
                    shards=tuple(_shard_from_raw(e, where) for e in s["shards"]),
                )
                for name, s in raw["splits"].items()
            }
            tensors = tuple(
                TensorSpec(
                    name=t["name"],
                    layers=tuple(t["layers"]),
                    example_shape=tuple(t["example_shape"]),
                    dtype=t["dtype"],
                    codec=t["codec"],
                )
                for t in raw["tensors"]
            )
            return cls(
                key=raw["key"],
                created=raw["created"],
                num_labels=raw["num_labels"],
                tensors=tensors,
                splits=splits,
                metadata=raw.get("metadata", {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CacheFormatError(f"{where}: malformed manifest ({e!r})") from e


def _shard_from_raw(raw: dict, where: str) -> ShardEntry:
    files = {check_relative(name, where): FileEntry(**entry) for name, entry in raw["files"].items()}
    return ShardEntry(
        path=check_relative(raw["path"], where),
        row_start=raw["row_start"],
        row_end=raw["row_end"],
        files=files,
    )


def check_relative(path: str, where: str) -> str:
    """Refuse a manifest path that could lead outside the cache directory."""
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or "\\" in path or not pure.parts:
        raise CacheFormatError(f"{where}: manifest path {path!r} is not a plain relative path")
    return path


def read_manifest(cache_dir: Path) -> Manifest:
    """Read and validate ``cache_dir/manifest.json``.

    Raises:
        CacheNotFoundError: there is no manifest (no cache, or one that never finished).
        CacheFormatError: the manifest is malformed or of an unknown format version.
    """
    path = Path(cache_dir) / MANIFEST_NAME
    try:
        text = path.read_text()
    except FileNotFoundError as e:
        raise CacheNotFoundError(f"no complete cache at {cache_dir} (no {MANIFEST_NAME})") from e
    return Manifest.from_json(text, where=str(path))


def write_manifest(cache_dir: Path, manifest: Manifest) -> None:
    """Write the manifest atomically: a temporary file, fsync, then rename into place."""
    path = Path(cache_dir) / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

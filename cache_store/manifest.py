"""The manifest and shard entries: the JSON that describes a cache and marks it complete.

Each shard directory ends with ``shard.json`` (its entry: rows, files, checksums), written
last, so a shard with that file is committed. The cache's ``manifest.json`` gathers all
shard entries and is written once every shard is committed: no manifest, no cache.

Besides shards, a manifest lists attachments: named folders of files (a tokenizer, a
model) stored beside the shards and verified like them.

Every path in them is relative to the cache directory; a reader refuses absolute paths
and ``..`` so that a manifest from someone else cannot point it outside the cache.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath

import numpy as np

from .distribution import SparseSpec
from .errors import CacheFormatError

FORMAT_NAME = "kdcache"
FORMAT_VERSION = 5  # 2: test split, per-split tensors, attachments, per-shard producer; 3: declared row columns;
# 4: per-token teacher distributions (top-k, sampled or dense); 5: distributions from a row column's position
MANIFEST_NAME = "manifest.json"
SHARD_ENTRY_NAME = "shard.json"
TOKENS = "L"  # the placeholder for an example's token count in a tensor's shape
DTYPES = ("float16", "float32", "bfloat16")
STRING = "string"  # a column dtype: UTF-8 text, one per example (a QA context) or a list ("*",) of them
COLUMN_DTYPES = ("int32", "int64", "float16", "float32", STRING)
ANY = "*"  # the placeholder for a column axis of any length (per example)
CORE_COLUMNS = ("example_id", "input_ids", "length")  # every rows.arrow has them, before the declared ones
QUANTIZATIONS = (None, "sqrt-uint8")
CODECS = ("auto", "zstd", "none")
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # a cache key or name: one path segment


@dataclass(frozen=True)
class TensorSpec:
    """A ragged per-example tensor stored without padding.

    ``example_shape`` is a template whose ``"L"`` entries stand for the example's token
    count: ``["L", 384]`` for hidden states, ``[12, "L", "L"]`` for attention maps.
    Each example's array is stored flattened, C order, as a contiguous run along axis 0
    of one Zarr array per layer; trailing fixed dimensions stay as columns (so hidden
    states are a ``(total_tokens, width)`` array).

    ``codec``: ``auto`` compresses an array (zstd level 1) only where that pays, measured on its first
    MB when a shard is written (see ``cache_store.shard``); ``zstd`` always, ``none`` never. Readers
    need not know it: each array's zarr.json says how it is stored.

    ``dtype`` is what readers return. bfloat16 is stored as its uint16 bit pattern (Zarr
    has no bfloat16) and read back as float32. ``quantization="sqrt-uint8"`` stores
    probabilities p as round(255 * sqrt(p)) in uint8 and reads back (q / 255)^2.
    """

    name: str
    layers: tuple[int, ...]
    example_shape: tuple[int | str, ...]
    dtype: str = "float16"
    codec: str = "auto"
    quantization: str | None = None

    def __post_init__(self):
        if not self.layers:
            raise ValueError(f"tensor {self.name!r} needs at least one layer")
        if TOKENS not in self.example_shape:
            raise ValueError(f"tensor {self.name!r} shape {self.example_shape} has no {TOKENS!r} axis")
        if self.dtype not in DTYPES:
            raise ValueError(f"tensor {self.name!r} dtype must be one of {DTYPES}; got {self.dtype!r}")
        if self.codec not in CODECS:
            raise ValueError(f"tensor {self.name!r} codec must be one of {CODECS}; got {self.codec!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"tensor {self.name!r} quantization must be one of {QUANTIZATIONS}; got {self.quantization!r}"
            )

    @property
    def stored_dtype(self) -> str:
        if self.quantization == "sqrt-uint8":
            return "uint8"
        return "uint16" if self.dtype == "bfloat16" else self.dtype

    @property
    def tail(self) -> tuple[int, ...]:
        """Fixed dimensions after the last token axis: the stored array's trailing shape."""
        last = max(i for i, d in enumerate(self.example_shape) if d == TOKENS)
        return tuple(int(d) for d in self.example_shape[last + 1 :])

    def shape_for(self, length: int) -> tuple[int, ...]:
        return tuple(length if d == TOKENS else int(d) for d in self.example_shape)

    def offsets(self, lengths: np.ndarray) -> np.ndarray:
        """(N + 1,) row offsets of each example's block in the stored array (an example of L tokens
        occupies the product of its shape's axes before the trailing fixed ones: L rows of hidden
        states, heads * L * L values of an attention map)."""
        counts = np.ones(len(lengths), np.int64)
        for axis in self.example_shape[: len(self.example_shape) - len(self.tail)]:
            counts *= np.asarray(lengths, np.int64) if axis == TOKENS else int(axis)
        return np.concatenate([[0], np.cumsum(counts)])

    def array_path(self, layer: int) -> str:
        return f"{self.name}/layer_{layer:02d}"


@dataclass(frozen=True)
class ColumnSpec:
    """A per-example column of ``rows.arrow`` beside example_id, input_ids and length.

    ``shape`` is the shape of one example's value: ``()`` a scalar (a class label), ``(C,)``
    a fixed vector (class logits), or a shape whose first axis varies per example: ``"L"``,
    one entry per token (per-token logits ``("L", C)``), or ``"*"``, any length (one entry
    per word, say). Only the first axis may vary.
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...] = ()

    def __post_init__(self):
        if not PLAIN_NAME.fullmatch(self.name) or self.name in CORE_COLUMNS:
            raise ValueError(f"column name {self.name!r} must be a plain name other than {list(CORE_COLUMNS)}")
        if self.dtype not in COLUMN_DTYPES:
            raise ValueError(f"column {self.name!r} dtype must be one of {COLUMN_DTYPES}; got {self.dtype!r}")
        if self.dtype == STRING and self.shape not in ((), (ANY,)):
            raise ValueError(f"string column {self.name!r} must be one text per example () or a list ('*',)")
        fixed = self.shape[1:] if self.ragged else self.shape
        if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in fixed):
            raise ValueError(f"column {self.name!r} shape {self.shape}: only its first axis may be 'L' or '*'")

    @property
    def ragged(self) -> bool:
        """Whether each example's value has its own length (its first axis is ``"L"`` or ``"*"``)."""
        return bool(self.shape) and self.shape[0] in (TOKENS, ANY)

    @property
    def tail(self) -> tuple[int, ...]:
        """The fixed dimensions of one entry: after the varying axis, or the whole shape."""
        return tuple(int(d) for d in (self.shape[1:] if self.ragged else self.shape))


@dataclass(frozen=True)
class FileEntry:
    bytes: int
    xxh3: str  # xxh3-128 of the file's bytes, hex


@dataclass(frozen=True)
class ShardEntry:
    """One committed shard: a contiguous row range with its files, checksums and array shapes."""

    path: str
    row_start: int
    row_end: int
    tokens: int
    files: dict[str, FileEntry]
    arrays: dict[str, tuple[int, ...]]  # stored shape of each Zarr array, e.g. hidden_states/layer_03
    producer: dict = field(default_factory=dict)  # how its values were computed, e.g. {"precision": "float32"}

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files.values())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_raw(cls, raw: dict, where: str) -> ShardEntry:
        try:
            return cls(
                path=check_relative(raw["path"], where),
                row_start=int(raw["row_start"]),
                row_end=int(raw["row_end"]),
                tokens=int(raw["tokens"]),
                files={check_relative(n, where): FileEntry(**e) for n, e in raw["files"].items()},
                arrays={check_relative(n, where): tuple(s) for n, s in raw["arrays"].items()},
                producer=dict(raw.get("producer", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CacheFormatError(f"{where}: malformed shard entry ({e!r})") from e


@dataclass(frozen=True)
class SplitEntry:
    rows: int
    tokens: int
    shards: tuple[ShardEntry, ...]
    tensors: tuple[str, ...] = ()  # names of the ragged tensors its shards hold (the others hold rows only)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


@dataclass(frozen=True)
class Manifest:
    key: str
    columns: tuple[ColumnSpec, ...]  # the per-example columns of rows.arrow beside the core ones
    shard_rows: int
    tensors: tuple[TensorSpec, ...]
    splits: dict[str, SplitEntry]
    metadata: dict = field(default_factory=dict)  # who made it: teacher, dataset, capture spec
    attachments: dict[str, dict[str, FileEntry]] = field(default_factory=dict)  # name -> {file: size, checksum}
    distribution: SparseSpec | None = None  # the teacher's per-token distribution, stored with the tensors
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @property
    def bytes(self) -> int:
        return sum(split.bytes for split in self.splits.values())

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
    def from_json(cls, text: str | bytes, *, where: str) -> Manifest:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise CacheFormatError(f"{where}: manifest is not valid JSON ({e})") from e
        if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
            raise CacheFormatError(f"{where}: not a kdcache manifest")
        if raw.get("format_version") != FORMAT_VERSION:
            raise CacheFormatError(
                f"{where}: cache format version {raw.get('format_version')!r} is not supported "
                f"by this kdcache, which reads version {FORMAT_VERSION}; capture the cache again with this kdcache"
            )
        key = raw.get("key")
        if not isinstance(key, str) or not PLAIN_NAME.fullmatch(key):
            raise CacheFormatError(f"{where}: cache key {key!r} is not a plain name")
        try:
            return cls(
                key=key,
                columns=tuple(ColumnSpec(**{**c, "shape": tuple(c["shape"])}) for c in raw["columns"]),
                shard_rows=raw["shard_rows"],
                tensors=tuple(
                    TensorSpec(**{**t, "layers": tuple(t["layers"]), "example_shape": tuple(t["example_shape"])})
                    for t in raw["tensors"]
                ),
                splits={
                    name: SplitEntry(
                        rows=s["rows"],
                        tokens=s["tokens"],
                        shards=tuple(ShardEntry.from_raw(e, where) for e in s["shards"]),
                        tensors=tuple(s.get("tensors", ())),
                    )
                    for name, s in raw["splits"].items()
                },
                metadata=raw.get("metadata", {}),
                attachments={
                    check_relative(name, where): {check_relative(f, where): FileEntry(**e) for f, e in files.items()}
                    for name, files in raw.get("attachments", {}).items()
                },
                distribution=SparseSpec(**raw["distribution"]) if raw.get("distribution") else None,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CacheFormatError(f"{where}: malformed manifest ({e!r})") from e


def check_relative(path: str, where: str) -> str:
    """Refuse a manifest path that could lead outside the cache directory."""
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or "\\" in path or not pure.parts or ":" in path:
        raise CacheFormatError(f"{where}: manifest path {path!r} is not a plain relative path")
    return path

"""One shard: an Arrow IPC file of per-example rows beside a Zarr v3 group of tensors.

A shard directory holds

    rows.arrow        example_id int64, input_ids list<int32>, length int32, then the
                      cache's declared columns (a teacher cache of sequence classification:
                      label int32, logits fixed_size_list<float32>[C])
    tensors.zarr/     one array per (tensor, layer), e.g. hidden_states/layer_03,
                      each example's values stored back to back with no padding
    shard.json        the shard's entry (rows, files, checksums, shapes), written last

Reading verifies every file it uses against its checksum before decoding it, so a
corrupted shard raises an error naming it instead of yielding a wrong tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import xxhash
import zarr
from numcodecs import Zstd
from zarr.core.buffer import cpu
from zarr.storage import MemoryStore

from .distribution import DISTRIBUTION_DIR, PerToken, SparseSpec, decode_arrays, encode_rows, row_offsets
from .errors import CacheCorruptError, CacheFormatError
from .manifest import SHARD_ENTRY_NAME, STRING, TOKENS, ColumnSpec, FileEntry, ShardEntry, TensorSpec
from .storage import Location

ROWS_FILE = "rows.arrow"
TENSORS_DIR = "tensors.zarr"
_CHUNK_BYTES = 4 << 20  # a compressed array's chunks: zstd's unit of work
_RAW_CHUNK_BYTES = 256 << 20  # an uncompressed array: one chunk up to here, read by mapping its file (no copy)
_PAYING_RATIO = 1.5  # codec auto compresses an array whose first MB zstd shrinks at least this much


def _compressors(codec: str, data: np.ndarray) -> list | None:
    """zstd level 1 for codec ``zstd``, or for ``auto`` where it shrinks the array's first MB 1.5x or more;
    else none. Measured on real MiniLM outputs (bench/store.py): float16 hidden states shrink 1.08x and
    attention maps 1.11x (1.21x as sqrt-uint8), while decompressing runs at 1.5-2 GB/s against 20-30 GB/s
    for reading mapped chunks; a causal teacher's maps, zero above the diagonal, shrink 2x or more."""
    if codec == "auto":
        sample = np.ascontiguousarray(data).reshape(-1).view(np.uint8)[: 1 << 20]
        codec = "zstd" if sample.size >= _PAYING_RATIO * len(Zstd(level=1).encode(sample)) else "none"
    return [zarr.codecs.ZstdCodec(level=1)] if codec == "zstd" else None


def _blosc(itemsize: int) -> list:
    """Blosc zstd with a byte shuffle: multi-byte integers (id gaps) packed by their byte planes
    (on real top-50 ids, 4% smaller than plain zstd; level 9: 3% smaller than 5, and these arrays are small)."""
    shuffle = "shuffle" if itemsize > 1 else "noshuffle"
    return [zarr.codecs.BloscCodec(cname="zstd", clevel=9, shuffle=shuffle, typesize=itemsize)]


Column = np.ndarray | list  # (N, *shape), or N arrays (n_i, *tail) for a ragged column; strings as lists of str


@dataclass
class ShardRows:
    """The per-example columns of one shard, in row order."""

    example_id: np.ndarray  # (N,) int64: the example's index in its data set
    input_ids: list[np.ndarray]  # N arrays (L_i,), no padding
    columns: dict[str, Column]  # the cache's declared columns (ColumnSpec), by name

    def __len__(self) -> int:
        return len(self.example_id)

    def __getitem__(self, name: str) -> Column:
        return self.columns[name]

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(ids) for ids in self.input_ids], dtype=np.int32)

    def take(self, index: np.ndarray) -> ShardRows:
        """The rows at ``index``, in that order."""
        columns = {name: value[index] if isinstance(value, np.ndarray) else [value[i] for i in index]
                   for name, value in self.columns.items()}  # fmt: skip
        return ShardRows(self.example_id[index], [self.input_ids[i] for i in index], columns)

    @classmethod
    def concat(cls, parts: list[ShardRows]) -> ShardRows:
        """The rows of ``parts`` one after another (the parts hold the same columns)."""
        columns = {}
        for name, first in parts[0].columns.items():
            values = [part[name] for part in parts]
            columns[name] = (
                np.concatenate(values) if isinstance(first, np.ndarray) else [v for vs in values for v in vs]
            )
        return cls(np.concatenate([p.example_id for p in parts]), [ids for p in parts for ids in p.input_ids], columns)


@dataclass
class ShardData:
    """A shard read back: its rows plus the requested tensors, decoded, with row offsets."""

    rows: ShardRows
    tensors: dict[tuple[str, int], np.ndarray]  # (name, layer) -> stored layout, decoded dtype
    offsets: dict[str, np.ndarray]  # name -> (N + 1,) row offsets into the stored array
    specs: dict[str, TensorSpec]
    distribution: dict[str, np.ndarray] | None = None  # the teacher's per-token distributions, decoded
    distribution_offsets: dict[str, np.ndarray] | None = None  # array name -> (N + 1,) row offsets

    def example_tensor(self, name: str, layer: int, i: int) -> np.ndarray:
        """Example ``i``'s tensor in its logical shape, e.g. (L, H) or (heads, L, L)."""
        start, end = self.offsets[name][i], self.offsets[name][i + 1]
        length = len(self.rows.input_ids[i])
        return self.tensors[(name, layer)][start:end].reshape(self.specs[name].shape_for(length))

    def example_distribution(self, i: int) -> PerToken:
        """Example ``i``'s teacher distribution: its tokens' arrays (see ``cache_store.distribution``)."""
        offsets = self.distribution_offsets
        return {name: a[offsets[name][i] : offsets[name][i + 1]] for name, a in self.distribution.items()}


def checksum(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def file_problem(name: str, data: bytes, recorded: FileEntry) -> str | None:
    """Why ``data`` is not the file its entry records, or None when it is."""
    if len(data) != recorded.bytes:
        return f"{name} has {len(data)} bytes, expected {recorded.bytes}"
    if checksum(data) != recorded.xxh3:
        return f"{name} does not match its checksum"
    return None


def encode(values: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Values as stored: float16/32 as is, bfloat16 as its bit pattern, sqrt-uint8 quantized."""
    if spec.quantization == "sqrt-uint8":
        return np.round(255 * np.sqrt(np.clip(values, 0, 1, dtype=np.float32))).astype(np.uint8)
    if spec.dtype == "bfloat16":
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        rounding = ((bits >> 16) & 1) + 0x7FFF  # round to nearest, ties to even
        return ((bits + rounding) >> 16).astype(np.uint16)
    return np.asarray(values, dtype=spec.dtype)


def decode(stored: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Undo ``encode``: float16/32 as stored; bfloat16 and sqrt-uint8 as float32."""
    if spec.quantization == "sqrt-uint8":
        return np.square(stored.astype(np.float32) / 255)
    if spec.dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored


def arrow_type(spec: ColumnSpec) -> pa.DataType:
    """The Arrow type of a column: scalar, fixed_size_list for fixed axes, list for the varying one."""
    value = pa.string() if spec.dtype == STRING else pa.from_numpy_dtype(np.dtype(spec.dtype))
    for size in reversed(spec.tail):
        value = pa.list_(value, size)
    return pa.list_(value) if spec.ragged else value


def rows_schema(columns: tuple[ColumnSpec, ...]) -> pa.Schema:
    core = [("example_id", pa.int64()), ("input_ids", pa.list_(pa.int32())), ("length", pa.int32())]
    return pa.schema(core + [(spec.name, arrow_type(spec)) for spec in columns])


def check_rows(rows: ShardRows, columns: tuple[ColumnSpec, ...]) -> None:
    """Raise ValueError unless ``rows`` holds exactly the declared columns, each of its declared shape."""
    if set(rows.columns) != {spec.name for spec in columns}:
        raise ValueError(f"row columns {sorted(rows.columns)} differ from the cache's {[c.name for c in columns]}")
    n, lengths = len(rows), rows.lengths
    for spec in columns:
        value = rows[spec.name]
        if spec.dtype == STRING:
            if len(value) != n or not all(_strings(v, spec.ragged) for v in value):
                what = "lists of strings" if spec.ragged else "strings"
                raise ValueError(f"column {spec.name} must be {n} {what}")
            continue
        if not spec.ragged:
            if np.shape(value) != (n, *spec.tail):
                raise ValueError(f"column {spec.name} must be {(n, *spec.tail)}; got {np.shape(value)}")
            continue
        if len(value) != n:
            raise ValueError(f"column {spec.name} needs {n} rows; got {len(value)}")
        for i, v in enumerate(value):
            first = int(lengths[i]) if spec.shape[0] == TOKENS else np.shape(v)[0] if np.ndim(v) else -1
            if np.shape(v) != (first, *spec.tail):
                raise ValueError(f"column {spec.name} row {i} must be {(first, *spec.tail)}; got {np.shape(v)}")


def build_shard(
    staging: Path,
    rows: ShardRows,
    tensors: dict[tuple[str, int], list[np.ndarray]],
    specs: dict[str, TensorSpec],
    *,
    columns: tuple[ColumnSpec, ...],
    relative_path: str,
    row_start: int,
    producer: dict | None = None,
    distribution: list[PerToken] | None = None,
    sparse: SparseSpec | None = None,
) -> ShardEntry:
    """Write one shard's files into the local directory ``staging``; ``shard.json`` goes last.

    The files are encoded in memory and checksummed from those bytes, so each is written once
    and never read back. ``producer`` records how the values were computed (the writer's
    settings that must agree across the shards of one cache). ``distribution`` holds each
    row's teacher distribution, stored as ``sparse`` says.
    """
    files = {ROWS_FILE: _rows_bytes(rows, columns)}
    encoded, stored = {}, {}  # the Zarr store's keys and buffers; each array's path, values and compressors
    group = zarr.open_group(MemoryStore(encoded), mode="w")
    for (name, layer), per_example in sorted(tensors.items()):
        spec = specs[name]
        blocks = [encode(a, spec).reshape((-1, *spec.tail)) for a in per_example]
        data = np.concatenate(blocks) if blocks else np.zeros((0, *spec.tail), spec.stored_dtype)
        attributes = {"kdcache_dtype": spec.dtype, "kdcache_quantization": spec.quantization}
        stored[spec.array_path(layer)] = data, _compressors(spec.codec, data), attributes
    if distribution is not None:
        for name, data in encode_rows(distribution, sparse).items():
            stored[f"{DISTRIBUTION_DIR}/{name}"] = data, _blosc(data.dtype.itemsize), {}
    for path, (data, compressors, attributes) in stored.items():
        files |= _write_array(group, path, data, compressors, attributes)
    files |= {f"{TENSORS_DIR}/{key}": buffer.to_bytes() for key, buffer in encoded.items()}
    arrays = {f"{TENSORS_DIR}/{path}": tuple(int(d) for d in data.shape) for path, (data, _, _) in stored.items()}
    for name, data in files.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_bytes(data)
    entry = ShardEntry(
        path=relative_path,
        row_start=row_start,
        row_end=row_start + len(rows),
        tokens=int(rows.lengths.sum()),
        files={name: FileEntry(bytes=len(data), xxh3=checksum(data)) for name, data in sorted(files.items())},
        arrays=arrays,
        producer=dict(producer or {}),
    )
    (staging / SHARD_ENTRY_NAME).write_text(entry.to_json())
    return entry


def _rows_bytes(rows: ShardRows, columns: tuple[ColumnSpec, ...]) -> bytes:
    arrays = {
        "example_id": pa.array(rows.example_id, pa.int64()),
        "input_ids": pa.array([np.asarray(ids, np.int32) for ids in rows.input_ids], pa.list_(pa.int32())),
        "length": pa.array(rows.lengths, pa.int32()),
    }
    for spec in columns:
        arrays[spec.name] = _column_array(rows[spec.name], spec)
    table = pa.table(arrays, schema=rows_schema(columns))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _strings(value, ragged: bool) -> bool:
    return all(isinstance(v, str) for v in value) if ragged else isinstance(value, str)


def _column_array(value: Column, spec: ColumnSpec) -> pa.Array:
    """A column as Arrow: the values flat, wrapped in fixed-size lists for the fixed axes, a list for the ragged one."""
    if spec.dtype == STRING:
        return pa.array([list(v) for v in value] if spec.ragged else list(value), arrow_type(spec))
    parts = value if spec.ragged else [value]
    flat = np.concatenate([np.asarray(v, spec.dtype).reshape(-1) for v in parts]) if len(parts) else np.zeros(0)
    array = pa.array(flat.astype(spec.dtype, copy=False))
    for size in reversed(spec.tail):
        array = pa.FixedSizeListArray.from_arrays(array, size)
    if spec.ragged:
        counts = [np.shape(v)[0] for v in value]
        array = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(counts)]), pa.int32()), array)
    return array


def _column_values(array: pa.Array, spec: ColumnSpec) -> Column:
    """Undo ``_column_array``: (N, *tail), or N arrays (n_i, *tail); strings as a list of str (or of lists)."""
    if spec.dtype == STRING:
        return array.to_pylist()
    offsets = None
    if spec.ragged:
        offsets, array = array.offsets.to_numpy(), array.values
    for _ in spec.tail:
        array = array.values
    flat = array.to_numpy(zero_copy_only=False).reshape(-1, *spec.tail)
    if offsets is None:
        return flat
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def _write_array(
    group: zarr.Group, path: str, data: np.ndarray, compressors, attributes: dict
) -> dict[str, np.ndarray]:
    """One array of the shard's Zarr group, chunked along its first axis. A compressed one is written
    by zarr, in chunks of about 4 MB, into the group's store. An uncompressed one is a single chunk
    (up to 256 MB; more only past that), whose file zarr stores as the array's bytes: those are returned,
    by file name, to be written as they are (no copy; the last chunk is zero-filled to its full size)."""
    chunk_rows = _chunk_rows(data, _RAW_CHUNK_BYTES if compressors is None else _CHUNK_BYTES)
    chunks = (chunk_rows, *data.shape[1:])
    if compressors is not None:
        group.create_array(path, data=data, chunks=chunks, compressors=compressors, attributes=attributes)
        return {}
    group.create_array(path, shape=data.shape, dtype=data.dtype, chunks=chunks, compressors=None, fill_value=0,
                       attributes=attributes)  # fmt: skip
    flat = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<")).reshape(-1).view(np.uint8)
    step = chunk_rows * (flat.size // max(len(data), 1))
    chunks = [flat[start : start + step] for start in range(0, flat.size, step)]
    if chunks and chunks[-1].size < step:
        chunks[-1] = np.concatenate([chunks[-1], np.zeros(step - chunks[-1].size, np.uint8)])
    return {_chunk_file(path, i, data.ndim): chunk for i, chunk in enumerate(chunks)}


def _chunk_rows(data: np.ndarray, limit: int) -> int:
    """Rows per chunk: the fewest chunks of at most ``limit`` bytes, evenly filled (the last is padded least)."""
    pieces = max(1, -(-data.nbytes // limit))
    return max(1, -(-len(data) // pieces))


def _chunk_file(path: str, index: int, ndim: int) -> str:
    """The file of chunk ``index`` along the first axis of the array at ``path`` (zarr v3's default chunk keys)."""
    return f"{TENSORS_DIR}/{path}/c/{index}" + "/0" * (ndim - 1)


def _plain_chunks(entry: ShardEntry, path: str, metadata: bytes) -> tuple[np.dtype, tuple[int, ...], list[str]] | None:
    """The dtype, shape and chunk files of an array whose chunks zarr stores as plain little-endian bytes
    (no compression, default chunk keys, chunked along the first axis, every chunk written); None for any
    other array."""
    try:
        meta = json.loads(metadata)
        (codec,) = meta["codecs"]
        shape, grid = tuple(meta["shape"]), meta["chunk_grid"]
        chunk_shape = tuple(grid["configuration"]["chunk_shape"])
        dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        plain = (
            codec["name"] == "bytes"
            and codec.get("configuration", {}).get("endian", "little") == "little"
            and grid["name"] == "regular"
            and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
            and not meta.get("storage_transformers")
            and len(shape) >= 1
            and chunk_shape[1:] == shape[1:]
            and dtype.kind in "biuf"
        )
    except (KeyError, TypeError, ValueError):
        return None
    if not plain:
        return None
    names = [_chunk_file(path, i, len(shape)) for i in range(-(-shape[0] // chunk_shape[0]))]
    return (dtype, (chunk_shape[0], *shape[1:]), names) if all(n in entry.files for n in names) else None


def read_shard(
    location: Location, entry: ShardEntry, specs: dict[str, TensorSpec], wanted: list[tuple[str, int]],
    columns: tuple[ColumnSpec, ...], sparse: SparseSpec | None = None,
) -> ShardData:  # fmt: skip
    """Read, verify and decode a shard's rows (the core and the declared ``columns``), the
    ``wanted`` (tensor, layer) arrays and, given ``sparse``, the teacher's distributions.

    Raises:
        CacheCorruptError: a file is missing or does not match its recorded size and checksum.
        CacheFormatError: the rows do not have the declared columns.
    """
    missing = [
        f"{name}/{layer}"
        for name, layer in wanted
        if f"{TENSORS_DIR}/{specs[name].array_path(layer)}" not in entry.arrays
    ]
    if missing:
        raise CacheFormatError(f"shard {entry.path} holds no {', '.join(missing)} (its split stores rows only)")
    if sparse is not None and f"{TENSORS_DIR}/{DISTRIBUTION_DIR}/{sparse.arrays[0]}" not in entry.arrays:
        raise CacheFormatError(f"shard {entry.path} holds no teacher distribution (its split stores rows only)")
    paths = [specs[name].array_path(layer) for name, layer in wanted]
    paths += [f"{DISTRIBUTION_DIR}/{name}" for name in sparse.arrays] if sparse is not None else []
    blobs = _fetch_verified(location, entry, [n for n in entry.files if n == ROWS_FILE or n.endswith("zarr.json")])
    table = pa.ipc.open_file(pa.BufferReader(blobs[ROWS_FILE])).read_all()
    if table.num_rows != entry.rows:
        raise CacheFormatError(f"shard {entry.path}: {table.num_rows} rows, its entry says {entry.rows}")
    if table.schema != rows_schema(columns):
        raise CacheFormatError(f"shard {entry.path}: rows have columns {table.schema}, the manifest declares {columns}")
    ids = table.column("input_ids").combine_chunks()
    flat_ids, id_offsets = ids.values.to_numpy(), ids.offsets.to_numpy()
    rows = ShardRows(
        example_id=table.column("example_id").to_numpy(),
        input_ids=[flat_ids[id_offsets[i] : id_offsets[i + 1]] for i in range(table.num_rows)],
        columns={spec.name: _column_values(table.column(spec.name).combine_chunks(), spec) for spec in columns},
    )
    arrays = _read_arrays(location, entry, paths, blobs)
    lengths = table.column("length").to_numpy()
    tensors = {(name, layer): decode(arrays[specs[name].array_path(layer)], specs[name]) for name, layer in wanted}
    offsets = {name: specs[name].offsets(lengths) for name in {name for name, _ in wanted}}
    data = ShardData(rows=rows, tensors=tensors, offsets=offsets, specs=specs)
    if sparse is not None:
        stored = {name: arrays[f"{DISTRIBUTION_DIR}/{name}"] for name in sparse.arrays}
        data.distribution = decode_arrays(stored, sparse)
        data.distribution_offsets = row_offsets(sparse.stored_tokens(lengths, rows.columns), stored, sparse)
    return data


def _read_arrays(location: Location, entry: ShardEntry, paths: list[str], metadata: dict[str, bytes]) -> dict:
    """The arrays at ``paths`` of the shard's Zarr group, every chunk file verified. An array of plain
    chunks is built on its files, mapped where they are local (one read per chunk, no copy, no decoding);
    zarr decodes the others (compressed, or written without chunks that held only zeros)."""
    layouts = {path: _plain_chunks(entry, path, metadata[f"{TENSORS_DIR}/{path}/zarr.json"]) for path in paths}
    plain = {path: layout for path, layout in layouts.items() if layout is not None}
    files = _fetch_verified(location, entry, [n for _, _, names in plain.values() for n in names], mapped=True)
    arrays = {}
    for path, (dtype, chunk_shape, names) in plain.items():
        try:
            parts = [np.frombuffer(files[n], dtype).reshape(chunk_shape) for n in names]
        except ValueError as e:
            raise CacheFormatError(f"shard {entry.path}: {path} does not match its zarr.json ({e})") from e
        if len(parts) == 1:  # the usual case: the array is the chunk's own pages (the last chunk's zero fill cut)
            whole = parts[0]
        else:  # several chunks (past 256 MB, or written before), or none (no rows)
            whole = np.concatenate([np.zeros((0, *chunk_shape[1:]), dtype), *parts])
        arrays[path] = whole[: entry.arrays[f"{TENSORS_DIR}/{path}"][0]]
    by_zarr = [path for path, layout in layouts.items() if layout is None]
    if by_zarr:
        prefixes = tuple(f"{TENSORS_DIR}/{path}/" for path in by_zarr)
        chunks = _fetch_verified(location, entry, [n for n in entry.files if n.startswith(prefixes)])
        store = MemoryStore({n[len(TENSORS_DIR) + 1 :]: cpu.Buffer.from_bytes(b) for n, b in {**metadata, **chunks}.items()
                             if n.startswith(f"{TENSORS_DIR}/")}, read_only=True)  # fmt: skip
        arrays |= {path: zarr.open_array(store, path=path, mode="r")[...] for path in by_zarr}
    return arrays


def _fetch_verified(location: Location, entry: ShardEntry, names: list[str], *, mapped: bool = False) -> dict:
    """The shard's files ``names``, each checked against its entry (``mapped``: see ``Location.read_many``)."""
    try:
        blobs = location.read_many([f"{entry.path}/{n}" for n in names], mapped=mapped)
    except FileNotFoundError as e:
        raise CacheCorruptError(f"shard {entry.path} of {location}: a file is missing ({e})") from e
    out = {}
    for name in names:
        data = blobs[f"{entry.path}/{name}"]
        problem = file_problem(name, data, entry.files[name])
        if problem:
            raise CacheCorruptError(f"shard {entry.path} of {location}: {problem}")
        out[name] = data
    return out


def verify_shard(location: Location, entry: ShardEntry) -> list[str]:
    """Every problem with a shard's files (missing, wrong size, wrong checksum) and with its
    ``shard.json`` (it must be the manifest's entry for the shard, byte for byte); empty when sound."""
    problems = []
    try:
        if location.read_bytes(f"{entry.path}/{SHARD_ENTRY_NAME}") != entry.to_json().encode():
            problems.append(f"{SHARD_ENTRY_NAME} differs from the manifest's entry for this shard")
    except FileNotFoundError:
        problems.append(f"{SHARD_ENTRY_NAME} is missing")
    for name, recorded in entry.files.items():
        try:
            data = location.read_bytes(f"{entry.path}/{name}")
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        problem = file_problem(name, data, recorded)
        if problem:
            problems.append(problem)
    return problems

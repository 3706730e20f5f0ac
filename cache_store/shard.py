"""One shard on disk: an Arrow IPC file of per-example rows beside a Zarr v3 group of tensors.

A shard directory holds

    rows.arrow        example_id int64, input_ids list<int32>, length int32,
                      label int32 (-1: unlabeled), logits fixed_size_list<float32>
    tensors.zarr/     one array per (tensor, layer), e.g. hidden_states/layer_03,
                      each example's values stored back to back with no padding

Shards are written into a temporary directory and renamed into place, so a shard
directory with its final name is always complete.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import zarr

from .errors import CacheFormatError
from .fingerprint import file_digest
from .manifest import FileEntry, ShardEntry, TensorSpec

ROWS_FILE = "rows.arrow"
TENSORS_DIR = "tensors.zarr"
_CHUNK_BYTES = 4 << 20
_CODECS = {"zstd": lambda: [zarr.codecs.ZstdCodec(level=1)], "none": lambda: None}


@dataclass
class ShardRows:
    """The per-example columns of one shard, in row order."""

    example_id: np.ndarray  # (N,) int64: the example's index in its data split
    input_ids: list[np.ndarray]  # N arrays (L_i,), no padding
    label: np.ndarray  # (N,) int, -1 for an unlabeled example
    logits: np.ndarray  # (N, C) float32

    def __len__(self) -> int:
        return len(self.example_id)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(ids) for ids in self.input_ids], dtype=np.int32)


@dataclass
class ShardData:
    """A shard read back: its rows plus the requested tensors as flat arrays with offsets."""

    rows: ShardRows
    tensors: dict[tuple[str, int], np.ndarray]  # (name, layer) -> stored array
    offsets: dict[str, np.ndarray]  # name -> (N + 1,) row offsets into the stored array
    specs: dict[str, TensorSpec]

    def example_tensor(self, name: str, layer: int, i: int) -> np.ndarray:
        """Example ``i``'s tensor in its logical shape, e.g. (L, H) or (heads, L, L)."""
        start, end = self.offsets[name][i], self.offsets[name][i + 1]
        length = len(self.rows.input_ids[i])
        return self.tensors[(name, layer)][start:end].reshape(self.specs[name].shape_for(length))


def tensor_offsets(spec: TensorSpec, lengths: np.ndarray) -> np.ndarray:
    """Row offsets of each example's block in the stored array: (N + 1,) int64."""
    counts = [spec.leading_count(int(n)) for n in lengths]
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)


def rows_schema(num_labels: int) -> pa.Schema:
    return pa.schema(
        [
            ("example_id", pa.int64()),
            ("input_ids", pa.list_(pa.int32())),
            ("length", pa.int32()),
            ("label", pa.int32()),
            ("logits", pa.list_(pa.float32(), num_labels)),
        ]
    )


def write_shard(
    shard_dir: Path,
    rows: ShardRows,
    tensors: dict[tuple[str, int], list[np.ndarray]],
    specs: dict[str, TensorSpec],
    *,
    num_labels: int,
    relative_path: str,
    row_start: int,
) -> ShardEntry:
    """Write one shard atomically and return its manifest entry (sizes and checksums)."""
    tmp = shard_dir.with_name(f".{shard_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        _write_rows(tmp / ROWS_FILE, rows, num_labels)
        group = zarr.open_group(tmp / TENSORS_DIR, mode="w")
        for (name, layer), arrays in tensors.items():
            _write_tensor(group, specs[name], layer, arrays)
        files = {
            str(p.relative_to(tmp)): FileEntry(bytes=p.stat().st_size, sha256=file_digest(p))
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        os.rename(tmp, shard_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ShardEntry(path=relative_path, row_start=row_start, row_end=row_start + len(rows), files=files)


def _write_rows(path: Path, rows: ShardRows, num_labels: int) -> None:
    flat_logits = np.ascontiguousarray(rows.logits, dtype=np.float32).reshape(-1)
    table = pa.table(
        {
            "example_id": pa.array(rows.example_id, pa.int64()),
            "input_ids": pa.array([np.asarray(ids, np.int32) for ids in rows.input_ids], pa.list_(pa.int32())),
            "length": pa.array(rows.lengths, pa.int32()),
            "label": pa.array(rows.label, pa.int32()),
            "logits": pa.FixedSizeListArray.from_arrays(pa.array(flat_logits), num_labels),
        },
        schema=rows_schema(num_labels),
    )
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _write_tensor(group: zarr.Group, spec: TensorSpec, layer: int, arrays: list[np.ndarray]) -> None:
    tail = spec.tail
    blocks = [np.asarray(a, dtype=spec.dtype).reshape((-1, *tail)) for a in arrays]
    data = np.concatenate(blocks) if blocks else np.zeros((0, *tail), spec.dtype)
    row_bytes = int(np.prod(tail, dtype=np.int64)) * data.dtype.itemsize
    chunk_rows = max(1, min(len(data), _CHUNK_BYTES // row_bytes))
    group.create_array(
        spec.array_path(layer),
        data=data,
        chunks=(chunk_rows, *tail),
        compressors=_CODECS[spec.codec](),
    )


def read_shard(
    shard_dir: Path, entry: ShardEntry, specs: dict[str, TensorSpec], wanted: list[tuple[str, int]]
) -> ShardData:
    """Read a shard's rows and the ``wanted`` (tensor, layer) arrays into memory."""
    with pa.memory_map(str(shard_dir / ROWS_FILE)) as source:
        table = pa.ipc.open_file(source).read_all()
    if table.num_rows != entry.rows:
        raise CacheFormatError(f"shard {entry.path}: {table.num_rows} rows, manifest says {entry.rows}")
    ids = table.column("input_ids").combine_chunks()
    flat_ids, id_offsets = ids.values.to_numpy(), ids.offsets.to_numpy()
    logits = table.column("logits").combine_chunks()
    num_labels = logits.type.list_size
    rows = ShardRows(
        example_id=table.column("example_id").to_numpy(),
        input_ids=[flat_ids[id_offsets[i] : id_offsets[i + 1]] for i in range(table.num_rows)],
        label=table.column("label").to_numpy(),
        logits=logits.values.to_numpy().reshape(-1, num_labels),
    )
    group = zarr.open_group(shard_dir / TENSORS_DIR, mode="r")
    lengths = table.column("length").to_numpy()
    tensors = {(name, layer): group[specs[name].array_path(layer)][...] for name, layer in wanted}
    offsets = {name: tensor_offsets(specs[name], lengths) for name in {name for name, _ in wanted}}
    return ShardData(rows=rows, tensors=tensors, offsets=offsets, specs=specs)

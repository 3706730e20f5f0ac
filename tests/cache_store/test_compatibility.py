"""Caches written before still read, and the current defaults store the same values.

``data/cache-c90cdd7`` is a cache written by kdcache at commit c90cdd7 (format version 5, before
arrays were stored uncompressed where compression does not pay), by ``write_cache`` below with
that commit's ``cache_store`` first on the path:

    git worktree add /tmp/old c90cdd7
    python -c "import sys; sys.path[:0] = ['/tmp/old', '.']; import tests.cache_store.test_compatibility as t; \\
               t.write_cache('tests/cache_store/data/cache-c90cdd7', t.OLD_CODECS)"

Its hidden states and attention maps are zstd-compressed (then the default); its ``plain`` tensor
was stored uncompressed, and zarr left out the chunk of its all-zero shard.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import zarr

from cache_store import CacheWriter, ColumnSpec, ShardRows, TensorSpec, open_cache, verify_cache
from cache_store.shard import decode, encode

OLD_CACHE = Path(__file__).parent / "data" / "cache-c90cdd7"
OLD_CODECS = {"hidden": "zstd", "attn": "zstd", "plain": "none"}
COLUMNS = (ColumnSpec("label", "int32"), ColumnSpec("logits", "float32", (2,)))
ROWS, SHARD_ROWS = 9, 5


def tensor_specs(codecs: dict[str, str] | None = None) -> list[TensorSpec]:
    """The fixture's tensors, each with ``codecs[name]`` or else the default codec."""
    specs = [
        TensorSpec("hidden", (1, 2), ("L", 8), dtype="float16"),
        TensorSpec("attn", (2,), (2, "L", "L"), dtype="float16", quantization="sqrt-uint8"),
        TensorSpec("plain", (0,), ("L", 3), dtype="float32"),
    ]
    return [dataclasses.replace(spec, codec=codecs[spec.name]) for spec in specs] if codecs else specs


def content(index: int, start: int, end: int) -> tuple[ShardRows, dict]:
    """Shard ``index``'s rows and tensors, the same from any version of kdcache; shard 1's ``plain`` is all zero."""
    rng = np.random.default_rng(index)
    lengths = rng.integers(3, 9, end - start)
    rows = ShardRows(
        example_id=np.arange(start, end),
        input_ids=[rng.integers(0, 100, n).astype(np.int32) for n in lengths],
        columns={"label": rng.integers(0, 2, end - start).astype(np.int32),
                 "logits": rng.standard_normal((end - start, 2)).astype(np.float32)},
    )  # fmt: skip
    tensors = {}
    for layer in (1, 2):
        tensors[("hidden", layer)] = [rng.standard_normal((n, 8)).astype(np.float32) for n in lengths]
    maps = [rng.random((2, n, n)).astype(np.float32) for n in lengths]
    tensors[("attn", 2)] = [m / m.sum(-1, keepdims=True) for m in maps]
    plain = [rng.standard_normal((n, 3)).astype(np.float32) for n in lengths]
    tensors[("plain", 0)] = [np.zeros_like(v) for v in plain] if index == 1 else plain
    return rows, tensors


def write_cache(location, codecs: dict[str, str] | None = None) -> None:
    writer = CacheWriter(location, key="compat", columns=list(COLUMNS), tensors=tensor_specs(codecs),
                         split_rows={"train": ROWS}, shard_rows=SHARD_ROWS)  # fmt: skip
    for task in writer.pending():
        writer.write_shard(task, *content(task.index, task.row_start, task.row_end))
    writer.finish()


def read_all(location) -> list[tuple[ShardRows, dict]]:
    cache = open_cache(location)
    wanted = [(spec.name, layer) for spec in cache.manifest.tensors for layer in spec.layers]
    shards = [cache.read_shard(entry, wanted) for entry in cache.shards("train")]
    return [(data.rows, data.tensors) for data in shards]


def test_a_cache_written_before_is_sound_and_reads_back_its_values():
    assert verify_cache(OLD_CACHE) == {}
    chunk_files = {p.relative_to(OLD_CACHE).as_posix() for p in OLD_CACHE.rglob("c/*")}
    assert not any(name.startswith("train/shard-00001/tensors.zarr/plain/") for name in chunk_files)  # zarr left it out
    specs = {spec.name: spec for spec in tensor_specs(OLD_CODECS)}
    for index, (rows, tensors) in enumerate(read_all(OLD_CACHE)):
        expected_rows, expected = content(index, index * SHARD_ROWS, min((index + 1) * SHARD_ROWS, ROWS))
        np.testing.assert_array_equal(rows.example_id, expected_rows.example_id)
        for got, want in zip(rows.input_ids, expected_rows.input_ids, strict=True):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(rows["logits"], expected_rows["logits"])
        for (name, layer), values in expected.items():
            stored = np.concatenate([decode(encode(v, specs[name]), specs[name]).reshape(-1) for v in values])
            np.testing.assert_array_equal(tensors[(name, layer)].reshape(-1), stored)


def test_the_current_defaults_store_the_same_values_as_the_format_before(tmp_path):
    write_cache(tmp_path / "new")
    for (old_rows, old), (new_rows, new) in zip(read_all(OLD_CACHE), read_all(tmp_path / "new"), strict=True):
        np.testing.assert_array_equal(new_rows.example_id, old_rows.example_id)
        assert old.keys() == new.keys()
        for key in old:
            assert new[key].dtype == old[key].dtype
            np.testing.assert_array_equal(new[key], old[key])


def test_arrays_stored_plain_are_one_uncompressed_zarr_chunk_that_zarr_reads(tmp_path):
    write_cache(tmp_path / "new")
    cache = open_cache(tmp_path / "new")
    assert [spec.codec for spec in cache.manifest.tensors] == ["auto", "auto", "auto"]
    for entry in cache.shards("train"):
        data = cache.read_shard(entry, [("hidden", 1), ("plain", 0)])
        for name, layer in (("hidden", 1), ("plain", 0)):
            array = tmp_path / "new" / entry.path / "tensors.zarr" / name / f"layer_{layer:02d}"
            codecs = [codec["name"] for codec in json.loads((array / "zarr.json").read_text())["codecs"]]
            zeros = name == "plain" and entry.path.endswith("1")  # zstd pays on shard 1's zeros, not on random values
            assert codecs == (["bytes", "zstd"] if zeros else ["bytes"])
            assert zeros or [p.name for p in (array / "c").iterdir()] == ["0"]
            np.testing.assert_array_equal(data.tensors[(name, layer)], zarr.open_array(array, mode="r")[...])


def test_zstd_is_kept_where_it_pays(tmp_path):
    """A causal teacher's attention maps (zero above the diagonal) shrink 2x or more: auto keeps zstd there."""
    spec = TensorSpec("attn", (1,), (2, "L", "L"), dtype="float16")
    writer = CacheWriter(tmp_path / "c", key="c", columns=[], tensors=[spec], split_rows={"train": 4}, shard_rows=4)
    lengths = [40, 50, 60, 70]
    rng = np.random.default_rng(0)
    maps = [np.tril(rng.random((2, n, n))).astype(np.float32) for n in lengths]
    rows = ShardRows(np.arange(4), [np.zeros(n, np.int32) for n in lengths], {})
    (task,) = writer.pending()
    writer.write_shard(task, rows, {("attn", 1): maps})
    writer.finish()
    meta = json.loads((tmp_path / "c" / task.path / "tensors.zarr" / "attn" / "layer_01" / "zarr.json").read_text())
    assert [codec["name"] for codec in meta["codecs"]] == ["bytes", "zstd"]
    got = open_cache(tmp_path / "c").read_shard(open_cache(tmp_path / "c").shards("train")[0], [("attn", 1)])
    for i, m in enumerate(maps):
        np.testing.assert_array_equal(got.example_tensor("attn", 1, i), m.astype(np.float16))

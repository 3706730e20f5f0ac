"""The cache format: exact round trips, the manifest as commit marker, refusals of bad manifests."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cache_store import (
    MANIFEST_NAME,
    CacheError,
    CacheFormatError,
    CacheNotFoundError,
    CacheWriter,
    ShardRows,
    TensorSpec,
    open_cache,
)

HEADS, WIDTH, LABELS = 3, 8, 4


def make_rows(rng: np.random.Generator, n: int, start: int = 0) -> ShardRows:
    lengths = rng.integers(1, 9, size=n)
    return ShardRows(
        example_id=np.arange(start, start + n, dtype=np.int64),
        input_ids=[rng.integers(0, 1000, size=k).astype(np.int32) for k in lengths],
        label=rng.integers(-1, LABELS, size=n),
        logits=rng.standard_normal((n, LABELS)).astype(np.float32),
    )


def make_tensors(rng, rows: ShardRows, dtype) -> dict:
    out = {}
    for layer in (1, 3):
        out[("hidden", layer)] = [rng.standard_normal((len(ids), WIDTH)).astype(dtype) for ids in rows.input_ids]
        out[("attn", layer)] = [rng.random((HEADS, len(ids), len(ids))).astype(dtype) for ids in rows.input_ids]
    return out


def specs(dtype: str, codec: str = "zstd") -> list[TensorSpec]:
    return [
        TensorSpec("hidden", (1, 3), ("L", WIDTH), dtype=dtype, codec=codec),
        TensorSpec("attn", (1, 3), (HEADS, "L", "L"), dtype=dtype, codec=codec),
    ]


def write_cache(path, rng, *, dtype="float16", codec="zstd", shards=(5, 7)):
    writer = CacheWriter(path, key="k1", num_labels=LABELS, tensors=specs(dtype, codec), metadata={"who": "test"})
    written, start = [], 0
    for n in shards:
        rows = make_rows(rng, n, start)
        tensors = make_tensors(rng, rows, dtype)
        writer.write_shard("train", rows, tensors)
        written.append((rows, tensors))
        start += n
    return writer.finish(), written


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("codec", ["zstd", "none"])
def test_round_trip_is_exact(tmp_path, dtype, codec):
    rng = np.random.default_rng(0)
    manifest, written = write_cache(tmp_path / "c", rng, dtype=dtype, codec=codec)
    cache = open_cache(tmp_path / "c")
    assert cache.manifest == manifest
    wanted = [(name, layer) for name in ("hidden", "attn") for layer in (1, 3)]
    for (rows, tensors), data in zip(written, cache.iter_shards("train", wanted), strict=True):
        np.testing.assert_array_equal(data.rows.example_id, rows.example_id)
        np.testing.assert_array_equal(data.rows.label, rows.label)
        np.testing.assert_array_equal(data.rows.logits, rows.logits)
        for i, ids in enumerate(rows.input_ids):
            np.testing.assert_array_equal(data.rows.input_ids[i], ids)
            for key in wanted:
                got = data.example_tensor(*key, i)
                assert got.dtype == np.dtype(dtype)
                np.testing.assert_array_equal(got, tensors[key][i])


def test_manifest_records_rows_tokens_and_checksums(tmp_path):
    manifest, written = write_cache(tmp_path / "c", np.random.default_rng(1))
    split = manifest.splits["train"]
    assert split.rows == 12
    assert split.tokens == sum(len(ids) for rows, _ in written for ids in rows.input_ids)
    assert [(s.row_start, s.row_end) for s in split.shards] == [(0, 5), (5, 12)]
    for shard in split.shards:
        for name, entry in shard.files.items():
            assert (tmp_path / "c" / shard.path / name).stat().st_size == entry.bytes
            assert len(entry.sha256) == 64


def test_storage_grows_with_real_tokens_not_padding(tmp_path):
    rng = np.random.default_rng(2)
    manifest, written = write_cache(tmp_path / "c", rng, dtype="float32", codec="none")
    cache = open_cache(tmp_path / "c")
    data = cache.read_shard(cache.shards("train")[0], [("hidden", 1), ("attn", 1)])
    rows = written[0][0]
    assert data.tensors[("hidden", 1)].shape == (sum(map(len, rows.input_ids)), WIDTH)
    assert data.tensors[("attn", 1)].shape == (sum(HEADS * len(ids) ** 2 for ids in rows.input_ids),)


def test_no_manifest_means_no_cache(tmp_path):
    writer = CacheWriter(tmp_path / "c", key="k", num_labels=LABELS, tensors=specs("float16"), metadata={})
    rows = make_rows(np.random.default_rng(3), 4)
    writer.write_shard("train", rows, make_tensors(np.random.default_rng(3), rows, "float16"))
    with pytest.raises(CacheNotFoundError, match="no complete cache"):
        open_cache(tmp_path / "c")
    writer.finish()
    assert open_cache(tmp_path / "c").manifest.rows == 4


def test_writer_refuses_a_complete_cache_and_restarts_a_partial_one(tmp_path):
    write_cache(tmp_path / "c", np.random.default_rng(4))
    with pytest.raises(CacheError, match="already holds a complete cache"):
        CacheWriter(tmp_path / "c", key="k", num_labels=LABELS, tensors=specs("float16"), metadata={})
    (tmp_path / "partial" / "train" / "shard-00000").mkdir(parents=True)
    CacheWriter(tmp_path / "partial", key="k", num_labels=LABELS, tensors=specs("float16"), metadata={})
    assert list((tmp_path / "partial").iterdir()) == []


def test_writer_refuses_tensors_that_differ_from_its_spec(tmp_path):
    writer = CacheWriter(tmp_path / "c", key="k", num_labels=LABELS, tensors=specs("float16"), metadata={})
    rows = make_rows(np.random.default_rng(5), 3)
    tensors = make_tensors(np.random.default_rng(5), rows, "float16")
    del tensors[("attn", 3)]
    with pytest.raises(ValueError, match="differ from the cache's spec"):
        writer.write_shard("train", rows, tensors)


def _edit_manifest(path, edit):
    raw = json.loads((path / MANIFEST_NAME).read_text())
    edit(raw)
    (path / MANIFEST_NAME).write_text(json.dumps(raw))


@pytest.mark.parametrize("bad_path", ["/etc", "../outside", "train/../../x", "a\\b"])
def test_reader_refuses_paths_that_leave_the_cache(tmp_path, bad_path):
    write_cache(tmp_path / "c", np.random.default_rng(6))
    _edit_manifest(tmp_path / "c", lambda raw: raw["splits"]["train"]["shards"][0].__setitem__("path", bad_path))
    with pytest.raises(CacheFormatError, match="not a plain relative path"):
        open_cache(tmp_path / "c")


def test_reader_names_both_versions_when_it_cannot_read_one(tmp_path):
    write_cache(tmp_path / "c", np.random.default_rng(7))
    _edit_manifest(tmp_path / "c", lambda raw: raw.__setitem__("format_version", 99))
    with pytest.raises(CacheFormatError, match="version 99 .* reads version 1"):
        open_cache(tmp_path / "c")


def test_reader_refuses_a_layer_the_cache_does_not_hold(tmp_path):
    write_cache(tmp_path / "c", np.random.default_rng(8))
    cache = open_cache(tmp_path / "c")
    with pytest.raises(CacheFormatError, match="layers \\[1, 3\\], not 2"):
        cache.read_shard(cache.shards("train")[0], [("hidden", 2)])

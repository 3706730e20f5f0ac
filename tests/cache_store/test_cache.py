"""The cache store's contract, run against every backend: a local directory and S3 (moto on loopback).

Round trips are exact, the manifest is the commit marker, damage is caught by name,
interrupted and parallel writers end with the same bytes, and caches list, copy and delete.
"""

from __future__ import annotations

import json
import time
import uuid

import numpy as np
import pytest

from cache_store import (
    MANIFEST_NAME,
    CacheBusyError,
    CacheCorruptError,
    CacheError,
    CacheFormatError,
    CacheNotFoundError,
    CacheWriter,
    ColumnSpec,
    Location,
    ShardRows,
    TensorSpec,
    list_caches,
    open_cache,
    push_cache,
    remove_cache,
    verify_cache,
)

HEADS, WIDTH, LABELS = 3, 8, 4
SPLITS = {"train": 12, "validation": 5}


COLUMNS = (  # a scalar, a vector, one entry per token, one of any length per example, text and lists of text
    ColumnSpec("label", "int32"),
    ColumnSpec("logits", "float32", (LABELS,)),
    ColumnSpec("token_logits", "float16", ("L", 2)),
    ColumnSpec("word_starts", "int64", ("*",)),
    ColumnSpec("context", "string"),
    ColumnSpec("answers", "string", ("*",)),
)


def make_rows(seed: int, start: int, n: int) -> ShardRows:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 9, size=n)
    return ShardRows(
        example_id=np.arange(start, start + n, dtype=np.int64),
        input_ids=[rng.integers(0, 1000, size=k).astype(np.int32) for k in lengths],
        columns={
            "label": rng.integers(-1, LABELS, size=n).astype(np.int32),
            "logits": rng.standard_normal((n, LABELS)).astype(np.float32),
            "token_logits": [rng.standard_normal((k, 2)).astype(np.float16) for k in lengths],
            "word_starts": [rng.integers(-1, 9, size=rng.integers(0, 5)) for _ in lengths],
            "context": [f"ctx {i} \u00e9t\u00e9" for i in rng.integers(0, 99, size=n)],
            "answers": [[f"a{j}" for j in range(k % 3)] for k in lengths],
        },
    )


def assert_same_rows(got: ShardRows, want: ShardRows) -> None:
    np.testing.assert_array_equal(got.example_id, want.example_id)
    for a, b in zip(got.input_ids, want.input_ids, strict=True):
        np.testing.assert_array_equal(a, b)
    assert set(got.columns) == set(want.columns)
    for name, value in want.columns.items():
        if name in ("context", "answers"):
            assert got[name] == value
        elif isinstance(value, list):
            assert len(got[name]) == len(value)
            for a, b in zip(got[name], value, strict=True):
                assert a.dtype == b.dtype
                np.testing.assert_array_equal(a, b)
        else:
            assert got[name].dtype == value.dtype
            np.testing.assert_array_equal(got[name], value)


def make_tensors(seed: int, rows: ShardRows) -> dict:
    rng = np.random.default_rng(seed + 1000)
    out = {}
    for layer in (1, 3):
        out[("hidden", layer)] = [rng.standard_normal((len(ids), WIDTH)).astype(np.float32) for ids in rows.input_ids]
        attention = [rng.random((HEADS, len(ids), len(ids))).astype(np.float32) for ids in rows.input_ids]
        out[("attn", layer)] = [a / a.sum(-1, keepdims=True) for a in attention]
    return out


def specs(hidden_dtype="float16", attention_dtype="float16", codec="auto", quantization=None) -> list[TensorSpec]:
    return [
        TensorSpec("hidden", (1, 3), ("L", WIDTH), dtype=hidden_dtype, codec=codec),
        TensorSpec("attn", (1, 3), (HEADS, "L", "L"), dtype=attention_dtype, codec=codec, quantization=quantization),
    ]


def new_writer(location, producer=None, **spec_options) -> CacheWriter:
    return CacheWriter(location, key="k1", columns=COLUMNS, tensors=specs(**spec_options), split_rows=SPLITS,
                       shard_rows=5, metadata={"teacher": "t", "dataset": "d"},
                       producer=producer or {"precision": "float32"})  # fmt: skip


def shard_content(task):
    """Deterministic content for a shard, so every writer produces the same bytes."""
    seed = (0 if task.split == "train" else 100) + task.index
    rows = make_rows(seed, task.row_start, task.row_end - task.row_start)
    return rows, make_tensors(seed, rows)


def fill(writer: CacheWriter, *, num_shards=1, shard_index=0, stop_after=None):
    written = 0
    for task in writer.pending(num_shards=num_shards, shard_index=shard_index):
        if stop_after is not None and written == stop_after:
            return None
        writer.write_shard(task, *shard_content(task))
        written += 1
    return writer.finish()


def snapshot(location: Location) -> dict[str, bytes]:
    """Every file of a cache, by relative path."""
    files = location.fs.find(location.path())
    prefix = location.path() + "/"
    return {f[len(prefix) :]: location.fs.cat_file(f) for f in files}


class CacheStoreContract:
    """Subclasses provide ``root``: a fresh cache root (path or URL) per test."""

    interruptions = (0, 1, 3)  # shards committed before a writer dies
    every_file = True  # flip a byte in every shard file (False: a sample, where each request is slow)

    @pytest.fixture
    def root(self):
        raise NotImplementedError

    @pytest.fixture
    def cache_url(self, root):
        return f"{root}/k1"

    @pytest.mark.parametrize(
        "options",
        [
            {},
            {"codec": "zstd"},
            {"hidden_dtype": "float32", "attention_dtype": "float32", "codec": "none"},
            {"hidden_dtype": "bfloat16", "attention_dtype": "bfloat16"},
            {"quantization": "sqrt-uint8"},
        ],
        ids=["float16", "float16-zstd", "float32-raw", "bfloat16", "sqrt-uint8"],
    )
    def test_round_trip(self, cache_url, options):
        manifest = fill(new_writer(cache_url, **options))
        cache = open_cache(cache_url)
        assert cache.manifest == manifest
        assert [s.rows for s in manifest.splits["train"].shards] == [5, 5, 2]
        wanted = [(name, layer) for name in ("hidden", "attn") for layer in (1, 3)]
        tolerance = {"float16": 1e-3, "float32": 0, "bfloat16": 8e-3}
        for split, entry in [(s, e) for s in SPLITS for e in cache.shards(s)]:
            data = cache.read_shard(entry, wanted)
            index = entry.row_start // 5
            task = type(
                "T", (), {"split": split, "index": index, "row_start": entry.row_start, "row_end": entry.row_end}
            )
            rows, tensors = shard_content(task)
            assert_same_rows(data.rows, rows)
            for i in range(len(rows)):
                for key in wanted:
                    got, expected = data.example_tensor(*key, i), tensors[key][i]
                    assert got.shape == expected.shape
                    if key[0] == "attn" and options.get("quantization"):
                        assert np.abs(np.sqrt(got) - np.sqrt(expected)).max() <= 0.5 / 255 + 1e-6
                    else:
                        dtype = options.get(f"{'hidden' if key[0] == 'hidden' else 'attention'}_dtype", "float16")
                        np.testing.assert_allclose(got, expected, rtol=tolerance[dtype], atol=tolerance[dtype])
                        if dtype == "float32":
                            np.testing.assert_array_equal(got, expected)

    def test_storage_grows_with_real_tokens_not_padding(self, cache_url):
        fill(new_writer(cache_url))
        cache = open_cache(cache_url)
        entry = cache.shards("train")[0]
        data = cache.read_shard(entry, [("hidden", 1), ("attn", 1)])
        lengths = data.rows.lengths
        assert (
            data.tensors[("hidden", 1)].shape == (lengths.sum(), WIDTH) == entry.arrays["tensors.zarr/hidden/layer_01"]
        )
        assert data.tensors[("attn", 1)].shape == ((HEADS * lengths**2).sum(),)
        assert entry.tokens == lengths.sum()

    def test_no_manifest_means_no_cache(self, cache_url):
        assert fill(new_writer(cache_url), stop_after=2) is None
        with pytest.raises(CacheNotFoundError, match="no complete cache"):
            open_cache(cache_url)
        with pytest.raises(CacheError, match="already holds a complete cache"):
            fill(new_writer(cache_url))
            new_writer(cache_url)

    def test_interrupted_writing_resumes_to_identical_bytes(self, root):
        reference = Location(f"{root}/reference")
        fill(new_writer(reference))
        for stop_after in self.interruptions:
            target = Location(f"{root}/resumed-{stop_after}")
            assert fill(new_writer(target), stop_after=stop_after) is None  # the writer "dies" here
            resumed = new_writer(target)
            assert resumed.committed_count() == stop_after
            assert fill(resumed) is not None
            assert snapshot(target) == snapshot(reference)

    def test_parallel_writers_split_the_shards_and_the_last_writes_the_manifest(self, root):
        reference = Location(f"{root}/reference")
        fill(new_writer(reference))
        target = Location(f"{root}/parallel")
        first, second = new_writer(target), new_writer(target)
        assert fill(first, num_shards=2, shard_index=0) is None
        assert not target.exists(MANIFEST_NAME)
        assert fill(second, num_shards=2, shard_index=1) is not None
        assert snapshot(target) == snapshot(reference)

    def test_two_writers_of_the_same_shards_leave_one_intact_cache(self, root):
        target = Location(f"{root}/twice")
        one, two = new_writer(target), new_writer(target)
        tasks = list(one.pending())
        for task in tasks:  # both build every shard; the second commit of each is dropped
            assert one.write_shard(task, *shard_content(task)).path == task.path
            assert two.write_shard(task, *shard_content(task)) is None
        assert one.finish() is not None and two.finish() is not None
        reference = Location(f"{root}/reference")
        fill(new_writer(reference))
        assert snapshot(target) == snapshot(reference)

    def test_flipped_byte_in_any_shard_file_is_caught_by_verify_and_reader(self, cache_url):
        fill(new_writer(cache_url))
        location = Location(cache_url)
        assert verify_cache(cache_url) == {}
        entry = open_cache(cache_url).shards("train")[1]
        names = sorted(entry.files)
        for name in names if self.every_file else [names[0], names[len(names) // 2], names[-1]]:
            data = bytearray(location.read_bytes(f"{entry.path}/{name}"))
            data[len(data) // 2] ^= 0x01
            location.write_bytes(f"{entry.path}/{name}", bytes(data))
            assert verify_cache(cache_url) == {entry.path: [f"{name} does not match its checksum"]}
            cache = open_cache(cache_url)
            wanted = [(n, layer) for n in ("hidden", "attn") for layer in (1, 3)]
            with pytest.raises(CacheCorruptError, match=f"shard {entry.path} .*: {name} does not match"):
                cache.read_shard(entry, wanted)
            data[len(data) // 2] ^= 0x01
            location.write_bytes(f"{entry.path}/{name}", bytes(data))
        assert verify_cache(cache_url) == {}

    def test_flipped_byte_in_a_shard_entry_is_named_by_verify(self, cache_url):
        fill(new_writer(cache_url))
        location = Location(cache_url)
        entry = open_cache(cache_url).shards("train")[0]
        name = f"{entry.path}/shard.json"
        original = location.read_bytes(name)
        rng = np.random.default_rng(0)
        for position in rng.choice(len(original), 6, replace=False):  # as a user flipping bytes at random would
            data = bytearray(original)
            data[position] ^= 1 << int(rng.integers(8))
            location.write_bytes(name, bytes(data))
            assert verify_cache(cache_url) == {
                entry.path: ["shard.json differs from the manifest's entry for this shard"]
            }
        location.write_bytes(name, original)
        assert verify_cache(cache_url) == {}

    def test_resume_recomputes_a_committed_shard_whose_files_are_short(self, root):
        """A power loss can leave shard.json over data that never reached the disk: resume must not trust it."""
        reference = Location(f"{root}/reference")
        fill(new_writer(reference))
        target = Location(f"{root}/short")
        assert fill(new_writer(target), stop_after=2) is None
        damaged = "train/shard-00001/rows.arrow"
        target.write_bytes(damaged, target.read_bytes(damaged)[:100])  # truncated, its entry still says otherwise
        resumed = new_writer(target)
        assert [t.path for t in resumed.pending()][:1] == ["train/shard-00001"]
        assert resumed.damaged and resumed.damaged[0].startswith("train/shard-00001: rows.arrow has 100 bytes")
        assert fill(resumed) is not None
        assert snapshot(target) == snapshot(reference)

    def test_a_cache_never_mixes_producers(self, root):
        """Resuming, or filling beside, a cache whose shards another precision computed is refused in one line."""
        target = Location(f"{root}/mixed")
        assert fill(new_writer(target), stop_after=2) is None
        other = new_writer(target, producer={"precision": "bfloat16"})
        with pytest.raises(CacheFormatError, match="shard train/shard-00000 was computed with precision=float32, "
                           "this run computes precision=bfloat16; one cache never mixes them"):  # fmt: skip
            other.pending()
        rival = Location(f"{root}/rival")
        assert fill(new_writer(rival), num_shards=2, shard_index=0) is None
        with pytest.raises(CacheFormatError, match="computed with precision=float32, this run computes precision=bf"):
            fill(new_writer(rival, producer={"precision": "bfloat16"}), num_shards=2, shard_index=1)
        assert not rival.exists(MANIFEST_NAME)

    def test_attachments_travel_with_the_cache_verified(self, cache_url, tmp_path, monkeypatch):
        monkeypatch.setenv("KDCACHE_HOME", str(tmp_path / "home"))
        folder = tmp_path / "tokenizer"
        (folder / "sub").mkdir(parents=True)
        (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n")
        (folder / "sub" / "config.json").write_text("{}")
        writer = new_writer(cache_url)
        fill(writer, stop_after=0)
        for task in writer.pending():
            writer.write_shard(task, *shard_content(task))
        manifest = writer.finish(attachments={"tokenizer": folder})
        assert set(manifest.attachments["tokenizer"]) == {"vocab.txt", "sub/config.json"}
        cache = open_cache(cache_url)
        local = cache.attachment("tokenizer")
        assert (local / "vocab.txt").read_text() == "[PAD]\n[UNK]\n" and (local / "sub" / "config.json").exists()
        assert verify_cache(cache_url) == {}
        Location(cache_url).write_bytes("tokenizer/vocab.txt", b"[PAD]\n[UNX]\n")
        assert verify_cache(cache_url) == {"tokenizer": ["vocab.txt does not match its checksum"]}
        if not Location(cache_url).is_local:  # the copy downloaded before, verified again, still serves
            assert (cache.attachment("tokenizer") / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"
        else:
            with pytest.raises(CacheCorruptError, match="attachment tokenizer of .*: vocab.txt does not match"):
                cache.attachment("tokenizer")
        with pytest.raises(CacheFormatError, match=r"has no attachment 'teacher'; it has \['tokenizer'\]"):
            cache.attachment("teacher")

    def test_splits_without_tensors_hold_rows_only(self, cache_url):
        writer = CacheWriter(cache_url, key="k1", columns=COLUMNS, tensors=specs(), split_rows=SPLITS, shard_rows=5,
                             tensor_splits=("train",))  # fmt: skip
        for task in writer.pending():
            rows, tensors = shard_content(task)
            writer.write_shard(task, rows, tensors if task.split == "train" else {})
        manifest = writer.finish()
        assert manifest.splits["train"].tensors == ("hidden", "attn") and manifest.splits["validation"].tensors == ()
        cache = open_cache(cache_url)
        entry = cache.shards("validation")[0]
        assert not entry.arrays and cache.read_shard(entry).rows["label"].shape == (5,)
        with pytest.raises(CacheFormatError, match="shard validation/shard-00000 holds no hidden/1 .*rows only"):
            cache.read_shard(entry, [("hidden", 1)])

    def test_a_name_points_at_the_cache_made_last(self, root):
        from cache_store import name_cache, named_cache

        assert named_cache(root, "demo") is None
        name_cache(root, "demo", "k1")
        name_cache(root, "demo", "k2", record={"seed": 3})
        location, record = named_cache(root, "demo")
        assert location.url.rstrip("/").endswith("/k2") and record == {"seed": 3}
        assert list_caches(root) == []  # names are not caches
        Location(root).write_bytes(".names/demo.json", b'{"key": "../elsewhere"}')
        with pytest.raises(CacheFormatError, match=r"demo.json names no plain cache key \(got '../elsewhere'\)"):
            named_cache(root, "demo")

    def test_missing_file_is_named(self, cache_url):
        fill(new_writer(cache_url))
        entry = open_cache(cache_url).shards("validation")[0]
        Location(cache_url).remove(f"{entry.path}/rows.arrow")
        assert verify_cache(cache_url) == {entry.path: ["rows.arrow is missing"]}
        with pytest.raises(CacheCorruptError, match=f"shard {entry.path}"):
            open_cache(cache_url).read_shard(entry)

    def test_dask_views_match_the_shards(self, cache_url):
        fill(new_writer(cache_url, hidden_dtype="float32"))
        cache = open_cache(cache_url)
        rows = cache.rows("train")
        assert rows.npartitions == 3
        frame = rows.compute()
        assert frame.example_id.tolist() == list(range(12))
        shards = list(cache.iter_shards("train"))
        expected = np.concatenate([d.rows["logits"] for d in shards])
        np.testing.assert_array_equal(frame[[f"logits_{c}" for c in range(LABELS)]].to_numpy(), expected)
        np.testing.assert_array_equal(frame.label, np.concatenate([d.rows["label"] for d in shards]))
        assert frame.word_starts.tolist() == [w.tolist() for d in shards for w in d.rows["word_starts"]]
        assert frame.token_logits.tolist() == [t.tolist() for d in shards for t in d.rows["token_logits"]]
        assert frame.context.tolist() == [c for d in shards for c in d.rows["context"]]
        assert frame.answers.tolist() == [a for d in shards for a in d.rows["answers"]]
        assert frame.input_ids.tolist() == [ids.tolist() for d in shards for ids in d.rows.input_ids]
        hidden = cache.tensor("train", "hidden", 3)
        assert hidden.numblocks == (3, 1) and hidden.shape == (frame.length.sum(), WIDTH)
        stored = np.concatenate([d.tensors[("hidden", 3)] for d in cache.iter_shards("train", [("hidden", 3)])])
        np.testing.assert_array_equal(hidden.compute(), stored)

    def test_list_push_and_remove(self, root, tmp_path):
        fill(new_writer(f"{root}/k1"))
        fill(new_writer(f"{root}/partial"), stop_after=1)
        listing = {c.key: c for c in list_caches(root)}
        assert listing["k1"].complete and listing["k1"].rows == 17 and listing["k1"].teacher == "t"
        assert not listing["partial"].complete and listing["partial"].rows == 5
        copy, copied = push_cache(f"{root}/k1", tmp_path / "elsewhere")
        assert copied and verify_cache(copy.location) == {}
        assert snapshot(copy.location) == snapshot(Location(f"{root}/k1"))
        assert push_cache(f"{root}/k1", tmp_path / "elsewhere")[1] is False
        remove_cache(f"{root}/partial", force=True)  # its writer (this process) is still "alive"
        remove_cache(f"{root}/k1")
        assert [c.key for c in list_caches(root)] == []
        with pytest.raises(CacheNotFoundError):
            remove_cache(f"{root}/k1")

    def test_remove_refuses_a_partial_cache_with_a_live_writer(self, cache_url):
        writer = new_writer(cache_url)  # alive: this very process
        task = writer.pending()[0]
        writer.write_shard(task, *shard_content(task))
        with pytest.raises(CacheBusyError, match="is being written by .*--force"):
            remove_cache(cache_url)
        remove_cache(cache_url, force=True)
        assert not Location(cache_url).exists()


class TestLocalDirectory(CacheStoreContract):
    @pytest.fixture
    def root(self, tmp_path):
        return str(tmp_path / "caches")


class TestS3(CacheStoreContract):
    interruptions = (2,)
    every_file = False

    @pytest.fixture
    def root(self, s3_bucket):
        return f"s3://{s3_bucket}/{uuid.uuid4().hex[:8]}"


def _edit_manifest(path, edit):
    raw = json.loads((path / MANIFEST_NAME).read_text())
    edit(raw)
    (path / MANIFEST_NAME).write_text(json.dumps(raw))


@pytest.mark.parametrize("bad_path", ["/etc", "../outside", "train/../../x", "a\\b", "s3://other/x"])
def test_reader_refuses_paths_that_leave_the_cache(tmp_path, bad_path):
    fill(new_writer(tmp_path / "c"))
    _edit_manifest(tmp_path / "c", lambda raw: raw["splits"]["train"]["shards"][0].__setitem__("path", bad_path))
    with pytest.raises(CacheFormatError, match="not a plain relative path"):
        open_cache(tmp_path / "c")


def test_rows_must_have_the_declared_columns_and_shapes(tmp_path):
    writer = new_writer(tmp_path / "c")
    task = writer.pending()[0]
    rows, tensors = shard_content(task)
    for name, bad, message in [
        ("token_logits", [t[:-1] for t in rows["token_logits"]], r"column token_logits row 0 must be \(\d+, 2\)"),
        ("logits", rows["logits"][:, :2], r"column logits must be \(5, 4\); got \(5, 2\)"),
        ("word_starts", rows["word_starts"][:4], "column word_starts needs 5 rows; got 4"),
        ("context", [*rows["context"][:4], 3], "column context must be 5 strings"),
        ("answers", [["a"], *rows["answers"][1:4], [1]], "column answers must be 5 lists of strings"),
    ]:
        broken = ShardRows(rows.example_id, rows.input_ids, {**rows.columns, name: bad})
        with pytest.raises(ValueError, match=message):
            writer.write_shard(task, broken, tensors)
    missing = ShardRows(rows.example_id, rows.input_ids, {k: v for k, v in rows.columns.items() if k != "label"})
    with pytest.raises(
        ValueError, match=r"row columns \['answers', 'context', 'logits', 'token_logits', 'word_starts'\] differ"
    ):
        writer.write_shard(task, missing, tensors)
    with pytest.raises(ValueError, match="only its first axis may be 'L' or '\\*'"):
        ColumnSpec("bad", "float32", (2, "L"))
    with pytest.raises(ValueError, match="string column 'bad' must be one text per example"):
        ColumnSpec("bad", "string", ("L",))


def test_a_shard_whose_rows_differ_from_the_declared_columns_is_refused(tmp_path):
    fill(new_writer(tmp_path / "c"))
    _edit_manifest(tmp_path / "c", lambda raw: raw["columns"][1].__setitem__("shape", [5]))
    cache = open_cache(tmp_path / "c")
    with pytest.raises(CacheFormatError, match="shard train/shard-00000: rows have columns"):
        cache.read_shard(cache.shards("train")[0])


def test_reader_names_both_versions_when_it_cannot_read_one(tmp_path):
    fill(new_writer(tmp_path / "c"))
    for old in (4, 99):  # version 4: caches from before distributions starting at a row's position
        _edit_manifest(tmp_path / "c", lambda raw, v=old: raw.__setitem__("format_version", v))
        with pytest.raises(CacheFormatError, match=f"version {old} .* reads version 5; capture the cache again"):
            open_cache(tmp_path / "c")


def test_reader_refuses_a_layer_the_cache_does_not_hold(tmp_path):
    fill(new_writer(tmp_path / "c"))
    cache = open_cache(tmp_path / "c")
    with pytest.raises(CacheFormatError, match="layers \\[1, 3\\], not 2"):
        cache.read_shard(cache.shards("train")[0], [("hidden", 2)])


def test_writer_refuses_tensors_that_differ_from_its_spec(tmp_path):
    writer = new_writer(tmp_path / "c")
    task = writer.pending()[0]
    rows, tensors = shard_content(task)
    del tensors[("attn", 3)]
    with pytest.raises(ValueError, match="differ from the cache's spec"):
        writer.write_shard(task, rows, tensors)


def test_sqrt_uint8_attention_is_a_fifth_of_float16_with_small_row_kl(tmp_path):
    sizes = {}
    for name, options in (("f16", {}), ("q8", {"quantization": "sqrt-uint8"})):
        manifest = fill(new_writer(tmp_path / name, **options))
        sizes[name] = sum(
            f.bytes for split in manifest.splits.values() for s in split.shards
            for n, f in s.files.items() if "/attn/" in n and "/c/" in n
        )  # fmt: skip
    assert sizes["q8"] < 0.6 * sizes["f16"]  # random (incompressible) maps: 1 byte vs 2; real maps reach ~0.2


def test_remove_refuses_a_directory_that_is_not_a_cache(tmp_path):
    fill(new_writer(tmp_path / "root" / "k1"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    for path in (tmp_path / "root", tmp_path / "other"):
        with pytest.raises(CacheNotFoundError, match="nothing removed"):
            remove_cache(path)
    assert (tmp_path / "other" / "notes.txt").exists() and (tmp_path / "root" / "k1" / MANIFEST_NAME).exists()


@pytest.mark.parametrize("key", ["../escaped", "/abs", "a/b", ""])
def test_reader_refuses_a_key_that_is_not_a_plain_name(tmp_path, key):
    fill(new_writer(tmp_path / "c"))
    _edit_manifest(tmp_path / "c", lambda raw: raw.__setitem__("key", key))
    with pytest.raises(CacheFormatError, match="is not a plain name"):
        open_cache(tmp_path / "c")


def test_listing_a_partial_cache_with_no_committed_shard(tmp_path):
    new_writer(tmp_path / "root" / "starting")  # a heartbeat, nothing committed yet
    (listing,) = list_caches(tmp_path / "root")
    assert not listing.complete and listing.rows == 0


def test_shard_files_and_directories_are_fsynced_before_the_rename_that_commits_them(tmp_path, monkeypatch):
    import os

    import cache_store.storage as storage

    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(src), str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    monkeypatch.setattr(storage.os, "rename", rename)
    writer = new_writer(tmp_path / "c")
    task = writer.pending()[0]
    entry = writer.write_shard(task, *shard_content(task))
    (commit,) = [i for i, e in enumerate(events) if e[0] == "rename"]
    staging, target = events[commit][1:]
    assert target == str(tmp_path / "c" / task.path)
    synced = {os.path.relpath(e[1], staging) for e in events[:commit] if e[0] == "fsync"}
    assert set(entry.files) | {"shard.json", ".", "tensors.zarr"} <= synced  # every file and folder, first
    assert ("fsync", str(tmp_path / "c" / "train")) in events[commit:]  # then the rename itself


class _Failing(CacheWriter):
    """A writer whose disk fills up, after ``delay`` seconds."""

    delay = 0.0

    def write_shard(self, task, rows, tensors, distribution=None):
        time.sleep(self.delay)
        raise OSError("disk full")


def test_of_two_errors_the_first_is_raised_and_the_other_noted(tmp_path):
    from cache_store import BackgroundWriter

    writer = _Failing(tmp_path / "a", key="k1", columns=COLUMNS, tensors=specs(), split_rows=SPLITS, shard_rows=5)
    task = writer.pending()[0]
    with pytest.raises(OSError, match="disk full") as raised:  # the writer failed first, then the caller
        with BackgroundWriter(writer) as background:
            background.submit(task, *shard_content(task))
            while background._error is None:
                time.sleep(0.01)
            raise ValueError("the caller's own")
    assert raised.value.__notes__ == ['then the caller failed too: ValueError("the caller\'s own")']

    writer = _Failing(tmp_path / "b", key="k1", columns=COLUMNS, tensors=specs(), split_rows=SPLITS, shard_rows=5)
    writer.delay = 0.3
    with pytest.raises(ValueError, match="the caller's own") as raised:  # the caller failed first
        with BackgroundWriter(writer) as background:
            background.submit(task, *shard_content(task))
            raise ValueError("the caller's own")
    assert raised.value.__notes__ == ["the cache writer failed too: OSError('disk full')"]

    writer = _Failing(tmp_path / "c", key="k1", columns=COLUMNS, tensors=specs(), split_rows=SPLITS, shard_rows=5)
    with pytest.raises(OSError, match="disk full") as raised:  # one error only: the writer's, raised by submit
        with BackgroundWriter(writer) as background:
            background.submit(task, *shard_content(task))
            while background._error is None:
                time.sleep(0.01)
            background.submit(task, *shard_content(task))
    assert not getattr(raised.value, "__notes__", None)

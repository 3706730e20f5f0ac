"""Per-token teacher distributions: stored top-k, sampled and dense, read back as written."""

from __future__ import annotations

import numpy as np
import pytest

from cache_store import CacheWriter, ColumnSpec, ShardRows, open_cache
from cache_store.distribution import SparseSpec, decode_arrays, encode_rows

VOCAB = 70_000  # over 2**16: ids stored as uint32 gaps


def topk_row(rng, tokens: int, k: int, vocab: int = VOCAB) -> dict:
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(tokens)])
    probs = rng.dirichlet(np.ones(k + 1), tokens)
    return {"ids": ids, "probs": probs[:, :k], "tail": probs[:, k]}


def sampled_row(rng, tokens: int, draws: int, vocab: int = VOCAB) -> dict:
    ids, counts, entries = [], [], []
    for _ in range(tokens):
        drawn = rng.choice(rng.choice(vocab, 40, replace=False), draws, p=rng.dirichlet(np.full(40, 0.3)))
        distinct, count = np.unique(drawn, return_counts=True)
        order = rng.permutation(len(distinct))  # not sorted: the store sorts them
        ids.append(distinct[order])
        counts.append(count[order])
        entries.append(len(distinct))
    return {"ids": np.concatenate(ids), "counts": np.concatenate(counts), "entries": np.array(entries)}


def sorted_topk(row: dict) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(row["ids"], axis=1)
    return np.take_along_axis(row["ids"], order, 1), np.take_along_axis(row["probs"], order, 1)


@pytest.mark.parametrize("vocab", [300, VOCAB])
def test_topk_keeps_ids_exactly_and_the_square_roots_of_probabilities_within_1_510(vocab):
    rng = np.random.default_rng(0)
    spec = SparseSpec("topk", vocab_size=vocab, k=8)
    rows = [topk_row(rng, n, 8, vocab) for n in (5, 1, 7)]
    stored = encode_rows(rows, spec)
    assert stored["ids"].dtype == (np.uint16 if vocab <= 1 << 16 else np.uint32)
    back = decode_arrays(stored, spec)
    ids, probs = sorted_topk({k: np.concatenate([r[k] for r in rows]) for k in ("ids", "probs")})
    np.testing.assert_array_equal(back["ids"], ids)
    assert np.abs(np.sqrt(back["probs"]) - np.sqrt(probs)).max() <= 1 / 510 + 1e-7
    np.testing.assert_allclose(back["tail"], np.concatenate([r["tail"] for r in rows]), rtol=1e-3)


def test_sampled_ids_and_counts_read_back_exactly_token_by_token():
    rng = np.random.default_rng(1)
    spec = SparseSpec("sampled", vocab_size=VOCAB, draws=50)
    rows = [sampled_row(rng, n, 50) for n in (4, 1, 6)]
    back = decode_arrays(encode_rows(rows, spec), spec)
    entries = np.concatenate([r["entries"] for r in rows])
    np.testing.assert_array_equal(back["entries"], entries)
    starts = np.concatenate([[0], np.cumsum(entries)])
    ids, counts = np.concatenate([r["ids"] for r in rows]), np.concatenate([r["counts"] for r in rows])
    for t in range(len(entries)):  # per token: the same (id, count) pairs, ids ascending
        got = list(zip(back["ids"][starts[t] : starts[t + 1]], back["counts"][starts[t] : starts[t + 1]], strict=True))
        want = sorted(zip(ids[starts[t] : starts[t + 1]], counts[starts[t] : starts[t + 1]], strict=True))
        assert got == want


def test_rows_off_the_spec_are_refused():
    spec = SparseSpec("sampled", vocab_size=100, draws=5)
    good = {"ids": np.array([1, 2]), "counts": np.array([3, 2]), "entries": np.array([2])}
    spec.check_row(good, 1, "row 0")
    with pytest.raises(ValueError, match="counts must add up to draws = 5"):
        spec.check_row(good | {"counts": np.array([3, 1])}, 1, "row 0")
    with pytest.raises(ValueError, match=r"ids outside \[0, 100\)"):
        spec.check_row(good | {"ids": np.array([1, 100])}, 1, "row 0")
    with pytest.raises(ValueError, match=r"topk needs 1 <= k < vocab_size"):
        SparseSpec("topk", vocab_size=10, k=10)


@pytest.mark.parametrize("scheme", ["topk", "sampled", "dense"])
def test_a_cache_stores_each_rows_distribution_in_its_tensor_splits(tmp_path, scheme):
    rng = np.random.default_rng(2)
    spec = SparseSpec(
        scheme, vocab_size=300, k=4 if scheme == "topk" else None, draws=20 if scheme == "sampled" else None
    )
    lengths = {"train": [3, 5, 2, 4, 6], "test": [2, 3]}
    writer = CacheWriter(tmp_path / "c", key="k", columns=[ColumnSpec("stat", "float32")], tensors=[],
                         split_rows={s: len(n) for s, n in lengths.items()}, tensor_splits=("train",), shard_rows=3,
                         distribution=spec)  # fmt: skip
    written = {}
    for task in writer.pending():
        n = lengths[task.split][task.row_start : task.row_end]
        rows = ShardRows(np.arange(task.row_start, task.row_end), [np.arange(m, dtype=np.int32) for m in n],
                         {"stat": np.zeros(len(n), np.float32)})  # fmt: skip
        if task.split != "train":
            writer.write_shard(task, rows, {})
            continue
        dist = [{"topk": lambda m: topk_row(rng, m, 4, 300), "sampled": lambda m: sampled_row(rng, m, 20, 300),
                 "dense": lambda m: {"logprobs": rng.normal(size=(m, 300))}}[scheme](m) for m in n]  # fmt: skip
        writer.write_shard(task, rows, {}, dist)
        written |= {task.row_start + i: d for i, d in enumerate(dist)}
    writer.finish()
    cache = open_cache(tmp_path / "c")
    assert cache.manifest.distribution == spec
    for entry in cache.shards("train"):
        data = cache.read_shard(entry, distribution=True)
        for i in range(entry.rows):
            got, want = data.example_distribution(i), written[entry.row_start + i]
            if scheme == "dense":
                np.testing.assert_allclose(got["logprobs"], want["logprobs"], atol=5e-3)
            elif scheme == "topk":
                np.testing.assert_array_equal(got["ids"], sorted_topk(want)[0])
            else:
                assert got["counts"].sum() == 20 * len(got["entries"])
                np.testing.assert_array_equal(got["entries"], want["entries"])
    with pytest.raises(Exception, match="holds no teacher distribution"):
        cache.read_shard(cache.shards("test")[0], distribution=True)

"""`kdcache cache inspect`: its figures against numpy over the shards of a small cache, the same
figures on a dask.distributed cluster on loopback and on local worker processes, and the page."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from cache_store import open_cache
from pipeline.contract import ATTENTION, HIDDEN
from pipeline.inspection import BINS, LENGTH_BIN, diff_caches, inspect_cache
from pipeline.teacher import run_capture, run_teacher_train
from tests.test_cli import app, runner


@pytest.fixture
def cache_path(config):
    run_teacher_train(config)
    return str(run_capture(config).location)


def test_the_figures_are_numpys_over_the_shards(cache_path, tmp_path):
    summary = inspect_cache(cache_path, tmp_path / "out", progress=False)
    cache = open_cache(cache_path)
    names = list(summary["label_names"])
    for split in ("train", "validation", "test"):
        shards = [cache.read_shard(e, [(HIDDEN, 2), (ATTENTION, 4)] if split == "train" else [])
                  for e in cache.shards(split)]  # fmt: skip
        lengths = np.concatenate([d.rows.lengths for d in shards])
        entry = summary["splits"][split]
        assert (entry["rows"], entry["tokens"]) == (len(lengths), lengths.sum())
        assert entry["lengths"]["counts"] == np.bincount(lengths // LENGTH_BIN).tolist()
        logits = np.concatenate([d.rows["logits"] for d in shards]).astype(np.float64)
        labels = np.concatenate([d.rows["label"] for d in shards])
        p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        teacher, labeled = entry["teacher"], labels >= 0
        assert teacher["accuracy"] == pytest.approx((p.argmax(-1) == labels)[labeled].mean())
        confidence = p.max(-1)
        bins = np.minimum((confidence * 10).astype(int), 9)[labeled]
        gaps = [abs((p.argmax(-1) == labels)[labeled][bins == b].sum() - confidence[labeled][bins == b].sum())
                for b in range(10)]  # fmt: skip
        assert teacher["ece"] == pytest.approx(sum(gaps) / labeled.sum())
        for k, name in enumerate([*names, "unlabeled"]):
            chosen = labels == (k if k < len(names) else -1)
            if not chosen.any():
                assert name not in teacher["classes"]
                continue
            figures = teacher["classes"][name]
            assert figures["outcomes"] == chosen.sum()
            assert figures["confidence"] == pytest.approx(confidence[chosen].mean())
            entropy = -(p * np.log(p)).sum(-1)[chosen]
            assert figures["entropy"] == pytest.approx(entropy.mean())
            histogram = np.bincount(np.minimum((entropy / math.log(2) * BINS).astype(int), BINS - 1), minlength=BINS)
            np.testing.assert_allclose(figures["histograms"]["entropy"], histogram / chosen.sum())
        if split == "train":
            assert entry["teacher"]["classes"]["unlabeled"]["accuracy"] is None
            norms = np.linalg.norm(np.concatenate([d.tensors[(HIDDEN, 2)] for d in shards]).astype(np.float64), axis=1)
            assert entry["hidden_norm"]["2"]["mean"] == pytest.approx(norms.mean())
            assert entry["hidden_norm"]["2"]["std"] == pytest.approx(norms.std())
            maps = [d.example_tensor(ATTENTION, 4, i).astype(np.float64) for d in shards for i in range(len(d.rows))]
            rows = np.concatenate([-(m * np.log(np.clip(m, 1e-12, None))).sum(-1) for m in maps], axis=1)  # (heads, N)
            np.testing.assert_allclose(entry["attention_entropy"]["4"], rows.mean(1))
            assert set(entry["hidden_norm"]) == {"0", "2", "4"} and set(entry["attention_entropy"]) == {"2", "4"}
        else:
            assert "hidden_norm" not in entry  # the split stores rows only
    out = tmp_path / "out"
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    page = (out / "index.html").read_text()
    for plot in ("lengths.png", "teacher.png", "reliability.png", "hidden_norms.png", "attention_entropy.png"):
        assert (out / plot).stat().st_size > 1000 and f'src="{plot}"' in page


def test_a_dask_distributed_scheduler_on_loopback_gives_the_same_figures(cache_path, tmp_path):
    from distributed import LocalCluster

    local = inspect_cache(cache_path, tmp_path / "local", progress=False)
    with LocalCluster(
        n_workers=2, processes=False, protocol="tcp", host="127.0.0.1", dashboard_address=None
    ) as cluster:
        remote = inspect_cache(cache_path, tmp_path / "remote", scheduler=cluster.scheduler_address, progress=False)
    assert json.dumps(remote, sort_keys=True) == json.dumps(local, sort_keys=True)


def test_the_cli_runs_local_workers_and_prints_the_table(cache_path, tmp_path):
    result = runner.invoke(app, ["cache", "inspect", cache_path, "--out", str(tmp_path / "page"), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "teacher accuracy" in result.output and "index.html" in result.output
    summary = json.loads((tmp_path / "page" / "summary.json").read_text())
    assert summary == inspect_cache(cache_path, tmp_path / "again", progress=False)
    both = runner.invoke(app, ["cache", "inspect", cache_path, "--workers", "2", "--scheduler", "tcp://x:1"])
    assert both.exit_code == 1 and "give one of them" in both.output


def other_teacher_cache(config) -> str:
    """A cache of another teacher (fine-tuned at another learning rate) over the same examples."""
    other = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher, learning_rate=5e-3, epochs=2))
    run_teacher_train(other)
    return str(run_capture(other).location)


def test_diff_compares_two_teachers_over_the_same_examples(cache_path, config, tmp_path):
    other = other_teacher_cache(config)
    diff = diff_caches(cache_path, other, top=3)
    for split in ("train", "validation", "test"):
        a, b = (np.concatenate([c.read_shard(e).rows["logits"] for e in c.shards(split)]).astype(np.float64)
                for c in (open_cache(cache_path), open_cache(other)))  # fmt: skip
        log_p = a - np.log(np.exp(a).sum(-1, keepdims=True))
        log_q = b - np.log(np.exp(b).sum(-1, keepdims=True))
        kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
        entry = diff["splits"][split]
        assert entry["agreement"] == pytest.approx((a.argmax(-1) == b.argmax(-1)).mean())
        assert entry["kl"] == pytest.approx(kl.mean())
        assert [d["kl"] for d in entry["disagreements"]] == pytest.approx(sorted(kl, reverse=True)[:3])
        assert all(d["text"] for d in entry["disagreements"])
    same = diff_caches(cache_path, cache_path)["splits"]["test"]
    assert same["agreement"] == 1.0 and same["kl"] == pytest.approx(0.0, abs=1e-12)
    result = runner.invoke(app, ["cache", "diff", cache_path, other])
    assert result.exit_code == 0 and "agreement" in result.output and "disagree most" in result.output


def test_diff_refuses_caches_of_other_examples_in_one_line(cache_path, config):
    fewer = dataclasses.replace(config, data=dataclasses.replace(config.data, test_size=10))
    run_teacher_train(fewer)
    other = str(run_capture(fewer).location)
    result = runner.invoke(app, ["cache", "diff", cache_path, other])
    assert result.exit_code == 1 and "differ in data_fingerprint" in result.output
    assert len(result.output.strip().splitlines()) == 1

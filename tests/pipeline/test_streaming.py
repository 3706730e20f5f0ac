"""The student stream: a deterministic plan, any number of workers, resumable, split by rank, selectable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache_store import open_cache
from pipeline.student.streaming import CacheSource, StudentStream, TeacherStats
from pipeline.tasks import SEQUENCE_CLASSIFICATION
from pipeline.teacher import run_teacher_train
from pipeline.teacher.capture import run_capture
from pipeline.training import Collator

WANTED = [("hidden_states", 2), ("attentions", 4)]


@pytest.fixture
def source(config):
    run_teacher_train(config)
    return CacheSource(open_cache(run_capture(config).location), "train")


def stream(source, **kwargs) -> StudentStream:
    options = {"batch_size": 8, "seed": 0, "wanted": WANTED, "block_rows": 4, "buffer_rows": 8} | kwargs
    return StudentStream(source, task=SEQUENCE_CLASSIFICATION, collate=Collator(pad_id=0), **options)


def rows_of(batches) -> list[int]:
    return [int(i) for _, rows in batches for i in rows]


def same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)


def test_an_epoch_streams_every_row_once_in_an_order_set_by_seed_and_epoch(source):
    s = stream(source)
    plan = s.plan(0)
    seen = sorted((shard, int(i)) for shard, rows in plan for i in rows)
    assert seen == [(shard, i) for shard in range(len(source)) for i in range(source.entries[shard].rows)]
    assert len(plan) == len(s) and all(len(rows) <= 8 for _, rows in plan)
    assert [r.tolist() for _, r in stream(source).plan(0)] == [r.tolist() for _, r in plan]  # reproducible
    assert [r.tolist() for _, r in s.plan(1)] != [r.tolist() for _, r in plan]  # reshuffled each epoch
    assert [r.tolist() for _, r in stream(source, seed=1).plan(0)] != [r.tolist() for _, r in plan]
    first = next(iter(s.at(0)))
    assert first["hidden_states/2"].shape[:2] == first["input_ids"].shape and first["teacher_logits"].shape[1] == 2


def test_workers_and_a_resumed_start_give_exactly_the_planned_batches(source):
    s = stream(source)
    alone = list(s.loader(1))
    same_batches(list(s.loader(1, workers=2)), alone)
    same_batches(list(s.loader(1, 5, workers=2)), alone[5:])


def test_ranks_get_disjoint_equal_length_parts(source):
    ranks = [stream(source, rank=r, world=2) for r in range(2)]
    plans = [s.plan(0) for s in ranks]
    assert len(plans[0]) == len(plans[1]) == len(ranks[0]) > 0
    parts = [{(shard, int(i)) for shard, rows in plan for i in rows} for plan in plans]
    assert not parts[0] & parts[1]


def test_selection_and_labeled_only_choose_the_streamed_rows(source):
    rows = [source.rows(k) for k in range(len(source))]
    stats = [TeacherStats.from_logits(r["logits"], r["label"]) for r in rows]
    threshold = float(np.median(np.concatenate([s.confidence for s in stats])))
    chosen = stream(source, select=lambda s: s.confidence > threshold).plan(0)
    expected = {(k, i) for k, s in enumerate(stats) for i in np.flatnonzero(s.confidence > threshold)}
    assert {(shard, int(i)) for shard, r in chosen for i in r} == expected
    labeled = stream(source, labeled_only=True).plan(0)
    assert all(rows[shard]["label"][i] >= 0 for shard, r in labeled for i in r)
    np.testing.assert_allclose(stats[0].margin, np.abs(np.diff(softmax(rows[0]["logits"]), axis=1))[:, 0], atol=1e-6)


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

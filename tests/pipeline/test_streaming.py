"""The student stream: a deterministic plan, any number of workers, resumable, split by rank, selectable."""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pytest
import torch

from cache_store import open_cache
from pipeline.config import ConfigError, Curriculum, Selection
from pipeline.inspection import TeacherStats
from pipeline.student import streaming
from pipeline.student.distill import run_distill
from pipeline.student.streaming import CacheSource, StudentStream, row_selection
from pipeline.tasks import SEQUENCE_CLASSIFICATION
from pipeline.teacher import run_teacher_train
from pipeline.teacher.capture import run_capture
from pipeline.training import Collator

WANTED = [(0, "hidden_states", 2), (0, "attentions", 4)]


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
    assert seen == [(shard, i) for shard in range(len(source)) for i in range(source.entries[0][shard].rows)]
    assert len(plan) == len(s) and all(len(rows) <= 8 for _, rows in plan)
    assert [r.tolist() for _, r in stream(source).plan(0)] == [r.tolist() for _, r in plan]  # reproducible
    assert [r.tolist() for _, r in s.plan(1)] != [r.tolist() for _, r in plan]  # reshuffled each epoch
    assert [r.tolist() for _, r in stream(source, seed=1).plan(0)] != [r.tolist() for _, r in plan]
    first = next(iter(s.at(0)))
    assert first["hidden_states/2"].shape[:2] == first["input_ids"].shape and first["teacher_logits"].shape[1] == 2


def test_workers_and_a_resumed_start_give_exactly_the_planned_batches(source, monkeypatch):
    s = stream(source, batch_size=2)
    alone = list(s.loader(1))
    monkeypatch.setattr(streaming, "HANDOVER_ROWS", 4)  # groups of 2 batches, inherited by the forked workers
    slots = streaming.PREFETCH * 2 + 2
    assert len(alone) > 2 * 2 * slots  # every worker reuses each of its slots, and grows some for longer batches
    assert alone[0]["hidden_states/2"].dtype == torch.float16  # as the cache stores them
    same_batches(list(s.loader(1, workers=2)), alone)  # held, not overwritten by later handovers
    same_batches(list(s.loader(1, 5, workers=2)), alone[5:])
    monkeypatch.setattr(streaming, "HANDOVER_ROWS", 1000)  # one group per worker
    same_batches(list(s.loader(1, workers=2)), alone)


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
    chosen = stream(source, select=lambda s, epoch: s.confidence > threshold).plan(0)
    expected = {(k, i) for k, s in enumerate(stats) for i in np.flatnonzero(s.confidence > threshold)}
    assert {(shard, int(i)) for shard, r in chosen for i in r} == expected
    labeled = stream(source, labeled_only=True).plan(0)
    assert all(rows[shard]["label"][i] >= 0 for shard, r in labeled for i in r)
    np.testing.assert_allclose(stats[0].margin, np.abs(np.diff(softmax(rows[0]["logits"]), axis=1))[:, 0], atol=1e-6)


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_configured_selection_keeps_rows_by_threshold_fraction_or_correctness():
    logits = np.log(np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55], [0.99, 0.01]]))
    stats = TeacherStats.from_logits(logits, np.array([0, 1, 1, -1, 1]))
    keep = lambda **s: np.flatnonzero(row_selection(Selection(**s))(stats, 0)).tolist()  # noqa: E731
    assert keep(by="confidence", min=0.8) == [0, 2, 4]
    assert keep(by="margin", max=0.3) == [1, 3]
    assert keep(by="confidence", keep=0.4) == [0, 4]  # the surest 2 of 5
    assert keep(by="entropy", keep=0.4) == [0, 4]  # the lowest entropy
    assert keep(by="confidence", min=0.7, keep=0.6) == [0, 2, 4]
    assert keep(by="correct") == [0, 2, 3]  # right on labeled rows 0 and 2; row 3 is unlabeled
    for bad, message in (({"by": "correct", "min": 0.5}, "takes no min"), ({"by": "margin"}, "needs min, max or keep"),
                         ({"keep": 1.5}, "must be in"), ({"by": "loss", "min": 1}, "must be one of")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            Selection(**bad)


def test_distill_select_trains_on_the_kept_rows_and_reports_them(config, tmp_path):
    run_teacher_train(config)
    cache = open_cache(run_capture(config).location)
    selection = Selection(by="confidence", keep=0.5)
    cfg = dataclasses.replace(config, distill=dataclasses.replace(config.distill, select=selection, baselines=False))
    result = run_distill(cfg)
    report = json.loads((result.run_dir / "report.json").read_text())
    rows = [cache.read_shard(e).rows for e in cache.shards("train")]
    expected = sum(int(round(0.5 * len(r))) for r in rows)  # per shard, the surest half
    assert report["selection"]["kept_per_epoch"] == [expected] and report["selection"]["of"] == sum(map(len, rows))
    assert report["selection"]["select"]["by"] == "confidence" and report["selection"]["curriculum"] is None
    student = next(m for m in report["models"] if m["role"] == "student")
    per_shard = sum(-(-int(round(0.5 * len(r))) // cfg.distill.batch_size) for r in rows)  # batches stay in a shard
    assert student["steps"] == cfg.distill.epochs * per_shard
    assert "distill.select" in (result.run_dir / "report.md").read_text()


def test_a_curriculum_streams_a_growing_share_of_the_easiest_rows(source):
    assert [Curriculum(start=0.25).fraction(e, 4) for e in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert [Curriculum(start=0.25, epochs=2).fraction(e, 4) for e in range(4)] == [0.25, 1.0, 1.0, 1.0]
    s = stream(source, select=row_selection(None, Curriculum(by="margin", start=0.5), epochs=2))
    for epoch in range(2):
        rows = {(shard, int(i)) for shard, r in s.plan(epoch) for i in r}
        expected = set()
        for k in range(len(source)):
            margin = TeacherStats.from_logits(source.rows(k)["logits"], source.rows(k)["label"]).margin
            widest = np.argsort(-margin, kind="stable")[: round((0.5, 1.0)[epoch] * len(margin))]
            expected |= {(k, int(i)) for i in widest}
        assert rows == expected
    assert s.steps(0) < s.steps(1) and [r.tolist() for _, r in s.plan(0)] == [r.tolist() for _, r in s.plan(0)]


def wandb_history(run_dir) -> dict[str, dict[str, list[float]]]:
    """Every W&B run written offline under ``run_dir``: its name -> each logged key's values in step order,
    read from the run's transaction log (LevelDB-style 32 KiB blocks of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs = {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, part, name, history = path.read_bytes(), 7, b"", None, {}
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if kind == 0:
                break
            part, pos = part + data[pos + 7 : pos + 7 + length], pos + 7 + length
            if kind not in (1, 4):  # a record continues in the next block
                continue
            record = pb.Record()
            record.ParseFromString(part)
            part = b""
            if record.WhichOneof("record_type") == "run":
                name = record.run.display_name
            elif record.WhichOneof("record_type") == "history":
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)  # W&B nests keys with a slash
                    if not key.startswith("_"):
                        history.setdefault(key, []).append(json.loads(item.value_json))
        runs[name] = history
    return runs


def test_a_curriculum_run_reports_rows_per_epoch_to_tensorboard_and_wandb_offline(config, monkeypatch):
    from tests.pipeline.test_distill import scalars

    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_teacher_train(config)
    run_capture(config)
    distill = dataclasses.replace(config.distill, epochs=2, curriculum=Curriculum(start=0.5),
                                  trackers=("tensorboard", "wandb"))  # fmt: skip
    result = run_distill(dataclasses.replace(config, distill=distill))
    report = json.loads((result.run_dir / "report.json").read_text())
    kept = report["selection"]["kept_per_epoch"]
    assert kept[0] < kept[1] == report["selection"]["of"] and report["selection"]["curriculum"]["start"] == 0.5
    logged = scalars(result.run_dir, "seed0-distilled", "tiny-l2")
    assert logged["rows_kept"] == kept
    runs = wandb_history(result.run_dir)
    assert set(runs) == {"seed0-distilled/tiny-l2", "seed0-baselines/tiny-l2-no-kd"}
    tracked = runs["seed0-distilled/tiny-l2"]
    np.testing.assert_allclose(tracked["loss/total"], logged["loss/total"], rtol=1e-6)
    assert tracked["rows_kept"] == kept and tracked["validation/accuracy"] == pytest.approx(
        logged["validation/accuracy"]
    )
    models = {m["name"]: m for m in report["models"]}
    assert models["tiny-l2-no-kd"]["steps"] >= models["tiny-l2"]["steps"]

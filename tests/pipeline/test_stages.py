"""The three stages on a tiny teacher: train once, capture what the teacher computes, distill from the cache."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from cache_store import CacheFormatError, CacheNotFoundError, open_cache
from pipeline.config import ConfigError
from pipeline.student.distill import run_distill
from pipeline.tasks import SEQUENCE_CLASSIFICATION
from pipeline.teacher import run_teacher_train
from pipeline.teacher.capture import plan_cache, run_capture
from pipeline.training import Collator


def test_teacher_is_trained_once_and_then_reused(config, capsys):
    first = run_teacher_train(config)
    assert not first.reused and (first.path / "config.json").exists()
    second = run_teacher_train(config)
    assert second.reused and second.path == first.path
    assert f"reused teacher {first.key}" in capsys.readouterr().out
    changed = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher, learning_rate=5e-4))
    with pytest.raises(ConfigError, match="run `kdcache teacher-train"):
        run_capture(changed)  # a different teacher key: nothing trained for it yet


@pytest.fixture
def captured(config):
    run_teacher_train(config)
    return run_capture(config)


def test_cache_holds_exactly_what_the_live_teacher_computes(config, captured):
    plan = plan_cache(config)
    teacher = SEQUENCE_CLASSIFICATION.load_model(plan.teacher_path, attention_maps=True).eval()
    cache = open_cache(captured.location)
    wanted = [("hidden_states", k) for k in (0, 2, 4)] + [("attentions", k) for k in (2, 4)]
    data = cache.read_shard(cache.shards("train")[0], wanted)
    rows = range(5)
    with torch.no_grad():
        for i in rows:
            inputs = Collator(pad_id=0)([plan.rows["train"].input_ids[i]])
            out = teacher(**inputs, output_hidden_states=True, output_attentions=True)
            np.testing.assert_array_equal(data.rows.input_ids[i], plan.rows["train"].input_ids[i])
            np.testing.assert_allclose(data.rows["logits"][i], out.logits[0].numpy(), atol=1e-5)
            for k in (0, 2, 4):  # stored as float16
                np.testing.assert_allclose(
                    data.example_tensor("hidden_states", k, i), out.hidden_states[k][0], atol=2e-2, rtol=1e-2
                )
            for k in (2, 4):
                np.testing.assert_allclose(data.example_tensor("attentions", k, i), out.attentions[k - 1][0], atol=1e-3)
    train = plan.splits["train"]
    assert cache.split("train").rows == len(train)
    assert sum(s.rows for s in cache.shards("train")) == len(train)
    stored = np.concatenate([d.rows["label"] for d in cache.iter_shards("train")])
    np.testing.assert_array_equal(stored, np.where(train.labeled, train.labels, -1).astype(np.int32))


def test_capture_reuses_its_cache_and_any_input_change_gives_a_new_key(config, captured, capsys):
    again = run_capture(config)
    assert again.reused and again.location.url == captured.location.url
    assert f"reused cache {captured.manifest.key}" in capsys.readouterr().out
    variants = [
        dataclasses.replace(config, capture=dataclasses.replace(config.capture, hidden_layers=(2, 4))),
        dataclasses.replace(config, capture=dataclasses.replace(config.capture, hidden_dtype="float32")),
        dataclasses.replace(config, capture=dataclasses.replace(config.capture, attention_layers=(4,))),
    ]
    keys = {plan_cache(v).key for v in variants}
    assert captured.manifest.key not in keys and len(keys) == len(variants)
    moved = dataclasses.replace(config, capture=dataclasses.replace(config.capture, cache_root="elsewhere"))
    assert plan_cache(moved).key == captured.manifest.key  # where a cache lives is not what it is


def test_distill_refuses_a_config_without_a_cache(config):
    run_teacher_train(config)
    with pytest.raises(CacheNotFoundError, match="no teacher cache named 'tiny' under .*; run `kdcache teacher-cache"):
        run_distill(config)


def test_a_cache_names_its_task_and_one_of_an_unknown_task_is_refused(config, captured):
    from cache_store import CacheFormatError

    assert captured.manifest.metadata["task"] == "sequence-classification"
    manifest = Path(str(captured.location)) / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["metadata"]["task"] = "image-segmentation"
    manifest.write_text(json.dumps(raw))
    with pytest.raises(CacheFormatError, match=r"captured for task 'image-segmentation'; this kdcache knows \["):
        run_distill(config)


def test_distill_refuses_a_mapping_to_layers_not_in_the_cache(config, captured):
    student = dataclasses.replace(config.distill.students[0], layer_map=((1, 1), (2, 3)))
    bad = dataclasses.replace(config, distill=dataclasses.replace(config.distill, students=(student,)))
    with pytest.raises(ConfigError, match=r"maps to teacher layers \[1, 3\].*add them to capture.hidden_layers"):
        run_distill(bad)


def test_distill_trains_students_and_baselines_and_writes_the_report(config, captured, tmp_path):
    result = run_distill(config)
    report = json.loads((result.run_dir / "report.json").read_text())
    assert (report["task"], report["primary_metric"]) == ("sequence-classification", "accuracy")
    models = {m["name"]: m for m in report["models"]}
    assert {m["role"] for m in models.values()} == {"teacher", "student", "baseline"}
    assert models["tiny-l2"]["baseline"] == "tiny-l2-no-kd"
    for entry in models.values():
        assert set(entry["metrics"]) == {"accuracy", "macro_f1"}
        assert all(0 <= value <= 1 for value in entry["metrics"].values())
        assert entry["params"] > 0 and entry["size_bytes"] > 0 and entry["examples_per_s"] > 0
    assert models["tiny-l2"]["params"] < models["teacher"]["params"]
    assert "| tiny-l2 | student |" in (result.run_dir / "report.md").read_text()
    assert models["teacher"]["steps"] > 0 and all(len(m["best_epochs"]) == 1 for m in models.values())
    assert (result.run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    latest = result.run_dir.parent / "latest"
    assert latest.resolve() == result.run_dir.resolve()
    student_dir = models["tiny-l2"]["paths"][0]
    model = AutoModelForSequenceClassification.from_pretrained(student_dir)
    assert model.config.num_hidden_layers == 2


def test_distill_without_baselines_and_with_several_seeds(config, captured):
    cfg = dataclasses.replace(config, distill=dataclasses.replace(config.distill, baselines=False, seeds=(0, 1)))
    result = run_distill(cfg)
    roles = [(m.name, m.role, m.seed) for m in result.models]
    assert roles == [("teacher", "teacher", 0), ("tiny-l2", "student", 0), ("tiny-l2", "student", 1)]
    summary = json.loads((result.run_dir / "report.json").read_text())["models"]
    assert summary[1]["seeds"] == [0, 1] and summary[1]["baseline"] is None


def test_the_cache_found_by_name_must_have_been_made_from_this_config(config, captured):
    """Without --cache, distill finds the cache teacher-cache named after the experiment, and refuses it when the
    config (or a data file's size or time) changed since; it never reads the data to find out."""
    other = dataclasses.replace(config, data=dataclasses.replace(config.data, labeled_train_size=40))
    with pytest.raises(ConfigError, match=r"the cache named 'tiny' .* was made from other settings "
                       r"\(data.labeled_train_size: 50 then, 40 now\)"):  # fmt: skip
        run_distill(other)
    import os

    from pipeline.config import load_dataset_spec

    data_file = load_dataset_spec(config.data.dataset).path
    stat = os.stat(data_file)
    os.utime(data_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        with pytest.raises(ConfigError, match=r"made from other settings \(files\..*reviews.csv: "):
            run_distill(config)
    finally:
        os.utime(data_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_cut_students_come_from_the_caches_own_teacher(config, captured, tmp_path):
    """The cache bundles its teacher; a teacher given by hand must be that one."""
    from pipeline.models import directory_bytes

    cache = open_cache(captured.location)
    card = cache.manifest.metadata["teacher"]
    assert card["bundled"] and card["size_bytes"] == directory_bytes(plan_cache(config).teacher_path)
    bundled = cache.attachment("teacher")
    assert (bundled / "model.safetensors").read_bytes() == (
        plan_cache(config).teacher_path / "model.safetensors"
    ).read_bytes()
    students_only = dataclasses.replace(config, data=None, teacher=None)
    with pytest.raises(ConfigError, match=r"teacher .*tiny-teacher\w* is another teacher \(fingerprint \w+\) than the "
                       r"one cache \w+ was written by \(\w+ \(fine-tuned .*tiny-teacher\w*\), fingerprint \w+\)"):  # fmt: skip
        run_distill(students_only, cache_location=str(captured.location), teacher=str(config.teacher.base_model))
    unbundled = dataclasses.replace(config, capture=dataclasses.replace(config.capture, bundle_teacher=False,
                                                                         cache_root=str(tmp_path / "lean")))  # fmt: skip
    lean = run_capture(unbundled)
    assert "teacher" not in open_cache(lean.location).manifest.attachments
    result = run_distill(dataclasses.replace(config, distill=dataclasses.replace(config.distill, baselines=False)),
                         cache_location=str(lean.location))  # fmt: skip
    assert result.models[1].name == "tiny-l2"  # its teacher found under teacher.output_root by its fingerprint
    bundling = dataclasses.replace(unbundled, capture=dataclasses.replace(unbundled.capture, bundle_teacher=True))
    with pytest.raises(ConfigError, match="exists without the teacher's checkpoint that this config bundles"):
        run_capture(bundling)


def test_distill_refuses_a_student_with_another_tokenizer(config, captured, tmp_path):
    from transformers import BertTokenizer

    student_dir = tmp_path / "other-student"
    SEQUENCE_CLASSIFICATION.load_model(plan_cache(config).teacher_path).save_pretrained(str(student_dir))
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "great", "film", "dull", "boring"]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(str(student_dir))
    student = dataclasses.replace(config.distill.students[0], teacher_layers=None, pretrained=str(student_dir))
    bad = dataclasses.replace(config, distill=dataclasses.replace(config.distill, students=(student,)))
    with pytest.raises(ConfigError, match=r"the tokenizer of .* differs from the one cache \w+'s token ids come from"):
        run_distill(bad)


def test_distill_from_a_pretrained_student_with_the_same_tokenizer(config, captured, tmp_path):
    from pipeline.models import cut_student, load_tokenizer, save_model

    plan = plan_cache(config)
    student_dir = tmp_path / "pretrained-student"
    save_model(
        cut_student(SEQUENCE_CLASSIFICATION.load_model(plan.teacher_path), (1, 3)),
        load_tokenizer(plan.teacher_path),
        student_dir,
    )
    student = dataclasses.replace(config.distill.students[0], teacher_layers=None, pretrained=str(student_dir),
                                  layer_map=((1, 2), (2, 4)))  # fmt: skip
    cfg = dataclasses.replace(config, distill=dataclasses.replace(config.distill, students=(student,), baselines=False))
    result = run_distill(cfg)
    assert [m.role for m in result.models] == ["teacher", "student"]


def test_capture_to_object_storage_and_distill_from_it(config, s3_bucket):
    run_teacher_train(config)
    root = f"s3://{s3_bucket}/team-caches"
    on_s3 = dataclasses.replace(config, capture=dataclasses.replace(config.capture, cache_root=root))
    captured = run_capture(on_s3)
    assert captured.location.url == f"{root}/{captured.key}" and captured.manifest.rows == 120
    assert run_capture(on_s3).reused
    cfg = dataclasses.replace(on_s3, distill=dataclasses.replace(config.distill, baselines=False))
    result = run_distill(cfg)
    assert [m.role for m in result.models] == ["teacher", "student"]


def test_distill_refuses_student_layers_outside_the_student(config, captured):
    student = dataclasses.replace(config.distill.students[0], layer_map=((1, 2), (3, 4)))
    bad = dataclasses.replace(config, distill=dataclasses.replace(config.distill, students=(student,)))
    with pytest.raises(ConfigError, match=r"layer_map student layers \[3\] outside 0..2 for hidden_states"):
        run_distill(bad)


def test_dry_run_estimate_is_within_20_percent_of_the_real_cache(config):
    from pipeline.teacher.capture import estimate_capture

    run_teacher_train(config)
    estimate = estimate_capture(config, sample_rows=24)
    assert not plan_cache(config).location.exists()  # a dry run writes nothing
    manifest = run_capture(config).manifest
    assert estimate.rows == manifest.rows and set(estimate.bytes_by_output) == {"rows", "hidden_states", "attentions"}
    assert abs(estimate.bytes - manifest.bytes) / manifest.bytes < 0.2
    assert estimate.seconds > 0


def test_cache_rows_and_values_do_not_depend_on_the_batch_settings(config, tmp_path):
    run_teacher_train(config)
    caches = []
    for name, batch_size, batch_tokens in (("bs8", 8, 8192), ("bs64", 64, 8192), ("budget", 64, 96)):
        capture = dataclasses.replace(config.capture, batch_size=batch_size, batch_tokens=batch_tokens,
                                      cache_root=str(tmp_path / name))  # fmt: skip
        caches.append(open_cache(run_capture(dataclasses.replace(config, capture=capture)).location))
    assert len({c.key for c in caches}) == 1  # batching is not part of what a cache is
    assert len({json.dumps(c.manifest.metadata, sort_keys=True) for c in caches}) == 1  # nor of what it says
    wanted = [("hidden_states", k) for k in (0, 2, 4)] + [("attentions", k) for k in (2, 4)]
    first, *others = caches
    for split in ("train", "validation", "test"):
        wanted = wanted if split == "train" else []  # the other splits hold rows only
        expected = [first.read_shard(e, wanted) for e in first.shards(split)]
        for other in others:
            for want, got in zip(expected, [other.read_shard(e, wanted) for e in other.shards(split)], strict=True):
                np.testing.assert_array_equal(got.rows.example_id, want.rows.example_id)
                np.testing.assert_array_equal(got.rows["label"], want.rows["label"])
                assert [x.tolist() for x in got.rows.input_ids] == [x.tolist() for x in want.rows.input_ids]
                np.testing.assert_allclose(got.rows["logits"], want.rows["logits"], atol=1e-5)
                for key in wanted:  # float16 storage: equal up to its rounding
                    np.testing.assert_allclose(got.tensors[key], want.tensors[key], atol=1e-4, rtol=2e-3)


def test_capture_keeps_only_the_configured_attention_heads(config):
    run_teacher_train(config)
    full = open_cache(run_capture(config).location)
    capture = dataclasses.replace(config.capture, attention_heads=(0, 2))
    some = open_cache(run_capture(dataclasses.replace(config, capture=capture)).location)
    assert some.key != full.key and some.manifest.tensor("attentions").example_shape == (2, "L", "L")
    wanted = [("attentions", 4)]
    everything, kept = (
        full.read_shard(full.shards("train")[0], wanted),
        some.read_shard(some.shards("train")[0], wanted),
    )
    for i in range(3):
        expected = everything.example_tensor("attentions", 4, i)[[0, 2]]
        np.testing.assert_array_equal(kept.example_tensor("attentions", 4, i), expected)
    with pytest.raises(ConfigError, match=r"attention_heads \[0, 9\]: this teacher has heads 0..3"):
        run_capture(dataclasses.replace(config, capture=dataclasses.replace(capture, attention_heads=(0, 9))))


def test_sentence_pairs_train_and_capture_with_segment_ids(config_file, pairs_dataset):
    from pipeline.config import load_config

    cfg = load_config(config_file, [f"data.dataset={pairs_dataset}"])
    run_teacher_train(cfg)
    cache = open_cache(run_capture(cfg).location)
    ids = cache.read_shard(cache.shards("train")[0], []).rows.input_ids
    assert all((x == 3).sum() == 2 for x in ids)  # [CLS] a [SEP] b [SEP]: both texts are in every row


def test_a_ready_made_teacher_must_have_the_data_sets_classes_in_its_order(config, tmp_path):
    from pipeline.teacher.train import check_teacher_labels

    names = ("neg", "pos")
    path = tmp_path / "ready"
    teacher = SEQUENCE_CLASSIFICATION.load_model(config.teacher.base_model)
    teacher.save_pretrained(str(path))  # LABEL_0, LABEL_1: no order to check
    check_teacher_labels(path, names)
    with pytest.raises(ConfigError, match=r"has 2 classes, the data set 3 \['a', 'b', 'c'\]"):
        check_teacher_labels(path, ("a", "b", "c"))
    model = SEQUENCE_CLASSIFICATION.load_model(path)
    model.config.id2label, model.config.label2id = {0: "pos", 1: "neg"}, {"pos": 0, "neg": 1}
    model.save_pretrained(str(path))
    check_teacher_labels(path, ("0", "1"))  # class ids carry no names: compared by position
    with pytest.raises(ConfigError, match=r"orders its classes \['pos', 'neg'\], the data set \['neg', 'pos'\]"):
        run_teacher_train(dataclasses.replace(config, teacher=dataclasses.replace(config.teacher, base_model=str(path),
                                                                                  fine_tune=False)))  # fmt: skip


def test_each_shard_records_its_precision_and_a_resume_at_another_is_refused(config, monkeypatch):
    import pipeline.teacher.capture as capture

    run_teacher_train(config)
    partial = run_capture(config, num_shards=2, shard_index=0)
    assert partial.manifest is None
    cache_dir = partial.location
    entry = json.loads(cache_dir.read_bytes("train/shard-00000/shard.json"))
    assert entry["producer"] == {"precision": "float32"}  # what `auto` resolved to on this CPU
    monkeypatch.setattr(capture, "resolve_precision", lambda name, device: torch.bfloat16)  # as a GPU would
    with pytest.raises(CacheFormatError, match=r"shard train/shard-00000 was computed with precision=float32, this "
                       "run computes precision=bfloat16"):  # fmt: skip
        run_capture(config)


def test_unlabeled_transfer_text_does_not_retrain_the_teacher(config, tiny_dataset, tmp_path):
    """The teacher key hashes only what the teacher learns from; the cache key changes (the cache holds more)."""
    import yaml

    from pipeline.data import load_splits
    from pipeline.teacher.train import locate_teacher

    (tmp_path / "more.csv").write_text("review\n" + "".join(f"a film number {i} with a plot\n" for i in range(40)))
    definition = yaml.safe_load(tiny_dataset.read_text()) | {"unlabeled": [str(tmp_path / "more.csv")]}
    (tmp_path / "more.yaml").write_text(yaml.safe_dump(definition))
    more = dataclasses.replace(config, data=dataclasses.replace(config.data, dataset=str(tmp_path / "more.yaml")))
    splits, with_more = load_splits(config.data, seed=0), load_splits(more.data, seed=0)
    assert len(with_more["train"]) == len(splits["train"]) + 40
    assert locate_teacher(more, with_more)[1] == locate_teacher(config, splits)[1]
    run_teacher_train(config)
    assert plan_cache(more).key != plan_cache(config).key

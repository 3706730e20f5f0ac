"""Token classification and question answering through every stage, with tiny models built from a config:
the data read as each task reads it, the cached per-token outputs equal to a live teacher's, a CLI run
from teacher fine-tuning through distillation, and a student config of another task refused."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cache_store import open_cache
from pipeline.config import ConfigError, DataConfig, load_config
from pipeline.data import load_splits
from pipeline.errors import DataError
from pipeline.student.distill import run_distill
from pipeline.tasks import TASKS
from pipeline.teacher import run_teacher_train
from pipeline.teacher.capture import plan_cache, run_capture
from pipeline.training import Collator, predict
from tests.conftest import BAD, FILLER, GOOD, TAGS, task_config, write_definition

NER, QA = TASKS["token-classification"], TASKS["question-answering"]


def qa_row(rng: random.Random, i: int, answered: bool = True) -> dict:
    """A context of filler words holding one GOOD word; the question asks for it (its answer is that word)."""
    words = rng.choices(FILLER, k=rng.randint(8, 30))
    at = rng.randint(0, len(words))
    answer = rng.choice(GOOD)
    words.insert(at, answer)
    context = " ".join(words)
    start = len(" ".join(words[:at])) + (1 if at else 0)
    row = {"id": f"q{i}", "question": "the story is", "context": context}
    if answered:
        row["answers"] = {"text": [answer], "answer_start": [start]}
    return row


@pytest.fixture(scope="session")
def qa_dataset(tmp_path_factory):
    """SQuAD-layout JSONL (answers as {text, answer_start}): train, test and questions without answers."""
    root = tmp_path_factory.mktemp("qa-data")
    rng = random.Random(0)
    for name, n in (("train.jsonl", 100), ("test.jsonl", 20)):
        rows = [qa_row(rng, i) for i in range(n)]
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    transfer = [qa_row(rng, i, answered=False) for i in range(40)]
    (root / "transfer.jsonl").write_text("".join(json.dumps(r) + "\n" for r in transfer))
    return write_definition(root / "qa.yaml", files={"train": str(root / "train.jsonl"), "test": str(root / "test.jsonl")},
                            unlabeled=[str(root / "transfer.jsonl")], text_columns=["question", "context"],
                            label_column="answers")  # fmt: skip


@pytest.fixture
def ner_config(tmp_path, tiny_teacher, ner_dataset):
    path = tmp_path / "ner.yaml"
    path.write_text(yaml.safe_dump(task_config(tmp_path, tiny_teacher, ner_dataset, "token-classification")))
    return path


@pytest.fixture
def qa_config(tmp_path, tiny_teacher, qa_dataset):
    path = tmp_path / "qa.yaml"
    path.write_text(yaml.safe_dump(task_config(tmp_path, tiny_teacher, qa_dataset, "question-answering",
                                               max_length=20, doc_stride=8)))  # fmt: skip
    return path


def test_conll_files_are_read_as_words_with_tags_and_bad_rows_are_counted(ner_dataset, tmp_path):
    splits = load_splits(DataConfig(dataset=str(ner_dataset)), seed=0, task=NER)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [120, 20, 20]
    words, tags = splits["test"].texts[0], splits["test"].labels[0]
    assert len(words) == len(tags) and all(w in FILLER + GOOD + BAD for w in words)
    assert {TAGS[t] for t in tags} <= set(TAGS) and "-DOCSTART-" not in words
    bad = tmp_path / "bad.conll"
    bad.write_text("great\tB-good\nfilm\tO\n\nsharp\tB-good\nsmart\tB-smart\n\nplot\n")
    definition = write_definition(tmp_path / "bad.yaml", path=str(bad), text_columns=["tokens"], label_column="tags",
                                  label_names=TAGS)  # fmt: skip
    with pytest.raises(DataError, match=r"bad.conll line 7: 'plot' has no tag"):
        load_splits(DataConfig(dataset=str(definition)), seed=0, task=NER)
    bad.write_text("".join(f"great\tB-good\nfilm{i}\tO\n\nsharp\tB-good\nsmart{i}\tB-smart\n\n" for i in range(20)))
    splits = load_splits(DataConfig(dataset=str(definition), test_size=5, validation_size=5), seed=0, task=NER)
    assert splits.dropped["data set"]["tag not in label_names"] == 20
    (tmp_path / "bio.yaml").write_text(yaml.safe_dump({"path": str(bad), "text_columns": ["tokens"],
                                                       "label_column": "tags", "label_names": ["O", "PER"]}))  # fmt: skip
    with pytest.raises(DataError, match=r"tags \['PER'\] are neither O nor B-, I-, E- or S-"):
        load_splits(DataConfig(dataset=str(tmp_path / "bio.yaml")), seed=0, task=NER)


def test_plain_transfer_text_with_its_own_columns_joins_a_ner_train_split_as_words(ner_dataset, tmp_path):
    (tmp_path / "tweets.csv").write_text("id,score,text\n1,0.5,so  good to see you\n2,-1.0,\n3,2.0,the end.\n")
    definition = yaml.safe_load(ner_dataset.read_text())
    definition["unlabeled"] = [{"path": str(tmp_path / "tweets.csv"), "text_columns": ["text"]}]
    (tmp_path / "ner.yaml").write_text(yaml.safe_dump(definition))
    splits = load_splits(DataConfig(dataset=str(tmp_path / "ner.yaml")), seed=0, task=NER)
    train = splits["train"]
    transfer = {train.texts[i] for i in np.flatnonzero(~train.labeled)}
    assert transfer == {("so", "good", "to", "see", "you"), ("the", "end.")}
    assert train.labeled.sum() == 120 and splits.dropped["unlabeled"] == {"empty text": 1, "text also in test": 0}
    definition["unlabeled"] = [{"path": str(tmp_path / "tweets.csv"), "text_columns": ["body"]}]
    (tmp_path / "ner.yaml").write_text(yaml.safe_dump(definition))
    with pytest.raises(
        DataError, match=r"unlabeled .*tweets.csv: no column\(s\) \['body'\]; it has \['id', 'score', 'text'\]"
    ):
        load_splits(DataConfig(dataset=str(tmp_path / "ner.yaml")), seed=0, task=NER)


def test_squad_rows_become_features_and_a_misplaced_answer_is_counted(qa_dataset, tmp_path, tiny_teacher):
    from pipeline.models import load_tokenizer

    cfg = DataConfig(dataset=str(qa_dataset), validation_size=10, max_length=20, doc_stride=8)
    splits = load_splits(cfg, seed=0, task=QA)
    assert int(splits["train"].labeled.sum()) == 90 and len(splits["train"]) == 130  # 40 transfer questions
    rows = QA.encode(load_tokenizer(tiny_teacher), splits["test"], cfg)
    assert len(rows) > len(splits["test"])  # long contexts: several windows per question
    assert set(rows.example_id) == set(splits["test"].example_id)
    for f in range(len(rows)):
        start, end = rows["label"][f]
        if start > 0:  # the window holds the answer: its tokens spell it
            span = rows["offsets"][f][start : end + 1]
            assert rows["context"][f][span[0, 0] : span[-1, 1]] == rows["answers"][f][0]
    moved = [dict(r, answers={"text": ["great"], "answer_start": [0]})
             for r in map(json.loads, open(str(qa_dataset.parent / "test.jsonl")))]  # fmt: skip
    (tmp_path / "moved.jsonl").write_text("".join(json.dumps(r) + "\n" for r in moved))
    definition = write_definition(tmp_path / "moved.yaml", path=str(tmp_path / "moved.jsonl"),
                                  text_columns=["question", "context"], label_column="answers")  # fmt: skip
    with pytest.raises(DataError, match="no usable row .*'answer not at its answer_start in the context': 2"):
        load_splits(DataConfig(dataset=str(definition), test_size=2, validation_size=2), seed=0, task=QA)


@pytest.mark.parametrize("task", ["token-classification", "question-answering"])
def test_cached_per_token_logits_equal_the_live_teachers_on_the_same_features(task, ner_config, qa_config):
    cfg = load_config(ner_config if task == "token-classification" else qa_config)
    run_teacher_train(cfg)
    location = run_capture(cfg).location
    plan = plan_cache(cfg)
    teacher = TASKS[task].load_model(plan.teacher_path).eval()
    collate = Collator.for_model(plan_tokenizer(plan), teacher.config)
    cache = open_cache(location)
    for split in ("train", "test"):
        stored = [r for d in cache.iter_shards(split) for r in d.rows["logits"]]
        live = predict(teacher, plan.rows[split], task=TASKS[task], collate=collate)
        assert len(stored) == len(live) == len(plan.rows[split])
        for a, b in zip(stored, live, strict=True):
            assert a.shape == b.shape and a.dtype == np.float32
            np.testing.assert_allclose(a, b, atol=1e-5)
    hidden = cache.read_shard(cache.shards("train")[0], [("hidden_states", 2)])
    with torch.no_grad():
        out = teacher(**collate([hidden.rows.input_ids[0]]), output_hidden_states=True)
    np.testing.assert_allclose(hidden.example_tensor("hidden_states", 2, 0), out.hidden_states[2][0], atol=2e-2)


def plan_tokenizer(plan):
    from pipeline.models import load_tokenizer

    return load_tokenizer(plan.teacher_path)


@pytest.mark.parametrize("task", ["token-classification", "question-answering"])
def test_cli_runs_a_task_from_teacher_to_report(task, ner_config, qa_config):
    config = ner_config if task == "token-classification" else qa_config
    for stage in ("teacher-train", "teacher-cache", "distill"):
        done = subprocess.run([sys.executable, "cli.py", stage, "--config", str(config)], capture_output=True,
                              text=True)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
    cfg = load_config(config)
    info = subprocess.run([sys.executable, "cli.py", "cache", "info", str(run_capture(cfg).location)],
                          capture_output=True, text=True)  # fmt: skip
    assert info.returncode == 0 and task in info.stdout, info.stderr
    run_dir = Path(cfg.distill.run_root) / "latest"
    report = json.loads((run_dir / "report.json").read_text())
    primary = TASKS[task].primary_metric
    assert report["task"] == task and report["primary_metric"] == primary
    names = {m["name"] for m in report["models"]}
    assert names == {"teacher", "tiny-l2", "tiny-l2-no-kd"}
    for model in report["models"]:
        assert set(model["metrics"]) == set(TASKS[task].metric_labels)
        assert 0.0 <= model["metrics"][primary] <= 1.0
    assert TASKS[task].metric_labels[primary] in (run_dir / "report.md").read_text()


def test_distill_refuses_a_config_of_another_task_than_its_cache(ner_config):
    cfg = load_config(ner_config)
    run_teacher_train(cfg)
    location = run_capture(cfg).location
    other = load_config(ner_config, ["task=question-answering"])
    with pytest.raises(ConfigError, match=r"is for question-answering, but cache \w+ holds a token-classification"):
        run_distill(other, cache_location=location)


@pytest.mark.parametrize("task", ["token-classification", "question-answering"])
def test_a_float32_cache_gives_the_live_teachers_per_token_losses_step_by_step(task, ner_config, qa_config):
    from tests.pipeline.test_distill import assert_cached_equals_online

    cfg = load_config(ner_config if task == "token-classification" else qa_config,
                      ["capture.hidden_dtype=float32", "distill.baselines=false"])  # fmt: skip
    run_teacher_train(cfg)
    run_capture(cfg)
    assert_cached_equals_online(cfg, "tiny-l2", ("kl", "ce", "hidden_mse"))

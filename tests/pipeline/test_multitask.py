"""Several tasks per student: the batch rule, the shared encoder, a multi-task run beside single-task students."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from pipeline.config import ConfigError, TaskSampling, load_config
from pipeline.student.distill import run_distill
from pipeline.student.inputs import TeacherCache, named_location
from pipeline.student.multitask import TASK, TaskMixture, shared_encoder_models, task_order, task_shares
from pipeline.student.streaming import CacheSource, StudentStream
from pipeline.teacher import run_teacher_train
from pipeline.teacher.capture import run_capture
from pipeline.training import Collator
from tests.conftest import task_config, tiny_config_dict


def test_the_batch_rules_share_an_epoch_between_tasks_as_stated():
    steps = [6, 2]
    assert task_shares(steps, TaskSampling("proportional")) == [6, 2]
    assert task_shares(steps, TaskSampling("round_robin")) == [4, 4]
    # shares proportional to sqrt(6) and sqrt(2) of 8 steps: 5.07 and 2.93, rounded by largest remainder
    assert task_shares(steps, TaskSampling("temperature", temperature=2.0)) == [5, 3]
    assert task_shares(steps, TaskSampling("temperature", temperature=1.0)) == [6, 2]
    assert task_shares(steps, TaskSampling("temperature", temperature=1000.0)) == [4, 4]
    assert task_order([4, 4], TaskSampling("round_robin"), seed=0, epoch=0).tolist() == [0, 1] * 4
    proportional = TaskSampling("proportional")
    order = task_order([6, 2], proportional, seed=0, epoch=0)
    assert sorted(order.tolist()) == [0] * 6 + [1] * 2
    assert order.tolist() == task_order([6, 2], proportional, seed=0, epoch=0).tolist()  # reproducible
    assert any(task_order([6, 2], proportional, seed=0, epoch=e).tolist() != order.tolist() for e in (1, 2, 3))
    with pytest.raises(ConfigError, match="must be one of"):
        TaskSampling("uniform")


@pytest.fixture
def two_tasks(tmp_path, tiny_teacher, tiny_dataset, ner_dataset):
    """Config files of two tasks of different shapes (review sentiment; NER tags per word) whose teachers
    share the tiny tokenizer, both captured, and a config of a multi-task student over them."""
    reviews = tiny_config_dict(tmp_path, tiny_teacher, tiny_dataset) | {"name": "reviews"}
    ner = task_config(tmp_path, tiny_teacher, ner_dataset, "token-classification") | {"name": "ner"}
    paths = []
    for raw in (reviews, ner):
        path = tmp_path / f"{raw['name']}.yaml"
        path.write_text(yaml.safe_dump(raw))
        cfg = load_config(path)
        run_teacher_train(cfg)
        run_capture(cfg)
        paths.append(path)
    distill = reviews["distill"] | {"tasks": [{"cache": str(paths[0])}, {"cache": str(paths[1]), "name": "tags"}],
                                    "loss": ner["distill"]["loss"], "epochs": 2}  # fmt: skip
    path = tmp_path / "both.yaml"
    path.write_text(yaml.safe_dump({"name": "both", "distill": distill}))
    return load_config(path)


def test_the_mixture_interleaves_each_tasks_planned_batches_and_resumes_anywhere(two_tasks):
    caches = [TeacherCache(named_location(t.cache)) for t in two_tasks.distill.tasks]
    streams = [StudentStream(CacheSource(c.cache, "train"), task=c.task, collate=Collator.for_tokenizer(c.tokenizer),
                             batch_size=8, seed=0) for c in caches]  # fmt: skip
    mixture = TaskMixture(streams, TaskSampling("round_robin"), seed=0)
    assert sum(mixture.shares) == sum(mixture.steps) and abs(mixture.shares[0] - mixture.shares[1]) <= 1
    assert mixture.steps[0] != mixture.steps[1]
    epochs = [list(mixture.batches(e)) for e in range(2)]
    assert [int(b[TASK]) for b in epochs[0]] == task_order(mixture.shares, TaskSampling("round_robin"), seed=0,
                                                           epoch=0).tolist()  # fmt: skip
    assert [int(b[TASK]) for b in epochs[0]][: 2 * min(mixture.shares)] == [0, 1] * min(mixture.shares)
    for k, stream in enumerate(streams):  # a task's batches follow its own stream's epochs, on into the next
        mine = [b["example_id"].tolist() for epoch in epochs for b in epoch if int(b[TASK]) == k]
        planned = [b["example_id"].tolist() for e in range(3) for b in stream.loader(e)]
        assert mine == planned[: len(mine)]
    resumed = list(mixture.batches(1, 5))
    assert [b["example_id"].tolist() for b in resumed] == [b["example_id"].tolist() for b in epochs[1][5:]]


def test_every_task_model_shares_one_encoder(two_tasks, tiny_teacher):
    from transformers import AutoModelForSequenceClassification

    caches = [TeacherCache(named_location(t.cache)) for t in two_tasks.distill.tasks]
    first = AutoModelForSequenceClassification.from_pretrained(str(tiny_teacher))
    models = shared_encoder_models(first, caches, attention_maps=False)
    assert models[1].bert is models[0].bert and models[1].classifier is not models[0].classifier
    assert type(models[1]).__name__ == "BertForTokenClassification" and models[1].num_labels == len(
        caches[1].label_names
    )
    ids = torch.tensor([[2, 10, 11, 3]])
    before = models[0](input_ids=ids).logits.detach()
    optimizer = torch.optim.SGD(models[1].parameters(), lr=1.0)
    models[1](input_ids=ids, labels=torch.tensor([[1, 2, 0, 1]])).loss.backward()
    optimizer.step()
    assert not torch.allclose(models[0](input_ids=ids).logits, before)  # task 1's step moved task 0's encoder


def test_a_multitask_run_reports_each_task_beside_its_single_task_students(two_tasks):
    assert [c.name for c in two_tasks.teacher_stages()] == ["reviews", "ner"]
    result = run_distill(two_tasks)
    report = json.loads((result.run_dir / "report.json").read_text())
    assert list(report["tasks"]) == ["reviews", "tags"]
    for name in ("reviews", "tags"):
        task = json.loads((result.run_dir / name / "report.json").read_text())
        models = {m["name"]: m for m in task["models"]}
        assert {"teacher", "tiny-l2", "tiny-l2-no-kd", "tiny-l2-multi-task"} == set(models)
        assert models["tiny-l2-multi-task"]["role"] == "multi-task"
    steps = {name: {m["name"]: m["steps"] for m in report["tasks"][name]["models"]} for name in report["tasks"]}
    # proportional: a multi-task epoch is both tasks' epochs
    assert steps["reviews"]["tiny-l2-multi-task"] == steps["reviews"]["tiny-l2"] + steps["tags"]["tiny-l2"]
    saved = list((result.run_dir / "models").glob("tiny-l2-multi-task-*-seed0"))
    assert len(saved) == 2
    assert "tiny-l2-multi-task" in (result.run_dir / "report.md").read_text()

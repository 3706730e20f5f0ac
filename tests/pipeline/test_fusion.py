"""Several teachers per student: the fusion rules, the stream over several caches, refusals, a fused run."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml

from cache_store import open_cache
from pipeline.config import ConfigError, Fusion, LossTerm, load_config
from pipeline.student.distill import run_distill
from pipeline.student.fusion import fused_log_probs
from pipeline.student.inputs import open_teachers, teacher_locations
from pipeline.student.losses import logit_divergence
from pipeline.student.objective import Objective
from pipeline.student.streaming import CacheSource, StudentStream
from pipeline.tasks import SEQUENCE_CLASSIFICATION
from pipeline.teacher import run_teacher_train
from pipeline.teacher.capture import run_capture
from pipeline.training import Collator
from tests.conftest import tiny_config_dict

# three teachers over three outcomes of two classes; outcome 2 has no label
LOGITS = np.array([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
                   [[0.5, 0.0], [3.0, 0.0], [0.0, 4.0]],
                   [[0.0, 1.0], [0.0, 0.2], [2.0, 0.0]]])  # fmt: skip
TARGETS = np.array([0, 0, -100])


def softmax(z, t=1.0):
    e = np.exp(z / t - (z / t).max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("rule", ["mean", "weighted", "confidence", "best"])
def test_each_rule_mixes_the_teachers_probabilities_as_written_by_hand(rule):
    t = 2.0
    p = softmax(LOGITS, t)  # (K, N, C) at the temperature
    confidence = softmax(LOGITS).max(-1)  # (K, N) at temperature 1
    weights = {
        "mean": np.full((3, 3), 1 / 3),
        "weighted": np.array([[0.5], [0.25], [0.25]]) * np.ones((3, 3)),
        "confidence": confidence / confidence.sum(0),
        # outcome 0: teachers 0 and 1 are right, 0 the surer; outcome 1: teacher 1 alone is right; outcome 2
        # (unlabeled): teacher 1 is the most confident
        "best": np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]], float),
    }[rule]
    expected = np.log((weights[..., None] * p).sum(0))
    got = fused_log_probs([torch.tensor(z) for z in LOGITS], torch.tensor(TARGETS), rule, temperature=t,
                          weights=(2.0, 1.0, 1.0) if rule == "weighted" else None)  # fmt: skip
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def test_the_objective_of_a_fused_student_compares_it_with_the_fused_distribution(tiny_teacher):
    from transformers import AutoModelForSequenceClassification

    student = AutoModelForSequenceClassification.from_pretrained(str(tiny_teacher)).eval()
    batch = {"input_ids": torch.tensor([[2, 10, 11, 3], [2, 12, 3, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
             "label": torch.tensor([1, -100]), "teacher_logits": torch.randn(2, 2), "teacher1/teacher_logits": torch.randn(2, 2),
             "teacher2/teacher_logits": torch.randn(2, 2)}  # fmt: skip
    objective = Objective(student, SEQUENCE_CLASSIFICATION, (LossTerm("kl", 1.0, temperature=3.0),), (),
                          teacher_width=32, teachers=(0, 2), fusion=Fusion("weighted", (1.0, 5.0, 3.0)))  # fmt: skip
    with torch.no_grad():
        _, parts = objective(batch)
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    p = 0.25 * torch.softmax(batch["teacher_logits"] / 3, -1) + 0.75 * torch.softmax(
        batch["teacher2/teacher_logits"] / 3, -1
    )
    torch.testing.assert_close(parts["kl"], logit_divergence(logits, 3 * p.log(), temperature=3.0, kind="kl"))


def test_fusion_settings_are_checked_by_name():
    for bad, message in (({"rule": "vote"}, "must be one of"), ({"rule": "weighted"}, "only then"),
                         ({"rule": "mean", "weights": [1, 1]}, "only then")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            Fusion(**bad)
    with pytest.raises(ConfigError, match="only hidden and attention terms name a teacher"):
        LossTerm("kl", teacher=1)


@pytest.fixture
def two_teachers(tmp_path, tiny_teacher, tiny_dataset):
    """Config files of two teachers fine-tuned from different seeds on the same rows, both captured, and a
    config that distills from both."""
    base = tiny_config_dict(tmp_path, tiny_teacher, tiny_dataset)
    first = tmp_path / "first.yaml"
    first.write_text(yaml.safe_dump(base | {"name": "first"}))
    second = tmp_path / "second.yaml"
    second.write_text(yaml.safe_dump({"extends": "first.yaml", "name": "second", "teacher": {"seed": 1},
                                      "capture": {"hidden_layers": [], "attention_layers": []}}))  # fmt: skip
    for path in (first, second):
        cfg = load_config(path)
        run_teacher_train(cfg)
        run_capture(cfg)
    fused = dict(base, name="fused")
    fused.pop("data"), fused.pop("teacher")
    fused["distill"] = base["distill"] | {
        "teachers": [str(first), str(second)],
        "students": [{"name": "fused", "teacher_layers": [2, 4]},
                     {"name": "best", "teacher_layers": [2, 4], "fusion": {"rule": "best"}},
                     {"name": "second-only", "teacher_layers": [2, 4], "teachers": [1],
                      "loss": [{"kind": "kl", "weight": 0.5}, {"kind": "ce", "weight": 0.5},
                               {"kind": "hidden_mse", "weight": 1.0, "teacher": 0}]}],
        "loss": [{"kind": "kl", "weight": 0.5}, {"kind": "ce", "weight": 0.5}, {"kind": "hidden_mse", "weight": 1.0}],
    }  # fmt: skip
    path = tmp_path / "fused.yaml"
    path.write_text(yaml.safe_dump(fused))
    return load_config(path)


def test_a_fused_run_streams_both_teachers_and_reports_them(two_teachers):
    cfg = two_teachers
    assert [c.name for c in cfg.teacher_stages()] == ["first", "second"]
    teachers = open_teachers(teacher_locations(cfg))
    assert teachers[0].meta.teacher.fingerprint != teachers[1].meta.teacher.fingerprint  # another seed
    source = CacheSource([t.cache for t in teachers], "train")
    stream = StudentStream(source, task=SEQUENCE_CLASSIFICATION, collate=Collator(pad_id=0), batch_size=8, seed=0,
                           wanted=[(0, "hidden_states", 2)])  # fmt: skip
    second = {int(e): z for d in teachers[1].cache.iter_shards("train") for e, z in zip(d.rows.example_id,
                                                                                      d.rows["logits"], strict=True)}  # fmt: skip
    for batch in stream.at(0):
        expected = np.stack([second[int(e)] for e in batch["example_id"]])
        np.testing.assert_array_equal(batch["teacher1/teacher_logits"].numpy(), expected)
        assert not torch.equal(batch["teacher_logits"], batch["teacher1/teacher_logits"])
    result = run_distill(cfg)
    report = json.loads((result.run_dir / "report.json").read_text())
    names = {m["name"]: m for m in report["models"]}
    assert names["teacher"]["role"] == names["teacher-1"]["role"] == "teacher"
    assert names["teacher-1"]["metrics"] == teachers[1].meta.teacher.metrics["test"]
    # one baseline serves the three students: the same model, trained on the same labels
    assert [n for n, m in names.items() if m["role"] == "baseline"] == ["fused-no-kd"]
    assert {names[s]["baseline"] for s in ("fused", "best", "second-only")} == {"fused-no-kd"}


def test_caches_of_other_examples_or_shards_are_refused_in_one_line(two_teachers, config):
    first, second = two_teachers.distill.teachers
    other = dataclasses.replace(config, data=dataclasses.replace(config.data, max_examples=60))
    run_teacher_train(other)
    elsewhere = run_capture(other).location
    with pytest.raises(ConfigError, match=r"not over the same examples: their rows \(data fingerprint\) differ"):
        open_teachers([teacher_locations(load_config(first))[0], elsewhere])
    resharded = dataclasses.replace(load_config(second), name="resharded")
    resharded = dataclasses.replace(resharded, capture=dataclasses.replace(resharded.capture, shard_rows=32))
    location = run_capture(resharded).location
    with pytest.raises(ConfigError, match="cut train into other shards"):
        CacheSource([open_cache(teacher_locations(load_config(first))[0]), open_cache(location)], "train")
    with pytest.raises(ConfigError, match="not with --cache"):
        teacher_locations(two_teachers, elsewhere)
    students = (dataclasses.replace(two_teachers.distill.students[2], loss=None),)  # hidden states of teacher 1
    cfg = dataclasses.replace(two_teachers, distill=dataclasses.replace(two_teachers.distill, students=students))
    with pytest.raises(
        ConfigError, match=r"maps to teacher layers \[2, 4\], but the cache stores hidden_states for \[\]"
    ):
        run_distill(cfg)

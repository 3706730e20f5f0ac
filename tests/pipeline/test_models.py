"""Students cut from teacher layers: the right weights, a working forward, a loadable checkpoint."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from pipeline.config import ConfigError
from pipeline.models import count_parameters, cut_student, load_tokenizer, save_model
from pipeline.tasks import SEQUENCE_CLASSIFICATION


def test_cut_student_copies_the_chosen_layers_and_leaves_the_teacher_alone(tiny_teacher):
    teacher = SEQUENCE_CLASSIFICATION.load_model(tiny_teacher)
    student = cut_student(teacher, (2, 4))
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    for s, t in ((0, 1), (1, 3)):
        torch.testing.assert_close(
            student.bert.encoder.layer[s].output.dense.weight, teacher.bert.encoder.layer[t].output.dense.weight
        )
    torch.testing.assert_close(student.classifier.weight, teacher.classifier.weight)
    assert count_parameters(student) < count_parameters(teacher)
    ids = torch.tensor([[2, 10, 11, 3]])
    assert student(input_ids=ids, output_hidden_states=True).hidden_states[2].shape == (1, 4, 32)


def test_cut_student_refuses_layers_the_teacher_lacks(tiny_teacher):
    with pytest.raises(ConfigError, match=r"\[5\] outside 1..4"):
        cut_student(SEQUENCE_CLASSIFICATION.load_model(tiny_teacher), (2, 5))


def test_saved_student_loads_with_auto_classes(tiny_teacher, tmp_path):
    student = cut_student(SEQUENCE_CLASSIFICATION.load_model(tiny_teacher), (1, 3)).eval()
    save_model(student, load_tokenizer(tiny_teacher), tmp_path / "s")
    loaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "s")).eval()
    ids = torch.tensor([[2, 10, 11, 3]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, student(input_ids=ids).logits)
    assert load_tokenizer(tmp_path / "s").get_vocab() == load_tokenizer(tiny_teacher).get_vocab()

"""Loss terms against hand computations, and padding never counts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.data import UNLABELED
from pipeline.student.losses import (
    attention_kl,
    attention_mse,
    cls_mse,
    hard_label_ce,
    hidden_cosine,
    hidden_mse,
    logit_kl,
    logit_mse,
    span_kl,
)


def test_logit_kl_is_zero_for_equal_logits_and_matches_the_definition():
    torch.manual_seed(0)
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    assert logit_kl(t, t, temperature=2.0).abs() < 1e-6
    T = 3.0
    p_t = F.softmax(t / T, -1)
    expected = (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum(-1).mean() * T**2
    torch.testing.assert_close(logit_kl(s, t, temperature=T), expected)


def test_span_kl_compares_start_and_end_distributions_over_the_context_only():
    torch.manual_seed(5)
    s, t = torch.randn(3, 6, 2), torch.randn(3, 6, 2)
    context = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    T = 2.0
    expected = []
    for row in (0, 1):  # row 2 has no context token: it teaches nothing
        for end in (0, 1):
            p_t = F.softmax(t[row, context[row], end] / T, -1)
            log_s = F.log_softmax(s[row, context[row], end] / T, -1)
            expected.append((p_t * (p_t.log() - log_s)).sum())
    torch.testing.assert_close(span_kl(s, t, context, temperature=T), torch.stack(expected).mean() * T**2)
    changed = s.clone()
    changed[~context] = 100.0  # logits outside the context change nothing
    torch.testing.assert_close(span_kl(changed, t, context, temperature=T), span_kl(s, t, context, temperature=T))
    assert span_kl(t, t, context, temperature=T).abs() < 1e-6
    assert span_kl(s, t, torch.zeros(3, 6, dtype=torch.bool), temperature=T) == 0


def test_hard_label_ce_ignores_unlabeled_rows():
    torch.manual_seed(1)
    logits = torch.randn(4, 2)
    labels = torch.tensor([1, UNLABELED, 0, UNLABELED])
    torch.testing.assert_close(hard_label_ce(logits, labels), F.cross_entropy(logits[[0, 2]], labels[[0, 2]]))
    assert hard_label_ce(logits, torch.full((4,), UNLABELED)) == 0


def test_hidden_mse_counts_real_tokens_only():
    torch.manual_seed(2)
    s, t = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    expected = torch.cat([(s[0, :2] - t[0, :2]) ** 2, (s[1] - t[1]) ** 2]).mean()
    torch.testing.assert_close(hidden_mse(s, t, mask), expected)
    t_changed = t.clone()
    t_changed[0, 2:] += 100  # padding positions
    torch.testing.assert_close(hidden_mse(s, t_changed, mask), expected)


def _attention(batch, heads, length, seed):
    torch.manual_seed(seed)
    return F.softmax(torch.randn(batch, heads, length, length), -1)


def test_attention_losses_are_zero_for_equal_maps_and_ignore_padded_queries():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    a, b = _attention(2, 2, 4, 3), _attention(2, 2, 4, 4)
    for loss in (attention_kl, attention_mse):
        assert loss(a, a, mask).abs() < 1e-6
        base = loss(a, b, mask)
        assert base > 0
        a_changed, b_changed = a.clone(), b.clone()
        a_changed[0, :, 3, :] = torch.tensor([0.7, 0.1, 0.1, 0.1])  # the padded query row of example 0
        b_changed[0, :, 3, :] = 0.25
        torch.testing.assert_close(loss(a_changed, b_changed, mask), base)


def test_attention_kl_matches_the_row_definition_on_unpadded_maps():
    mask = torch.ones(1, 3, dtype=torch.long)
    a, b = _attention(1, 2, 3, 5), _attention(1, 2, 3, 6)
    expected = (b * (b.log() - a.log())).sum(-1).mean()
    torch.testing.assert_close(attention_kl(a, b, mask), expected)
    torch.testing.assert_close(attention_mse(a, b, mask), ((a - b) ** 2).mean())


def test_hidden_cosine_and_cls_mse_match_their_definitions():
    torch.manual_seed(7)
    s, t = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    cos = F.cosine_similarity(s, t, dim=-1)
    expected = torch.cat([1 - cos[0, :3], 1 - cos[1]]).mean()
    torch.testing.assert_close(hidden_cosine(s, t, mask), expected)
    assert hidden_cosine(t * 3, t, mask).abs() < 1e-6  # scale does not matter, direction does
    expected_cls = ((F.normalize(s[:, 0], dim=-1) - F.normalize(t[:, 0], dim=-1)) ** 2).sum(-1).mean()
    torch.testing.assert_close(cls_mse(s, t, mask), expected_cls)
    torch.testing.assert_close(logit_mse(s[:, 0], t[:, 0]), ((s[:, 0] - t[:, 0]) ** 2).mean())


def test_objective_weighs_each_term_and_follows_linear_schedules(tiny_teacher):
    from transformers import AutoModelForSequenceClassification

    from pipeline.config import LossTerm
    from pipeline.student.objective import Objective

    torch.manual_seed(0)
    student = AutoModelForSequenceClassification.from_pretrained(str(tiny_teacher)).eval()
    batch = {"input_ids": torch.tensor([[2, 10, 11, 3], [2, 12, 3, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
             "labels": torch.tensor([1, -1]), "teacher_logits": torch.randn(2, 2), "hidden_states/4": torch.randn(2, 4, 32)}  # fmt: skip
    terms = (LossTerm("kl", 1.0, weight_end=0.0, temperature=4.0, temperature_end=1.0), LossTerm("ce", 0.5),
             LossTerm("hidden_mse", 2.0))  # fmt: skip
    objective = Objective(student, terms, ((2, 4),), teacher_width=32)
    assert objective.wanted == [("hidden_states", 4)]
    with torch.no_grad():
        start, parts = objective(batch, progress=0.0)
        end, parts_end = objective(batch, progress=1.0)
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    kl4 = logit_kl(out.logits, batch["teacher_logits"], temperature=4.0)
    torch.testing.assert_close(parts["kl"], kl4)
    torch.testing.assert_close(parts_end["kl"], logit_kl(out.logits, batch["teacher_logits"], temperature=1.0))
    hidden = hidden_mse(
        out.hidden_states[2], batch["hidden_states/4"], batch["attention_mask"]
    )  # same width: no projection
    ce = hard_label_ce(out.logits, batch["labels"])
    torch.testing.assert_close(start, kl4 + 0.5 * ce + 2.0 * hidden)
    torch.testing.assert_close(end, 0.5 * ce + 2.0 * hidden)  # the kl weight went linearly to 0

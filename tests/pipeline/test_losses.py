"""Loss terms against hand computations, and padding never counts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.student.losses import attention_kl, attention_mse, cls_mse, hidden_cosine, hidden_mse, logit_kl, logit_mse
from pipeline.tasks import IGNORED, SEQUENCE_CLASSIFICATION, TASKS
from pipeline.tasks.question_answering import NO_ANSWER
from pipeline.tasks.sequence_classification import UNLABELED

NER, QA = TASKS["token-classification"], TASKS["question-answering"]


def test_logit_kl_is_zero_for_equal_logits_and_matches_the_definition():
    torch.manual_seed(0)
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    assert logit_kl(t, t, temperature=2.0).abs() < 1e-6
    T = 3.0
    p_t = F.softmax(t / T, -1)
    expected = (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum(-1).mean() * T**2
    torch.testing.assert_close(logit_kl(s, t, temperature=T), expected)


def task_kl(task, s, t, batch, temperature):
    return logit_kl(task.distributions(s, batch), task.distributions(t, batch), temperature=temperature)


def test_span_kl_compares_start_and_end_distributions_over_the_context_and_cls_only():
    torch.manual_seed(5)
    s, t = torch.randn(3, 6, 2), torch.randn(3, 6, 2)
    context = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    offsets = torch.where(context.unsqueeze(-1), torch.ones(3, 6, 2, dtype=torch.long), -1)
    batch = {"offsets": offsets, "label": torch.tensor([[2, 3], [0, 0], [NO_ANSWER, NO_ANSWER]])}
    allowed = context.clone()
    allowed[:, 0] = True  # [CLS]: where a window without the answer points
    T, expected = 2.0, []
    for row in range(3):
        for end in (0, 1):
            p_t = F.softmax(t[row, allowed[row], end] / T, -1)
            log_s = F.log_softmax(s[row, allowed[row], end] / T, -1)
            expected.append((p_t * (p_t.log() - log_s)).sum())
    torch.testing.assert_close(task_kl(QA, s, t, batch, T), torch.stack(expected).mean() * T**2)
    changed = s.clone()
    changed[~allowed] = 100.0  # logits outside the context change nothing
    torch.testing.assert_close(task_kl(QA, changed, t, batch, T), task_kl(QA, s, t, batch, T))
    assert task_kl(QA, t, t, batch, T).abs() < 1e-6
    # the hard loss: start and end cross-entropy over the same positions, transfer rows (NO_ANSWER) left out
    ce = [-F.log_softmax(s[row, allowed[row], end], -1)[int(allowed[row, : batch["label"][row, end]].sum())]
          for row in (0, 1) for end in (0, 1)]  # fmt: skip
    torch.testing.assert_close(QA.hard_loss(s, batch), torch.stack(ce).mean())


def test_token_kl_and_ce_count_real_tokens_and_first_sub_tokens():
    torch.manual_seed(6)
    s, t = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    labels = torch.tensor([[IGNORED, 2, IGNORED, 1], [IGNORED, 0, IGNORED, IGNORED]])
    batch = {"attention_mask": mask, "label": labels}
    T = 2.0
    real = mask.bool()
    torch.testing.assert_close(task_kl(NER, s, t, batch, T), logit_kl(s[real], t[real], temperature=T))
    padded = s.clone()
    padded[1, 2:] = 50.0  # padding changes nothing
    torch.testing.assert_close(task_kl(NER, padded, t, batch, T), task_kl(NER, s, t, batch, T))
    first = labels != IGNORED
    torch.testing.assert_close(NER.hard_loss(s, batch), F.cross_entropy(s[first], labels[first]))


def test_hard_label_ce_ignores_unlabeled_rows():
    torch.manual_seed(1)
    logits = torch.randn(4, 2)
    labels = torch.tensor([1, UNLABELED, 0, UNLABELED])
    ce = SEQUENCE_CLASSIFICATION.hard_loss(logits, {"label": labels})
    torch.testing.assert_close(ce, F.cross_entropy(logits[[0, 2]], labels[[0, 2]]))
    assert SEQUENCE_CLASSIFICATION.hard_loss(logits, {"label": torch.full((4,), UNLABELED)}) == 0


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
             "label": torch.tensor([1, -1]), "teacher_logits": torch.randn(2, 2), "hidden_states/4": torch.randn(2, 4, 32)}  # fmt: skip
    terms = (LossTerm("kl", 1.0, weight_end=0.0, temperature=4.0, temperature_end=1.0), LossTerm("ce", 0.5),
             LossTerm("hidden_mse", 2.0))  # fmt: skip
    objective = Objective(student, SEQUENCE_CLASSIFICATION, terms, ((2, 4),), teacher_width=32)
    assert objective.wanted == [(0, "hidden_states", 4)]
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
    ce = F.cross_entropy(out.logits[:1], batch["label"][:1])  # the unlabeled row (-1) left out
    torch.testing.assert_close(start, kl4 + 0.5 * ce + 2.0 * hidden)
    torch.testing.assert_close(end, 0.5 * ce + 2.0 * hidden)  # the kl weight went linearly to 0

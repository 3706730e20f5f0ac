"""Extractive question answering (SQuAD v1.1): features with a document stride, answers from
start and end logits, exact match and F1 of answer texts.

A context longer than ``max_length`` becomes several features, windows that overlap by
``doc_stride`` tokens; each keeps its question's index and the character span of each of
its context tokens, so a model's answer is cut from the context exactly as the teacher's
is: the best-scoring valid span (start and end among the ``n_best`` top logits, in the
context, at most ``max_answer_length`` tokens) over all of a question's features.

Answers are compared as the official SQuAD v1.1 evaluation script compares them: lower
case, punctuation and the articles a, an, the removed, whitespace collapsed; F1 over
the bag of remaining words; each prediction scored against the best of the question's
gold answers. Scores are fractions (the official script prints them times 100).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cache_store import STRING, ColumnSpec, ShardRows

from ..errors import DataError
from .base import FLOOR, IGNORED, LABEL, LOGITS, Problem, Task

NO_ANSWER = -1  # start and end of a question without a labeled answer: transfer text
OFFSETS, CONTEXT, ANSWERS = "offsets", "context", "answers"  # row columns beside the label and logits
SPAN_ENDS = ("start", "end")  # a QA model's two outputs per token, its "classes"
NO_ANSWERS = Problem("no answer")
MISPLACED = Problem("answer not at its answer_start in the context")

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_f1(prediction: str, gold: str) -> float:
    """F1 of the normalized words of a predicted and a gold answer."""
    predicted, true = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(predicted) & Counter(true)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(true)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Mapping[str, str], answers: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Exact match and F1 over the questions of ``answers`` (question id -> gold answer texts);
    a question without a prediction scores 0, as in the official script."""
    exact, f1 = 0.0, 0.0
    for qid, golds in answers.items():
        prediction = predictions.get(qid)
        if prediction is None:
            continue
        exact += max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds)
        f1 += max(answer_f1(prediction, g) for g in golds)
    n = max(len(answers), 1)
    return {"f1": f1 / n, "exact_match": exact / n}


@dataclass(frozen=True)
class Features:
    """The features of a list of questions, in order: a question's windows one after another."""

    input_ids: list[np.ndarray]  # (L_f,) int32: [CLS] question [SEP] context window [SEP]
    question: np.ndarray  # (F,) int64: the index of each feature's question
    offsets: list[np.ndarray]  # (L_f, 2) int64: each token's character span in the context; -1 outside it
    start: np.ndarray  # (F,) int64: the answer's first token; 0 ([CLS]) when this window does not hold it
    end: np.ndarray  # (F,) int64: its last token; NO_ANSWER (both) for a question without an answer


def features(tokenizer, questions: Sequence[str], contexts: Sequence[str], answers: Sequence[tuple[int, str] | None],
             *, max_length: int, doc_stride: int) -> Features:  # fmt: skip
    """Tokenize questions with their contexts into overlapping windows, with answer positions.

    Args:
        answers: per question its answer's (character start, text), or None (transfer text).

    Raises:
        DataError: a question so long that no context window fits beside it.
    """
    room = max_length - 3  # [CLS] question [SEP] context [SEP]
    question_ids = tokenizer(list(questions), add_special_tokens=False)["input_ids"]
    for i, ids in enumerate(question_ids):
        if room - len(ids) <= doc_stride:
            raise DataError(
                f"question {i} has {len(ids)} tokens: with max_length {max_length} and doc_stride {doc_stride} no "
                "context window fits beside it; raise max_length or lower doc_stride"
            )
    encoded = tokenizer(list(questions), list(contexts), truncation="only_second", max_length=max_length,
                        stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                        return_token_type_ids=False, return_attention_mask=False)  # fmt: skip
    ids, offsets, starts, ends = [], [], [], []
    question = np.asarray(encoded["overflow_to_sample_mapping"], dtype=np.int64)
    for f, q in enumerate(question):
        in_context = np.array([s == 1 for s in encoded.sequence_ids(f)])
        spans = np.asarray(encoded["offset_mapping"][f], dtype=np.int64).reshape(-1, 2)
        spans[~in_context] = -1
        ids.append(np.asarray(encoded["input_ids"][f], dtype=np.int32))
        offsets.append(spans)
        start, end = _answer_tokens(spans, in_context, answers[q])
        starts.append(start)
        ends.append(end)
    return Features(ids, question, offsets, np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64))


def _answer_tokens(spans: np.ndarray, in_context: np.ndarray, answer: tuple[int, str] | None) -> tuple[int, int]:
    if answer is None:
        return NO_ANSWER, NO_ANSWER
    char_start, text = answer
    char_end = char_start + len(text)
    context = np.flatnonzero(in_context)
    if spans[context[0], 0] > char_start or spans[context[-1], 1] < char_end:
        return 0, 0  # the answer is not (wholly) in this window
    start = context[spans[context, 0] <= char_start][-1]  # the last token starting at or before the answer
    end = context[spans[context, 1] >= char_end][0]  # the first token ending at or after it
    return int(start), int(end)


def best_answers(logits: Sequence[np.ndarray], offsets: Sequence[np.ndarray], question: np.ndarray,
                 contexts: Sequence[str], *, n_best: int = 20, max_answer_length: int = 30) -> list[str]:  # fmt: skip
    """Each question's answer text: the valid span with the highest start + end logit over its features
    ("" when no feature has a valid span).

    Args:
        logits: per feature its start and end logits (L_f, 2); offsets: per feature (L_f, 2), -1 outside
            the context; question: (F,) each feature's question; contexts: per question.
    """
    best: dict[int, tuple[float, str]] = {}
    for f, q in enumerate(question.tolist()):
        spans, start, end = offsets[f], logits[f][:, 0], logits[f][:, 1]
        context = spans[:, 0] >= 0
        top_start = [i for i in np.argsort(start)[::-1][:n_best] if context[i]]
        top_end = [i for i in np.argsort(end)[::-1][:n_best] if context[i]]
        for s in top_start:
            for e in top_end:
                if e < s or e - s + 1 > max_answer_length:
                    continue
                score = float(start[s] + end[e])
                if q not in best or score > best[q][0]:
                    best[q] = (score, contexts[q][spans[s, 0] : spans[e, 1]])
    return [best[q][1] if q in best else "" for q in range(len(contexts))]


class QuestionAnswering(Task):
    """Extractive QA: a feature per context window; the teacher's start and end logits per token.

    A cache row is one feature: its question's example id, the answer's first and last token
    (``label`` (2,): [CLS] when the window lacks it, NO_ANSWER for transfer text), each token's
    character span in the context (``offsets``), the context and the gold answer texts (so a
    colleague with only the cache scores answers as the teacher's were), and the teacher's
    logits ``("L", 2)``. The logit losses compare the start and the end distribution over the
    context's tokens and [CLS] (a window without the answer points at [CLS]).
    """

    name = "question-answering"
    primary_metric = "f1"
    metric_labels = {"f1": "F1", "exact_match": "exact match"}
    peft_task = "QUESTION_ANS"
    per_token = True
    batch_columns = {LABEL: NO_ANSWER, OFFSETS: -1}  # noqa: RUF012 (read only)

    def auto_model(self):
        from transformers import AutoModelForQuestionAnswering

        return AutoModelForQuestionAnswering

    def label_names(self, labels: list) -> tuple[str, ...]:
        return SPAN_ENDS

    def read_label(self, value, names: dict[str, int], texts: tuple[str, ...]):
        """Answers in SQuAD's layout (``{"text": [...], "answer_start": [...]}``) as (start, text) pairs."""
        if not isinstance(value, dict) or not value.get("text"):
            return NO_ANSWERS
        answers = tuple(
            (int(start), str(text)) for start, text in zip(value["answer_start"], value["text"], strict=False)
        )
        start, text = answers[0]
        if texts[1][start : start + len(text)] != text:
            return MISPLACED
        return answers

    def encode(self, tokenizer, data, cfg) -> ShardRows:
        questions, contexts = [t[0] for t in data.texts], [t[1] for t in data.texts]
        answers = [label if known else None for label, known in zip(data.labels, data.labeled, strict=True)]
        feats = features(tokenizer, questions, contexts, [a[0] if a else None for a in answers],
                         max_length=cfg.max_length, doc_stride=cfg.doc_stride)  # fmt: skip
        q = feats.question
        return ShardRows(data.example_id[q], feats.input_ids, {
            LABEL: np.stack([feats.start, feats.end], axis=1).astype(np.int32),
            OFFSETS: [o.astype(np.int32) for o in feats.offsets],
            CONTEXT: [contexts[i] for i in q],
            ANSWERS: [[text for _, text in answers[i]] if answers[i] else [] for i in q],
        })  # fmt: skip

    def columns(self, num_labels: int) -> tuple[ColumnSpec, ...]:
        return (ColumnSpec(LABEL, "int32", (2,)), ColumnSpec(OFFSETS, "int32", ("L", 2)), ColumnSpec(CONTEXT, STRING),
                ColumnSpec(ANSWERS, STRING, ("*",)), ColumnSpec(LOGITS, "float32", ("L", 2)))  # fmt: skip

    def labeled(self, rows: ShardRows) -> np.ndarray:
        return rows[LABEL][:, 0] != NO_ANSWER

    def outputs(self, model_output):
        import torch

        return torch.stack([model_output.start_logits, model_output.end_logits], dim=-1)

    def distributions(self, logits, batch):
        """The start and the end logits of each row over its context tokens and [CLS] (2B, T)."""
        allowed = batch[OFFSETS][..., 0] >= 0
        allowed[:, 0] = True  # [CLS]: where a window without the answer points
        rows = logits.masked_fill(~allowed.unsqueeze(-1), FLOOR)
        return rows.transpose(1, 2).reshape(-1, logits.shape[1])

    def hard_targets(self, batch):
        targets = batch[LABEL].reshape(-1).long()
        return targets.masked_fill(targets == NO_ANSWER, IGNORED)

    def metrics(self, outputs: list[np.ndarray], rows: ShardRows, label_names=()) -> dict[str, float]:
        """SQuAD F1 and exact match of each question's best answer over its features against its gold answers."""
        _, first, question = np.unique(rows.example_id, return_index=True, return_inverse=True)
        contexts = [rows[CONTEXT][f] for f in first]
        predicted = best_answers(outputs, rows[OFFSETS], question.reshape(-1), contexts)
        gold = {q: rows[ANSWERS][f] for q, f in enumerate(first) if rows[ANSWERS][f]}
        return squad_scores(dict(enumerate(predicted)), gold)

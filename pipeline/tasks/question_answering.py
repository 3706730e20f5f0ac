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

from ..errors import DataError

NO_ANSWER = -1  # start and end of a question without a labeled answer: transfer text

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


def best_answers(start_logits: Sequence[np.ndarray], end_logits: Sequence[np.ndarray], feats: Features,
                 contexts: Sequence[str], *, n_best: int = 20, max_answer_length: int = 30) -> list[str]:  # fmt: skip
    """Each question's answer text: the valid span with the highest start + end logit over its features
    ("" when no feature has a valid span)."""
    best: dict[int, tuple[float, str]] = {}
    for f, q in enumerate(feats.question.tolist()):
        spans, start, end = feats.offsets[f], start_logits[f], end_logits[f]
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

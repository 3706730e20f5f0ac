"""Extractive question answering (SQuAD v1.1): exact match and F1 of answer texts.

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

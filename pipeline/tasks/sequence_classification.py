"""Sequence classification: one label per text (or sentence pair), one logit vector per example."""

from __future__ import annotations

import numpy as np

from cache_store.manifest import ColumnSpec

from .base import LABEL, LOGITS, Task


class SequenceClassification(Task):
    name = "sequence-classification"
    primary_metric = "accuracy"
    metric_labels = {"accuracy": "accuracy", "macro_f1": "macro-F1"}
    peft_task = "SEQ_CLS"

    def auto_model(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def columns(self, num_labels: int) -> tuple[ColumnSpec, ...]:
        """The class id (UNLABELED for transfer text) and the teacher's class logits."""
        return ColumnSpec(LABEL, "int32"), ColumnSpec(LOGITS, "float32", (num_labels,))

    def metrics(self, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Accuracy and macro-F1 of argmax predictions (logits (N, C)) against integer labels (N,)."""
        predictions = logits.argmax(-1)
        f1s = []
        for c in range(logits.shape[-1]):
            tp = np.sum((predictions == c) & (labels == c))
            predicted, actual = np.sum(predictions == c), np.sum(labels == c)
            f1s.append(0.0 if predicted + actual == 0 else 2 * tp / (predicted + actual))
        return {"accuracy": float(np.mean(predictions == labels)), "macro_f1": float(np.mean(f1s))}

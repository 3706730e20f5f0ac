"""Sequence classification: one label per text (or sentence pair), one logit vector per example."""

from __future__ import annotations

import numpy as np

from cache_store import ColumnSpec, ShardRows

from .base import IGNORED, LABEL, LOGITS, Problem, Task

UNLABELED = -1  # the stored label of a row without one: the teacher's logits teach it
UNKNOWN_LABEL = Problem("label not in label_names")


class SequenceClassification(Task):
    name = "sequence-classification"
    primary_metric = "accuracy"
    metric_labels = {"accuracy": "accuracy", "macro_f1": "macro-F1"}
    peft_task = "SEQ_CLS"

    def auto_model(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def read_label(self, value, names: dict[str, int], texts: tuple[str, ...]):
        return names[value] if value in names else UNKNOWN_LABEL

    def encode(self, tokenizer, data, cfg) -> ShardRows:
        """Token ids of each row's one or two texts, truncated to ``max_length``, and its class id."""
        columns = list(zip(*data.texts, strict=True)) if data.texts else [[]]
        encoded = tokenizer(*[list(c) for c in columns], truncation=True, max_length=cfg.max_length,
                            return_attention_mask=False, return_token_type_ids=False)  # fmt: skip
        ids = [np.asarray(x, dtype=np.int32) for x in encoded["input_ids"]]
        labels = np.array([label if known else UNLABELED for label, known in zip(data.labels, data.labeled, strict=True)],
                          dtype=np.int32)  # fmt: skip
        return ShardRows(data.example_id, ids, {LABEL: labels})

    def columns(self, num_labels: int) -> tuple[ColumnSpec, ...]:
        """The class id (UNLABELED for transfer text) and the teacher's class logits."""
        return ColumnSpec(LABEL, "int32"), ColumnSpec(LOGITS, "float32", (num_labels,))

    def labeled(self, rows: ShardRows) -> np.ndarray:
        return rows[LABEL] != UNLABELED

    def class_outcomes(self, rows: ShardRows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each row's logits and class (UNLABELED, -1, for transfer text)."""
        return np.asarray(rows[LOGITS]), np.asarray(rows[LABEL], np.int64), np.arange(len(rows))

    def hard_targets(self, batch):
        labels = batch[LABEL]
        return labels.masked_fill(labels == UNLABELED, IGNORED)

    def metrics(self, outputs: np.ndarray, rows: ShardRows, label_names=()) -> dict[str, float]:
        """Accuracy and macro-F1 of argmax predictions (logits (N, C)) against the rows' class ids."""
        predictions, labels = outputs.argmax(-1), rows[LABEL]
        f1s = []
        for c in range(outputs.shape[-1]):
            tp = np.sum((predictions == c) & (labels == c))
            predicted, actual = np.sum(predictions == c), np.sum(labels == c)
            f1s.append(0.0 if predicted + actual == 0 else 2 * tp / (predicted + actual))
        return {"accuracy": float(np.mean(predictions == labels)), "macro_f1": float(np.mean(f1s))}

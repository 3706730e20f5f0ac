"""The interface every task implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

    from cache_store import ColumnSpec, ShardRows

    from ..config import DataConfig
    from ..data import TextData

LABEL, LOGITS = "label", "logits"  # the row columns every task stores: the example's label(s), the teacher's logits
IGNORED = -100  # a hard target that no loss reads (an unlabeled row, a word's later sub-tokens)
Outputs = np.ndarray | list[np.ndarray]  # a model's outputs over rows: (N, C), or N arrays (L_i, C) per token


class Task(ABC):
    """One task shape: how its data is read and encoded into cache rows, its model class, its
    logit losses, its metrics and which one ranks models.

    Attributes:
        name: as configs and manifests spell it (``sequence-classification``).
        primary_metric: the metric that picks a model's best epoch and that reports rank by.
        metric_labels: every metric ``metrics`` returns, the primary one first, with its column label.
        peft_task: peft's ``TaskType`` name for LoRA students.
        lower_is_better: the primary metric ranks lower values first (perplexity).
        per_token: whether the model's outputs are per token (B, T, C) rather than per example (B, C).
        reads_labels: whether rows have a label column (a causal LM's targets are its own text).
        outputs_column: the row column holding the teacher's ``batch_outputs`` (what its metrics are computed from).
        caches_distributions: the teacher's distribution at every position is stored with the tensors
            (a causal LM's next-token distributions, ``capture.logits``), not in a row column.
        throughput: what the report counts per second: examples, or tokens.
        batch_columns: the row columns (beside the token ids and the teacher's logits) a training
            batch carries, each with the value that pads it where it is per token.
    """

    name: str
    primary_metric: str
    metric_labels: dict[str, str]
    peft_task: str
    lower_is_better: bool = False
    per_token: bool = False
    reads_labels: bool = True
    outputs_column: str = LOGITS
    caches_distributions: bool = False
    throughput: str = "examples"
    batch_columns: dict[str, int] = {LABEL: IGNORED}  # noqa: RUF012 (read only)

    def score(self, metrics: dict[str, float]) -> float:
        """The primary metric as a score where higher is better (best epochs, rankings)."""
        value = metrics[self.primary_metric]
        return -value if self.lower_is_better else value

    # --- data ---------------------------------------------------------------------------------

    def row_texts(self, values: Sequence) -> tuple[str, ...] | None:
        """A row's texts from its text columns' values, or None when it has none to learn from."""
        texts = tuple("" if v is None else str(v) for v in values)
        return None if any(not t.strip() for t in texts) else texts

    def label_names(self, labels: list) -> tuple[str, ...]:
        """The class names of a data set whose definition gives none, from its labels (as text)."""
        return tuple(sorted({str(v) for v in labels if v is not None}))

    def check_label_names(self, names: Sequence[str]) -> None:
        """Raise DataError when ``names`` cannot be this task's classes (any names can be classes here)."""
        return None

    @abstractmethod
    def read_label(self, value, names: dict[str, int], texts: tuple[str, ...]):
        """A row's label from its label column's value (class names as text), or a ``Problem``
        saying why the row cannot be used."""

    @abstractmethod
    def encode(self, tokenizer, data: TextData, cfg: DataConfig) -> ShardRows:
        """The cache rows of ``data`` (all columns but the teacher's logits); rows without a label
        (``data.labeled`` False) get none, so only the teacher's outputs teach them."""

    @abstractmethod
    def columns(self, num_labels: int) -> tuple[ColumnSpec, ...]:
        """What a teacher cache of this task stores per row beside its token ids (labels, the teacher's outputs)."""

    @abstractmethod
    def labeled(self, rows: ShardRows) -> np.ndarray:
        """(N,) bool: the rows whose labels the hard-label loss reads."""

    # --- models -------------------------------------------------------------------------------

    @abstractmethod
    def auto_model(self):
        """The transformers auto class of this task's models."""

    def load_model(self, directory: Path, *, num_labels: int | None = None, attention_maps: bool = False) -> nn.Module:
        """A model of this task from a checkpoint; eager attention only when attention maps are wanted
        (sdpa returns none). ``num_labels`` gives a checkpoint without this head, or with one of another
        size (another task's), a new one of that size."""
        extra = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if num_labels is not None else {}
        attn = "eager" if attention_maps else "sdpa"
        return self.auto_model().from_pretrained(str(directory), attn_implementation=attn, **extra)

    def model_from_config(self, config) -> nn.Module:
        """A randomly initialized model of this task from a transformers config."""
        return self.auto_model().from_config(config, attn_implementation="sdpa")

    def outputs(self, model_output) -> torch.Tensor:
        """The logits a model of this task returns: (B, C), or (B, T, C) per token."""
        return model_output.logits

    @property
    def outputs_per_token(self) -> bool:
        """Whether what ``metrics`` reads of a row is per token (L_i, C) rather than one value per row."""
        return self.per_token

    def batch_outputs(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], real: torch.Tensor) -> torch.Tensor:
        """What ``metrics`` reads of a batch's rows, reduced on the device: logits (B, C), or with
        ``outputs_per_token`` (tokens, C) at the real positions ``real`` (flat B*T indices), row after row."""
        return logits.float().flatten(0, 1).index_select(0, real) if self.per_token else logits.float()

    # --- losses -------------------------------------------------------------------------------

    def distributions(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The rows of logits whose softmax distributions the logit losses compare, (N, K); a position
        that is no outcome is filled with a floor, so it gets no probability."""
        return logits

    def hard_targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N,) the class each row of ``distributions`` should put first; IGNORED where there is none."""
        return batch[LABEL]

    def hard_loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of ``distributions`` against ``hard_targets``, over the rows that have one; 0 when none do."""
        import torch.nn.functional as F

        targets = self.hard_targets(batch)
        rows = self.distributions(logits, batch)
        if not (targets != IGNORED).any():
            return rows.sum() * 0.0
        return F.cross_entropy(rows, targets, ignore_index=IGNORED)

    def class_outcomes(self, rows: ShardRows) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The teacher's class logits at every outcome the task labels, each outcome's class and its row,
        for inspection: (n, C) float, (n,) int (-1 where the outcome has no label) and (n,) int. None
        for a task whose outcomes are not classes (answer spans, next tokens)."""
        return None

    # --- metrics ------------------------------------------------------------------------------

    @abstractmethod
    def metrics(self, outputs: Outputs, rows: ShardRows, label_names: Sequence[str]) -> dict[str, float]:
        """Every metric in ``metric_labels`` of a model's outputs over ``rows`` against their labels."""


class Problem(str):
    """Why a row cannot be used (``Task.read_label``): counted per reason, and the row dropped."""


FLOOR = (
    -1e4
)  # the logit of a position that is no outcome: softmax gives it 0 beside real logits, and no NaN as -inf would


def padded(values: list[np.ndarray], length: int, fill) -> np.ndarray:
    """Per-token arrays (L_i, ...) as one (B, length, ...) array, ``fill`` after each row's end."""
    first = np.asarray(values[0])
    out = np.full((len(values), length, *first.shape[1:]), fill, dtype=first.dtype)
    for i, v in enumerate(values):
        out[i, : len(v)] = v
    return out

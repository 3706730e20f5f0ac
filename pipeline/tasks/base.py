"""The interface every task implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import nn

    from cache_store import ColumnSpec

LABEL, LOGITS = "label", "logits"  # the row columns every task stores: the example's label(s), the teacher's logits


class Task(ABC):
    """One task shape: its model class, what a cache of it stores per example, its metrics and which ranks models.

    Attributes:
        name: as configs and manifests spell it (``sequence-classification``).
        primary_metric: the metric that picks a model's best epoch and that reports rank by.
        metric_labels: every metric ``metrics`` returns, the primary one first, with its column label.
        peft_task: peft's ``TaskType`` name for LoRA students.
    """

    name: str
    primary_metric: str
    metric_labels: dict[str, str]
    peft_task: str

    @abstractmethod
    def auto_model(self):
        """The transformers auto class of this task's models."""

    def load_model(self, directory: Path, *, num_labels: int | None = None, attention_maps: bool = False) -> nn.Module:
        """A model of this task from a checkpoint; eager attention only when attention maps are wanted
        (sdpa returns none). ``num_labels`` gives a checkpoint without this head a new one of that size."""
        extra = {"num_labels": num_labels} if num_labels is not None else {}
        attn = "eager" if attention_maps else "sdpa"
        return self.auto_model().from_pretrained(str(directory), attn_implementation=attn, **extra)

    def model_from_config(self, config) -> nn.Module:
        """A randomly initialized model of this task from a transformers config."""
        return self.auto_model().from_config(config, attn_implementation="sdpa")

    @abstractmethod
    def columns(self, num_labels: int) -> tuple[ColumnSpec, ...]:
        """What a teacher cache of this task stores per example beside its token ids (labels, the teacher's outputs)."""

    @abstractmethod
    def metrics(self, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Every metric in ``metric_labels`` of a model's outputs against the labels."""

"""Tasks: what a teacher emits per example, the student's head, the metric.

Each task is one module defining a ``Task``; the stages ask it for the model class to
load or build, the columns a cache of it stores per example, and the metrics of a
model's outputs against the labels. A cache records the task it was captured for
(``CacheMetadata.task``), and distill refuses a student config of another task.

Nothing heavy is imported here: the config names tasks without loading torch or transformers.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import IGNORED, LABEL, LOGITS, Problem, Task
from .causal_lm import CausalLM
from .question_answering import QuestionAnswering
from .sequence_classification import SequenceClassification
from .token_classification import TokenClassification

SEQUENCE_CLASSIFICATION = SequenceClassification()
TASKS: dict[str, Task] = {task.name: task for task in (SEQUENCE_CLASSIFICATION, TokenClassification(),
                                                       QuestionAnswering(), CausalLM())}  # fmt: skip
DEFAULT_TASK = SEQUENCE_CLASSIFICATION.name  # the teacher stage's task when the config names none


def task_named(name: str) -> Task:
    """The task called ``name``.

    Raises:
        ConfigError: no such task.
    """
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name]


__all__ = ["DEFAULT_TASK", "IGNORED", "LABEL", "LOGITS", "SEQUENCE_CLASSIFICATION", "TASKS", "Problem", "Task",
           "task_named"]  # fmt: skip

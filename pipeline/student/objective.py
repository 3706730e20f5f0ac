"""A student's distillation objective: weighted loss terms over a layer mapping, with schedules."""

from __future__ import annotations

import torch
from torch import nn

from cache_store.distribution import SparseSpec

from ..config import DEFAULT_TEMPERATURE, Fusion, LossTerm, StudentConfig
from ..contract import ATTENTION, HIDDEN, TEACHER_LOGITS, distribution_key, teacher_key, tensor_key
from ..errors import ConfigError
from ..tasks import Task
from ..tasks.next_token import scored
from .fusion import fused_log_probs
from .losses import (
    ATTENTION_TERMS,
    DIVERGENCES,
    FLOOR_LOGP,
    HIDDEN_TERMS,
    divergence,
    logit_divergence,
    logit_mse,
    sampled_kl,
    topk_divergence,
)

BASELINE_LOSS = (LossTerm("ce", 1.0),)  # the no-KD baseline: hard labels only
MEAN = Fusion()


def layer_pairs(spec: StudentConfig, student_depth: int, teacher_depth: int) -> tuple[tuple[int, int], ...]:
    """(student layer, teacher layer) pairs for the intermediate losses, layers numbered 1..depth.

    ``layer_map`` gives them explicitly (0 maps the embeddings); otherwise ``mapping``:
    ``uniform`` maps student layer i to teacher layer round(i * teacher_depth / student_depth)
    (TinyBERT), ``last`` to the teacher's last ``student_depth`` layers, and ``auto`` uses
    the layers a student was cut from, else ``uniform``.
    """
    if spec.layer_map is not None:
        return spec.layer_map
    if spec.mapping == "auto" and spec.teacher_layers is not None:
        return tuple((i + 1, t) for i, t in enumerate(spec.teacher_layers))
    if student_depth > teacher_depth:
        raise ConfigError(
            f"student {spec.name!r}: {student_depth} layers cannot map onto {teacher_depth} teacher layers"
        )
    if spec.mapping == "last":
        return tuple((i, teacher_depth - student_depth + i) for i in range(1, student_depth + 1))
    return tuple((i, round(i * teacher_depth / student_depth)) for i in range(1, student_depth + 1))


def scheduled(start: float, end: float | None, progress: float) -> float:
    """A constant (``end`` None) or a linear schedule from ``start`` to ``end`` over progress 0..1."""
    return start if end is None else start + (end - start) * progress


class Objective(nn.Module):
    """The weighted sum of a student's loss terms; owns the learned projections of hidden states.

    Logit terms compare the student's logits with the teacher's (``kl``, ``logit_mse``) or
    the labels (``ce``, labeled rows only), over the distributions the task defines: each
    example's classes, each real token's classes (NER), or the answer's start and end over
    the context (QA). Hidden-state terms compare, for each mapped
    pair, the student's layer projected to the teacher's width (a learned linear map, or
    identity when widths agree) with the teacher's layer. Attention terms compare the
    mapped layers' attention maps. Each family's term is averaged over the mapped pairs.

    Args:
        task: the cache's task: the student's outputs, the distributions and hard targets of the logit terms.
        terms: the loss terms and their (scheduled) weights.
        pairs: (student layer, teacher layer) for the hidden and attention terms.
        inputs: the batch keys the student is called with (its kind's inputs: segment ids or not).
        attention_heads: the teacher heads the cached maps hold when they are a subset; the
            student's maps of the same heads are compared with them (None: all heads).
        sparse: a causal LM cache's distributions (top-k, sampled or dense): the divergence terms
            compare them with the student's next-token distributions at the cache's temperature.
        teachers: the positions of the teachers whose logits the logit terms learn from, fused by
            ``fusion`` (``fusion.fused_log_probs``) when there are several.
        feature_teacher: the position of the teacher whose hidden states and attention maps the
            feature terms compare (``pairs`` and ``teacher_width`` are its).
    """

    def __init__(self, student: nn.Module, task: Task, terms: tuple[LossTerm, ...], pairs: tuple[tuple[int, int], ...],
                 *, teacher_width: int, inputs: tuple[str, ...] = ("input_ids", "attention_mask"),
                 attention_heads: tuple[int, ...] | None = None, sparse: SparseSpec | None = None,
                 teachers: tuple[int, ...] = (0,), fusion: Fusion = MEAN,
                 feature_teacher: int = 0):  # fmt: skip
        super().__init__()
        self.student, self.task, self.terms, self.inputs, self.sparse = student, task, terms, inputs, sparse
        self.teachers, self.fusion, self.feature_teacher = teachers, fusion, feature_teacher
        self.attention_heads = list(attention_heads) if attention_heads is not None else None
        kinds = {t.kind for t in terms}
        self.hidden_pairs = pairs if kinds & set(HIDDEN_TERMS) else ()
        self.attention_pairs = pairs if kinds & set(ATTENTION_TERMS) else ()
        width = student.config.hidden_size
        self.projections = nn.ModuleDict(
            {
                str(s): nn.Linear(width, teacher_width) if width != teacher_width else nn.Identity()
                for s, _ in self.hidden_pairs
            }
        )

    @property
    def wanted(self) -> list[tuple[int, str, int]]:
        """The cached teacher tensors this objective reads: (teacher, tensor, layer)."""
        k = self.feature_teacher
        hidden = [(k, HIDDEN, t) for t in sorted({t for _, t in self.hidden_pairs})]
        return hidden + [(k, ATTENTION, t) for t in sorted({t for _, t in self.attention_pairs})]

    def teacher_distributions(self, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
        """The teacher logits (N, C) the logit terms compare with: the one teacher's ``Task.distributions``,
        or several teachers' fused at ``temperature`` (as logits whose softmax at it is the fused distribution)."""
        rows = [self.task.distributions(batch[teacher_key(TEACHER_LOGITS, k)], batch) for k in self.teachers]
        if len(rows) == 1:
            return rows[0]
        weights = self.fusion.weights and tuple(self.fusion.weights[k] for k in self.teachers)
        fused = fused_log_probs(rows, self.task.hard_targets(batch), self.fusion.rule, temperature=temperature,
                                weights=weights)  # fmt: skip
        return temperature * fused

    def forward(
        self, batch: dict[str, torch.Tensor], progress: float = 0.0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total loss and each term's unweighted value, ``progress`` (0..1) through training."""
        progress = min(max(progress, 0.0), 1.0)
        mask = batch["attention_mask"]  # (B, T)
        out = self.student(
            **{k: batch[k] for k in self.inputs},
            output_hidden_states=bool(self.hidden_pairs),
            output_attentions=bool(self.attention_pairs),
        )
        logits = self.task.outputs(out)
        total, parts = 0.0, {}
        for term in self.terms:
            if self.sparse is not None and term.kind in DIVERGENCES:
                value = distribution_divergence(logits, batch, self.sparse, kind=term.kind,
                                                renormalize=term.tail == "renormalize")  # fmt: skip
            elif term.kind in (*DIVERGENCES, "logit_mse"):
                student = self.task.distributions(logits, batch)
                temperature = scheduled(term.temperature or DEFAULT_TEMPERATURE, term.temperature_end, progress)
                teacher = self.teacher_distributions(batch, temperature)
                value = (
                    logit_mse(student, teacher)
                    if term.kind == "logit_mse"
                    else logit_divergence(student, teacher, temperature=temperature, kind=term.kind)
                )
            elif term.kind == "ce":
                value = self.task.hard_loss(logits, batch)
            elif term.kind in HIDDEN_TERMS:
                value = sum(
                    HIDDEN_TERMS[term.kind](
                        self.projections[str(s)](out.hidden_states[s]),
                        batch[tensor_key(HIDDEN, t, self.feature_teacher)].float(),  # float16 as the cache stores it
                        mask,
                    )
                    for s, t in self.hidden_pairs
                ) / len(self.hidden_pairs)
            else:
                value = sum(
                    ATTENTION_TERMS[term.kind](
                        self._student_maps(out.attentions[s - 1]),
                        batch[tensor_key(ATTENTION, t, self.feature_teacher)].float(),  # float16 as the cache stores it
                        mask,
                    )
                    for s, t in self.attention_pairs
                ) / len(self.attention_pairs)
            parts[term.kind] = value.detach()
            total = total + scheduled(term.weight, term.weight_end, progress) * value
        return total, parts

    def _student_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """The student's attention maps (B, heads, T, T) of the heads the cache holds for the teacher."""
        return maps if self.attention_heads is None else maps[:, self.attention_heads]


def distribution_divergence(logits: torch.Tensor, batch: dict[str, torch.Tensor], spec: SparseSpec, *, kind: str = "kl",
                            renormalize: bool = False) -> torch.Tensor:  # fmt: skip
    """A divergence between a causal LM cache's distributions in ``batch`` and the student's next-token
    distributions (``logits`` (B, T, V)) over every position the cache stores one for, at the cache's
    temperature: every real position, or those from each row's ``spec.start_column`` (a prompt's answer)."""
    keep = scored(batch["attention_mask"], batch[spec.start_column] if spec.start_column else None)  # (B, T)
    if spec.scheme == "sampled":  # over every position, then averaged over the kept ones: no (N, V) copy
        return sampled_kl(logits, batch[distribution_key("ids")], batch[distribution_key("counts")], draws=spec.draws,
                          temperature=spec.temperature, mask=keep)  # fmt: skip
    student = logits[keep]  # (N, V)
    teacher = {name: batch[distribution_key(name)][keep] for name in spec.arrays if name != "entries"}
    if spec.scheme == "topk":
        return topk_divergence(student, teacher["ids"], teacher["probs"], teacher["tail"], temperature=spec.temperature,
                               kind=kind, renormalize=renormalize)  # fmt: skip
    log_q = torch.log_softmax(student.float() / spec.temperature, dim=-1)
    return divergence(teacher["logprobs"].clamp_min(FLOOR_LOGP), log_q, kind).mean() * spec.temperature**2

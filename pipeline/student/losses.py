"""Distillation loss terms. Each takes (student, teacher[, mask]) tensors and returns a scalar.

The registries at the bottom name every term a config can ask for (``LossTerm.kind``),
grouped by what they compare: logits, hidden states, attention maps. Which logits form a
distribution, and the hard-label cross-entropy, are the task's (``pipeline.tasks``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logit_kl(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """KL(teacher/T || student/T) * T^2, averaged over the batch (Hinton et al.).

    Args:
        student, teacher: logits (N, C): N distributions (examples, tokens, or answer starts and ends).
    """
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * temperature**2


def logit_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between raw logits (N, C), averaged over rows and classes."""
    return F.mse_loss(student, teacher)


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over real tokens only.

    Args:
        student: projected student hidden states (B, T, H); teacher: (B, T, H); mask: (B, T), 1 = real token.
    """
    mask = mask.unsqueeze(-1).to(student.dtype)  # (B, T, 1)
    return ((student - teacher) ** 2 * mask).sum() / (mask.sum() * student.shape[-1])


def hidden_cosine(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of each real token's hidden vectors, averaged (DistilBERT's cosine loss).

    Args:
        student: projected student hidden states (B, T, H); teacher: (B, T, H); mask: (B, T), 1 = real token.
    """
    cosine = F.cosine_similarity(student, teacher, dim=-1)  # (B, T)
    mask = mask.to(cosine.dtype)
    return ((1 - cosine) * mask).sum() / mask.sum()


def cls_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared distance between the L2-normalized first-token ([CLS]) vectors, averaged over the batch (BERT-PKD).

    Args:
        student: projected student hidden states (B, T, H); teacher: (B, T, H); mask unused (the first token is real).
    """
    s, t = F.normalize(student[:, 0], dim=-1), F.normalize(teacher[:, 0], dim=-1)  # (B, H)
    return ((s - t) ** 2).sum(-1).mean()


def attention_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of each real query row's attention distribution, averaged over rows and heads.

    Args:
        student, teacher: attention probabilities (B, heads, T, T); mask: (B, T), 1 = real token.
    """
    student, teacher = _match_heads(student, teacher)
    log_s = torch.log(student.clamp_min(1e-12))
    log_t = torch.log(teacher.clamp_min(1e-12))
    row_kl = (teacher * (log_t - log_s)).sum(-1)  # (B, heads, T)
    rows = mask.unsqueeze(1).to(row_kl.dtype)  # (B, 1, T)
    return (row_kl * rows).sum() / (rows.sum() * row_kl.shape[1])


def attention_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE between attention probabilities over real (query, key) pairs (TinyBERT).

    Args:
        student, teacher: (B, heads, T, T); mask: (B, T), 1 = real token.
    """
    student, teacher = _match_heads(student, teacher)
    pairs = (mask.unsqueeze(-1) * mask.unsqueeze(-2)).unsqueeze(1).to(student.dtype)  # (B, 1, T, T)
    return ((student - teacher) ** 2 * pairs).sum() / (pairs.sum() * student.shape[1])


def _match_heads(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compare head-averaged maps when the head counts differ."""
    if student.shape[1] != teacher.shape[1]:
        return student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    return student, teacher


LOGIT_TERMS = ("kl", "logit_mse", "ce")  # computed from the logits, in Objective
HIDDEN_TERMS = {"hidden_mse": hidden_mse, "hidden_cosine": hidden_cosine, "cls_mse": cls_mse}
ATTENTION_TERMS = {"attention_mse": attention_mse, "attention_kl": attention_kl}

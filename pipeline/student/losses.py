"""Distillation loss terms. Each takes (student, teacher[, mask]) tensors and returns a scalar.

The registries at the bottom name every term a config can ask for (``LossTerm.kind``),
grouped by what they compare: logits, hidden states, attention maps. Which logits form a
distribution, and the hard-label cross-entropy, are the task's (``pipeline.tasks``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def logit_kl(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """KL(teacher/T || student/T) * T^2, averaged over the batch (Hinton et al.).

    Args:
        student, teacher: logits (N, C): N distributions (examples, tokens, or answer starts and ends).
    """
    return logit_divergence(student, teacher, temperature=temperature, kind="kl")


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-row divergence of distributions over the last axis, teacher ``p`` and student ``q`` given as
    finite log-probabilities (a floor such as ``FLOOR_LOGP`` where a probability is 0): ``kl`` KL(p || q),
    ``reverse_kl`` KL(q || p), ``jsd`` the Jensen-Shannon divergence (KL(p || m) + KL(q || m)) / 2, m = (p + q) / 2."""
    p, q = log_p.exp(), log_q.exp()
    if kind == "kl":
        return (p * (log_p - log_q)).sum(-1)
    if kind == "reverse_kl":
        return (q * (log_q - log_p)).sum(-1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2)
    return 0.5 * ((p * (log_p - log_m)).sum(-1) + (q * (log_q - log_m)).sum(-1))


def logit_divergence(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float, kind: str) -> torch.Tensor:
    """``divergence`` of the tempered softmax distributions of logits (N, C), averaged over rows, times T^2
    (``kind`` kl is ``logit_kl``)."""
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    log_q = F.log_softmax(student / temperature, dim=-1)
    return divergence(log_p, log_q, kind).mean() * temperature**2


def topk_divergence(student: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, tail: torch.Tensor, *,
                    temperature: float, kind: str, renormalize: bool) -> torch.Tensor:  # fmt: skip
    """A divergence between a top-k teacher distribution and the student's, averaged over N positions, times T^2.

    The student's distribution is softmax(logits / T) over its whole vocabulary. By default
    both are compared over k + 1 outcomes: the teacher's k ids, and every other id as one
    (the teacher's ``tail`` mass; the student's mass outside the k ids). With ``renormalize``,
    both are renormalized over the k ids alone.

    Args:
        student: logits (N, V); ids: (N, k) the teacher's ids; probs: (N, k) their probabilities;
            tail: (N,) the teacher's mass outside them.
    """
    log_s = F.log_softmax(student.float() / temperature, dim=-1)  # (N, V)
    log_q = log_s.gather(-1, ids)  # (N, k)
    log_p = _floored_log(probs)  # (N, k)
    if renormalize:
        log_p = log_p - torch.logsumexp(log_p, -1, keepdim=True)
        log_q = log_q - torch.logsumexp(log_q, -1, keepdim=True)
    else:
        log_q_tail = torch.log1p(-log_q.exp().sum(-1).clamp(max=1 - 1e-6))  # (N,) the student's other ids
        log_p = torch.cat([log_p, _floored_log(tail).unsqueeze(-1)], dim=-1)  # (N, k + 1)
        log_q = torch.cat([log_q, log_q_tail.unsqueeze(-1)], dim=-1)
    return divergence(log_p, log_q, kind).mean() * temperature**2


def sampled_kl(student: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, *, draws: int, temperature: float,
               mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """KL(p_hat || student) averaged over positions, times T^2, where p_hat = counts / draws estimates the
    teacher's distribution from draws with replacement (Anshumann et al., 2025): its gradient with respect
    to the student's logits, softmax(logits / T) - p_hat (over T), is an unbiased estimate of full KD's.

    Computed as sum_j p_j log p_j - sum_j p_j z_j + logsumexp(z), z = logits / T (the p_j sum to 1), so no
    log-softmax over the vocabulary is materialized and the logits need no gathering first.

    Args:
        student: logits (..., V); ids: (..., M) distinct drawn ids (any id where counts is 0); counts: (..., M);
            mask: (...) bool, the positions averaged over (None: all).
    """
    z = student.float() if temperature == 1 else student.float() / temperature
    p_hat = counts.float() / draws  # (..., M)
    kl = (p_hat * (_floored_log(p_hat) - z.gather(-1, ids))).sum(-1) + torch.logsumexp(z, -1)  # (...)
    return (kl if mask is None else kl[mask]).mean() * temperature**2


FLOOR_LOGP = math.log(1e-12)  # the log-probability a stored probability of 0 is compared as (no -inf, no NaN)


def _floored_log(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p.float().clamp_min(1e-12))


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


DIVERGENCES = ("kl", "reverse_kl", "jsd")  # between the teacher's and the student's distributions
LOGIT_TERMS = (*DIVERGENCES, "logit_mse", "ce")  # computed from the logits, in Objective
HIDDEN_TERMS = {"hidden_mse": hidden_mse, "hidden_cosine": hidden_cosine, "cls_mse": cls_mse}
ATTENTION_TERMS = {"attention_mse": attention_mse, "attention_kl": attention_kl}

"""Model fusion: one target distribution from several teachers' logits over the same outcomes."""

from __future__ import annotations

import torch

from ..tasks.base import IGNORED


def fused_log_probs(teachers: list[torch.Tensor], targets: torch.Tensor, rule: str, *, temperature: float,
                    weights: tuple[float, ...] | None = None) -> torch.Tensor:  # fmt: skip
    """log(sum_k w_k softmax(z_k / T)): the teachers' tempered class distributions mixed by ``rule`` (``Fusion``).

    ``mean`` weighs every teacher alike, ``weighted`` by ``weights`` (normalized), ``confidence`` each
    outcome's teachers by their top probability (at temperature 1), and ``best`` gives each outcome to one
    teacher: the most confident of those whose top class is the outcome's label, else the most confident.

    Args:
        teachers: K logits (N, C) over the same N outcomes; targets: (N,) labels, IGNORED where there is none.
        weights: with rule ``weighted``, one per teacher.

    Returns:
        (N, C) log-probabilities: softmax(T * result / T) is the fused distribution, so the logit terms
        take ``temperature * result`` as the teacher's logits.
    """
    logits = torch.stack([z.float() for z in teachers])  # (K, N, C)
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    k = len(teachers)
    if rule == "mean":
        w = torch.full(logits.shape[:2], 1 / k, device=logits.device)
    elif rule == "weighted":
        given = torch.tensor(weights, dtype=torch.float32, device=logits.device)
        w = (given / given.sum())[:, None].expand(logits.shape[:2])
    else:
        confidence = torch.softmax(logits, dim=-1).amax(-1)  # (K, N)
        if rule == "confidence":
            w = confidence / confidence.sum(0)
        else:
            right = (logits.argmax(-1) == targets) & (targets != IGNORED)  # (K, N)
            w = torch.nn.functional.one_hot(
                (confidence + 2 * right).argmax(0), k
            ).T.float()  # right beats any confidence
    return torch.logsumexp(log_p + w.clamp_min(1e-30).log()[..., None], dim=0)

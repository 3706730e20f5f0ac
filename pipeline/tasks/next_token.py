"""A causal LM's computations per position, on the model's device: next-token targets, the
statistics its metrics are summed from, and the selection of the teacher's distributions
that a cache stores (see ``pipeline.tasks.causal_lm``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cache_store.distribution import SparseSpec

from .causal_lm import ECE_BINS

SPLIT_SALT = {"train": 1, "validation": 2, "test": 3}  # mixed into the sampling hash
COVERED = "covered"  # select_distribution's per-position mass of the ids kept


def scored(mask: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) bool: the real positions at or after each row's ``start`` (B,) (every real one without)."""
    real = mask.bool()
    if start is None:
        return real
    return real & (torch.arange(mask.shape[1], device=mask.device) >= start.unsqueeze(1))


def next_tokens(input_ids: torch.Tensor, mask: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) each position's next token in its block; -100 at a block's last real position, at padding,
    and before each row's ``start`` (B,) (a prompt's positions before its answer)."""
    targets = torch.full_like(input_ids, -100)
    targets[:, :-1] = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return targets if start is None else targets.masked_fill_(~scored(mask, start), -100)


@torch.no_grad()
def block_stats(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                start: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """(B, STATS_FIELDS) float64 per block: NLL sum, predictions, correct, and per confidence bin
    (count, confidence sum, correct), over the positions from ``start`` whose next token is in the block."""
    targets = next_tokens(input_ids, mask, start)
    lse = torch.logsumexp(logits.float(), dim=-1)  # (B, T)
    top_logit, top = logits.max(-1)
    target_logit = logits.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return _sums(lse - target_logit.float(), (top_logit.float() - lse).exp(), top, targets)


@torch.no_grad()
def probabilities_and_stats(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                            start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """In place, ``logits`` (B, T, V) float32 become the next-token probabilities; returned with the
    blocks' sums (``block_stats``). Four passes over the vocabulary and no new (B, T, V) array: on a
    CPU each pass costs about 1% of the teacher's forward pass."""
    targets = next_tokens(input_ids, mask, start)
    target_logit = logits.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    top_logit, top = logits.max(-1)
    probs = logits.sub_(top_logit.unsqueeze(-1)).exp_()
    total = probs.sum(-1)  # (B, T)
    probs.div_(total.unsqueeze(-1))
    nll = top_logit + total.log() - target_logit
    return probs, _sums(nll, 1 / total, top, targets)


def _sums(nll: torch.Tensor, confidence: torch.Tensor, top: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The block sums of per-position NLL, confidence (the top probability) and top predictions (B, T)."""
    known = targets != -100  # (B, T)
    correct = (top == targets) & known
    bins = torch.clamp((confidence * ECE_BINS).long(), max=ECE_BINS - 1)  # (B, T)
    one_hot = F.one_hot(bins, ECE_BINS).double() * known.unsqueeze(-1)  # (B, T, bins)
    per_bin = torch.stack(
        [
            one_hot.sum(1),
            (one_hot * confidence.double().unsqueeze(-1)).sum(1),
            (one_hot * correct.double().unsqueeze(-1)).sum(1),
        ],
        dim=-1,
    )  # (B, bins, 3)
    head = torch.stack([(nll.double() * known).sum(1), known.double().sum(1), correct.double().sum(1)], dim=1)
    return torch.cat([head, per_bin.flatten(1)], dim=1)


def token_coordinates(example_ids: torch.Tensor, mask: torch.Tensor,
                      start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The positions whose distributions a cache stores (``scored``), rows one after another: their flat
    indices into the batch's B * T positions, and each one's block (example id) and place in it: the
    coordinates ``select_distribution`` seeds its draws with. From the rows' example ids (B,), the
    attention mask (B, T) and each row's first stored position ``start`` (B,; None: 0)."""
    keep = scored(mask, start)
    flat = keep.flatten().nonzero().squeeze(1)
    return flat, example_ids.long().repeat_interleave(keep.sum(1)), flat % mask.shape[1]


def select_distribution(probs: torch.Tensor, spec: SparseSpec, *, seed: int, split: str, example_ids: torch.Tensor,
                        positions: torch.Tensor) -> dict[str, torch.Tensor]:  # fmt: skip
    """The distribution ``spec`` stores for each of N token positions, on the probabilities' device.

    Args:
        probs: (N, V) the teacher's next-token probabilities at the spec's temperature (sampled:
            overwritten by their running sums); example_ids, positions: (N,) each position's block
            and place in it (they seed the sampled draws).

    Returns:
        topk: ids (N, k) int64, probs (N, k) float32, tail (N,) float32; dense: logprobs (N, V)
        float16; sampled: ids (N, draws) int64 with -1 after each position's distinct ids,
        counts (N, draws) int64 aligned with them; and ``COVERED`` (N,): the probability mass
        of the ids kept (not stored: the cache records its mean).
    """
    if spec.scheme == "dense":
        return {"logprobs": probs.log().half(), COVERED: torch.ones(len(probs), device=probs.device)}
    if spec.scheme == "topk":
        values, ids = probs.topk(spec.k, dim=-1)  # (N, k)
        covered = values.sum(-1)
        return {"ids": ids, "probs": values, "tail": (1 - covered).clamp_min(0), COVERED: covered}
    uniforms = hashed_uniforms(seed, SPLIT_SALT[split], example_ids, positions, spec.draws)  # (N, draws)
    cdf = probs.cumsum_(-1)  # (N, V), in place
    drawn = torch.searchsorted(cdf, uniforms * cdf[:, -1:]).clamp_max(probs.shape[-1] - 1)  # (N, draws)
    drawn, _ = drawn.sort(dim=-1)
    first = torch.ones_like(drawn, dtype=torch.bool)
    first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    group = first.cumsum(-1) - 1  # (N, draws) the index of each draw's distinct id
    counts = torch.zeros_like(drawn).scatter_add_(1, group, torch.ones_like(drawn))
    ids = torch.full_like(drawn, -1).scatter_(1, group, drawn)
    kept = ids >= 0
    below = cdf.gather(1, (ids - 1).clamp_min(0)).masked_fill(ids <= 0, 0)  # the running sum before each id
    covered = ((cdf.gather(1, ids.clamp_min(0)) - below) * kept).sum(-1)  # each distinct id's own probability
    return {"ids": ids, "counts": counts, COVERED: covered}


def teacher_probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / temperature) over the last axis, float32, by the operations of
    ``probabilities_and_stats`` (so a live teacher's values are the capture's, bit for bit)."""
    probs = logits.float() / temperature if temperature != 1 else logits.float().clone()
    probs.sub_(probs.max(-1, keepdim=True).values).exp_()
    return probs.div_(probs.sum(-1, keepdim=True))


def hashed_uniforms(seed: int, salt: int, example_ids: torch.Tensor, positions: torch.Tensor,
                    draws: int) -> torch.Tensor:  # fmt: skip
    """(N, draws) float32 uniforms in (0, 1), each a hash of (seed, salt, example id, position, draw)."""
    device = example_ids.device
    draw = torch.arange(draws, device=device, dtype=torch.int64)
    key = _mix(torch.full_like(example_ids, (seed * 1_000_003 + salt) & 0xFFFFFFFF, dtype=torch.int64))
    key = _mix(key ^ (example_ids.long() & 0xFFFFFFFF))
    key = _mix(key ^ (positions.long() & 0xFFFFFFFF))
    bits = _mix(key.unsqueeze(1) ^ draw.unsqueeze(0))  # (N, draws) 32 random bits each
    return ((bits.double() + 0.5) / 2**32).float()


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds) in int64 arithmetic, without overflow."""
    x = x & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF  # < 2**59: no int64 overflow
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return x ^ (x >> 16)

"""Causal language modelling: text packed into blocks, the teacher's next-token distributions
cached sparse (top-k, sampled or dense), held-out LM loss, perplexity and calibration.

Documents are tokenized, joined with the tokenizer's end-of-sequence token after each one,
and cut into blocks of ``data.block_length`` tokens (the last block of a split may be
shorter); a block is a cache row. At every position the teacher predicts the next token:
the cache keeps, per position, the distribution ``capture.logits`` asks for (see
``cache_store.distribution``), selected on the teacher's device so that no full-vocabulary
array is copied to the host:

- ``topk``: ``torch.topk`` of the tempered logits, their probabilities (softmax over the
  whole vocabulary) and the mass left to the other ids;
- ``sampled``: ``draws`` ids drawn with replacement by inverse-CDF sampling, each uniform a
  hash of (seed, split, block, position, draw), so the draws do not depend on how rows are
  batched, on which rank runs them, or on anything but the teacher's logits: a live teacher
  recomputes the cache's ids exactly;
- ``dense``: every log-probability.

Metrics over a split's blocks: the LM loss (mean negative log-likelihood of each next token
inside a block, in nats), its perplexity, next-token accuracy and the expected calibration
error of the top prediction (``ECE_BINS`` equal-width confidence bins). A model's outputs
per block are these sums (``row_outputs``), computed on its device; the teacher's are
stored in each cache row (``LM_STATS``), so a student's report rates it against the
teacher from the cache alone.
"""

from __future__ import annotations

import numpy as np

from cache_store import ColumnSpec, ShardRows
from cache_store.distribution import SparseSpec

from .base import Task

LM_STATS = "lm_stats"  # a row column: the model's next-token sums over the block (see next_token.block_stats)
COVERED_MASS = "covered_mass"  # a row column: the mean probability mass its stored distributions cover
ECE_BINS = 10
STATS_FIELDS = (
    3 + 3 * ECE_BINS
)  # nll sum, predictions, correct; then per confidence bin: count, confidence sum, correct


class CausalLM(Task):
    """Next-token prediction over blocks of text; the teacher's distributions per position."""

    name = "causal-lm"
    primary_metric = "perplexity"
    lower_is_better = True
    reads_labels = False
    metric_labels = {"perplexity": "perplexity", "lm_loss": "LM loss", "accuracy": "next-token accuracy",
                     "ece": "ECE"}  # fmt: skip
    peft_task = "CAUSAL_LM"
    per_token = True
    outputs_column = LM_STATS
    caches_distributions = True
    throughput = "tokens"
    batch_columns = {}  # noqa: RUF012 (read only): a block's targets are its own next tokens

    def auto_model(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def load_model(self, directory, *, num_labels=None, attention_maps=False):
        """A causal LM from a checkpoint (its head is the vocabulary: ``num_labels`` does not apply)."""
        return super().load_model(directory, attention_maps=attention_maps)

    def label_names(self, labels: list) -> tuple[str, ...]:
        return ()

    def read_label(self, value, names, texts):
        return None

    def encode(self, tokenizer, data, cfg) -> ShardRows:
        """The split's documents, each followed by the end-of-sequence token, in blocks of ``block_length``."""
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("causal-lm needs a tokenizer with an end-of-sequence token between documents")
        encoded = tokenizer([t[0] for t in data.texts], add_special_tokens=False, return_attention_mask=False)
        stream = np.fromiter((i for ids in encoded["input_ids"] for i in (*ids, eos)), dtype=np.int32)
        blocks = [stream[i : i + cfg.block_length] for i in range(0, len(stream), cfg.block_length)]
        blocks = [b for b in blocks if len(b) >= 2]  # a block of one token predicts nothing inside it
        return ShardRows(np.arange(len(blocks), dtype=np.int64), blocks, {})

    def columns(self, num_labels: int) -> tuple[ColumnSpec, ...]:
        """The teacher's block sums, and the mean mass its stored distributions cover (0 where none are stored)."""
        return ColumnSpec(LM_STATS, "float32", (STATS_FIELDS,)), ColumnSpec(COVERED_MASS, "float32")

    def labeled(self, rows: ShardRows) -> np.ndarray:
        return np.ones(len(rows), dtype=bool)

    def hard_loss(self, logits, batch):
        """Cross-entropy of each position's logits with the next token of its block (B, T, V)."""
        import torch.nn.functional as F

        from .next_token import next_tokens

        targets = next_tokens(batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    @property
    def outputs_per_token(self) -> bool:
        return False

    def batch_outputs(self, logits, batch, real):
        """Each block's next-token sums (B, STATS_FIELDS) float32 (see ``next_token.block_stats``)."""
        from .next_token import block_stats

        return block_stats(logits, batch["input_ids"], batch["attention_mask"]).float()

    def metrics(self, outputs, rows, label_names=()) -> dict[str, float]:
        """LM loss, perplexity, next-token accuracy and ECE from the blocks' summed statistics (N, STATS_FIELDS)."""
        return lm_metrics(np.sum(np.asarray(outputs, dtype=np.float64).reshape(-1, STATS_FIELDS), axis=0))


def lm_metrics(totals: np.ndarray) -> dict[str, float]:
    """The metrics of summed block statistics (STATS_FIELDS,)."""
    nll, count, correct = totals[:3]
    bins = totals[3:].reshape(ECE_BINS, 3)
    loss = nll / max(count, 1)
    ece = np.abs(bins[:, 2] - bins[:, 1]).sum() / max(count, 1)
    return {"perplexity": float(np.exp(loss)), "lm_loss": float(loss), "accuracy": float(correct / max(count, 1)),
            "ece": float(ece)}  # fmt: skip


CONTINUATION_TOKENS = 24  # new tokens of each greedy continuation in the report
DEFAULT_PROMPTS, PROMPT_WORDS = 3, 8  # with no capture.prompts: the first words of this many test documents


def default_prompts(documents: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The first ``PROMPT_WORDS`` words of the first test documents: prompts when the config names none."""
    return tuple(" ".join(d[0].split()[:PROMPT_WORDS]) for d in documents[:DEFAULT_PROMPTS])


def continuations(model, tokenizer, prompts: tuple[str, ...], *, new_tokens: int = CONTINUATION_TOKENS) -> list[str]:
    """Each prompt's greedy continuation by ``model`` (its new text only), one prompt at a time (no padding)."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)
        with torch.no_grad():
            generated = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        out.append(tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True))
    return out


def host_rows(selected: dict[str, np.ndarray], lengths: np.ndarray, spec: SparseSpec) -> list[dict[str, np.ndarray]]:
    """Per-row distributions (``cache_store.distribution`` layout) from ``select_distribution``'s
    arrays over the rows' tokens, row after row, on the host."""
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    rows = []
    for i in range(len(lengths)):
        part = {name: a[bounds[i] : bounds[i + 1]] for name, a in selected.items() if name in spec.arrays}
        if spec.scheme == "sampled":
            kept = part["ids"] >= 0
            part = {"ids": part["ids"][kept], "counts": part["counts"][kept], "entries": kept.sum(1)}
        rows.append(part)
    return rows

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

With ``data.prompts`` (sequence-level KD, Kim and Rush 2016) each text is a prompt instead,
wrapped in the configured template (and the tokenizer's chat template), one row each; the
teacher answers it once at capture (``capture.generate``: greedy, or sampled and seeded) and
the row becomes prompt + answer. Every row has a ``TARGET_START`` column: the first position
whose next-token prediction is learned and scored (0 for packed text; for a prompt, its last
token, which predicts the answer's first). The cache keeps distributions from there on, and
the losses and metrics read the answer only.

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

from ..errors import ConfigError
from .base import Task

TARGET_START = "target_start"  # a row column: the first position whose next-token prediction counts
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
    batch_columns = {TARGET_START: 0}  # noqa: RUF012 (read only): a block's targets are its own next tokens

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
        """The split's documents, each followed by the end-of-sequence token, in blocks of ``block_length``;
        with ``cfg.prompts``, one prompt per document instead (``prompt_rows``)."""
        if cfg.prompts is not None:
            return prompt_rows(tokenizer, data, cfg)
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("causal-lm needs a tokenizer with an end-of-sequence token between documents")
        encoded = tokenizer([t[0] for t in data.texts], add_special_tokens=False, return_attention_mask=False)
        stream = np.fromiter((i for ids in encoded["input_ids"] for i in (*ids, eos)), dtype=np.int32)
        blocks = [stream[i : i + cfg.block_length] for i in range(0, len(stream), cfg.block_length)]
        blocks = [b for b in blocks if len(b) >= 2]  # a block of one token predicts nothing inside it
        return ShardRows(
            np.arange(len(blocks), dtype=np.int64), blocks, {TARGET_START: np.zeros(len(blocks), np.int32)}
        )

    def columns(self, num_labels: int) -> tuple[ColumnSpec, ...]:
        """Where each row's scored positions start, the teacher's block sums, and the mean mass its stored
        distributions cover (0 where none are stored)."""
        return (ColumnSpec(TARGET_START, "int32"), ColumnSpec(LM_STATS, "float32", (STATS_FIELDS,)),
                ColumnSpec(COVERED_MASS, "float32"))  # fmt: skip

    def labeled(self, rows: ShardRows) -> np.ndarray:
        return np.ones(len(rows), dtype=bool)

    def hard_loss(self, logits, batch):
        """Cross-entropy of each position's logits with the next token of its block (B, T, V)."""
        import torch.nn.functional as F

        from .next_token import next_tokens

        targets = next_tokens(batch["input_ids"], batch["attention_mask"], batch.get(TARGET_START))
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    @property
    def outputs_per_token(self) -> bool:
        return False

    def batch_outputs(self, logits, batch, real):
        """Each block's next-token sums (B, STATS_FIELDS) float32 (see ``next_token.block_stats``)."""
        from .next_token import block_stats

        return block_stats(logits, batch["input_ids"], batch["attention_mask"], batch.get(TARGET_START)).float()

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


def prompt_rows(tokenizer, data, cfg) -> ShardRows:
    """One row per document: its prompt's token ids, the document (its texts joined by new lines) cut at
    its end to fit ``cfg.max_length`` tokens; ``TARGET_START`` at the prompt's last token."""
    prefix, suffix = prompt_pieces(tokenizer, cfg.prompts)
    room = cfg.max_length - len(prefix) - len(suffix)
    if room < 1:
        raise ConfigError(f"data.prompts: the template takes {len(prefix) + len(suffix)} tokens, leaving none of "
                          f"data.max_length {cfg.max_length} for the text")  # fmt: skip
    texts = tokenizer(["\n".join(t) for t in data.texts], add_special_tokens=False, return_attention_mask=False)
    ids = [np.array([*prefix, *t[:room], *suffix], np.int32) for t in texts["input_ids"]]
    starts = np.array([len(i) - 1 for i in ids], np.int32)
    return ShardRows(np.arange(len(ids), dtype=np.int64), ids, {TARGET_START: starts})


def prompt_pieces(tokenizer, prompts) -> tuple[list[int], list[int]]:
    """The token ids a prompt puts before and after its text: the template's, inside the chat template's
    user turn and followed by its assistant header when ``prompts.chat_template``."""
    marker = "\x00"  # stands for the text while the template is rendered
    text = prompts.template.replace("{text}", marker)
    if prompts.chat_template:
        if not tokenizer.chat_template:
            raise ConfigError("data.prompts.chat_template: the teacher's tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)  # fmt: skip
    before, after = text.split(marker)
    return (tokenizer(before, add_special_tokens=False)["input_ids"] if before else [],
            tokenizer(after, add_special_tokens=False)["input_ids"] if after else [])  # fmt: skip


def stop_ids(model, tokenizer) -> list[int]:
    """The ids that end an answer: the model's generation config's end-of-sequence ids and the tokenizer's."""
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in (*ids, tokenizer.eos_token_id) if i is not None})


def generate(model, prompts: list[np.ndarray], *, pad_id: int, stops: list[int], max_new_tokens: int,
             sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> list[np.ndarray]:  # fmt: skip
    """Each prompt's answer by ``model``, generated in one left-padded batch: its new ids up to and
    including the first of ``stops`` (all ``max_new_tokens`` when none comes). Greedy, or sampled at
    ``temperature`` and ``top_p`` after seeding torch with ``seed``."""
    import torch

    device = next(model.parameters()).device
    longest = max(map(len, prompts))
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, longest - len(prompt) :] = torch.from_numpy(np.asarray(prompt, np.int64))
        mask[i, longest - len(prompt) :] = 1
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if sample else {"do_sample": False}
    if sample:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             pad_token_id=pad_id, eos_token_id=stops, **sampling)  # fmt: skip
    answers = []
    for row in out[:, longest:].cpu().numpy():
        ends = np.flatnonzero(np.isin(row, stops))
        answers.append(row[: ends[0] + 1] if len(ends) else row)
    return answers


CONTINUATION_TOKENS = 24  # new tokens of each greedy continuation in the report
DEFAULT_PROMPTS, PROMPT_WORDS = 3, 8  # with no capture.prompts: the first words of this many test documents


def default_prompts(documents: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The first ``PROMPT_WORDS`` words of the first test documents: prompts when the config names none."""
    return tuple(" ".join(d[0].split()[:PROMPT_WORDS]) for d in documents[:DEFAULT_PROMPTS])


def lm_samples(model, tokenizer, test: ShardRows, documents: list[tuple[str, ...]], *, prompts: tuple[str, ...],
               generation) -> list[dict]:  # fmt: skip
    """What the report shows each model's continuation beside: per sample its ``prompt`` (text), ``prompt_ids``,
    ``new_tokens`` (the most a model writes) and the teacher's ``continuation``. For plain text, the teacher
    continues ``prompts`` (none: the first words of the first test documents) greedily; for prompts
    (``generation`` not None), the samples are the first test rows' prompts and the teacher's cached answers."""
    if generation is None:
        samples = [{"prompt": p, "prompt_ids": tokenizer(p, add_special_tokens=False)["input_ids"],
                    "new_tokens": CONTINUATION_TOKENS} for p in prompts or default_prompts(documents)]  # fmt: skip
        return [s | {"continuation": c} for s, c in zip(samples, continuations(model, tokenizer, samples), strict=True)]
    samples = []
    for i in range(min(DEFAULT_PROMPTS, len(test))):
        ids, answer = test.input_ids[i], int(test[TARGET_START][i]) + 1
        samples.append({"prompt": "\n".join(documents[test.example_id[i]]), "prompt_ids": ids[:answer].tolist(),
                        "new_tokens": generation.max_new_tokens,
                        "continuation": tokenizer.decode(ids[answer:], skip_special_tokens=True)})  # fmt: skip
    return samples


def continuations(model, tokenizer, samples: tuple[dict, ...]) -> list[str]:
    """Each sample's greedy continuation by ``model`` of its ``prompt_ids`` for at most its ``new_tokens``
    (its new text only), one prompt at a time (no padding)."""
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_ids(model, tokenizer)
    return [tokenizer.decode(generate(model, [np.asarray(s["prompt_ids"])], pad_id=pad, stops=stops,
                                      max_new_tokens=s["new_tokens"])[0], skip_special_tokens=True)
            for s in samples]  # fmt: skip


def host_rows(selected: dict[str, np.ndarray], lengths: np.ndarray, spec: SparseSpec) -> list[dict[str, np.ndarray]]:
    """Per-row distributions (``cache_store.distribution`` layout) from ``select_distribution``'s
    arrays over the rows' stored positions (``lengths`` per row), row after row, on the host."""
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    rows = []
    for i in range(len(lengths)):
        part = {name: a[bounds[i] : bounds[i + 1]] for name, a in selected.items() if name in spec.arrays}
        if spec.scheme == "sampled":
            kept = part["ids"] >= 0
            part = {"ids": part["ids"][kept], "counts": part["counts"][kept], "entries": kept.sum(1)}
        rows.append(part)
    return rows

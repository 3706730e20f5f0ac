"""Teacher distributions over a vocabulary, one per token, stored sparse: top-k, sampled, or dense.

A causal language model's teacher emits, at every position, a distribution over its whole
vocabulary (49,152 tokens for SmolLM2: 98 KB per token in float16). A cache keeps one of:

- ``topk``: the ``k`` most probable ids with their probabilities, and the probability mass
  of every other id (the tail);
- ``sampled``: ``draws`` ids drawn with replacement from the distribution, kept as the
  distinct ids and how often each was drawn (``count / draws`` estimates each probability
  without bias);
- ``dense``: every log-probability (small vocabularies and tests).

Distributions are taken at the spec's ``temperature`` (softmax(z / T) of the logits z). A row
has one per position from the position its ``start_column`` gives (0 without one) to its end:
a prompt's positions before its answer have none.

Stored layout (arrays of ``tensors.zarr/distribution/``, every token of every row back to back,
rows in order):

- ``ids`` (topk: ``(tokens, k)``; sampled: ``(entries,)``): each token's ids in ascending order,
  stored as gaps (the first id, then each id minus the one before it), uint16 where the
  vocabulary fits, else uint32. Gaps are small numbers, which Blosc's byte shuffle and zstd
  pack to about 9 bits (top-50) or 11 bits (50 draws) an id, against 16 raw.
- ``probs`` (topk ``(tokens, k)``, in the same order as ``ids``): uint8 ``q = round(255 * sqrt(p))``,
  read back as ``(q / 255)^2``: sqrt(p) within 1/510, so a probability p within
  ``sqrt(p) / 255`` (a larger step for large p, a finer one for small p). Measured on
  SmolLM2-135M's top-50 over movie reviews: 35 bytes a token, against 43 for log-probabilities
  in steps of 1/16 nat, and KL(teacher || stored) within 1.3e-4 nats of the exact top-50.
- ``tail`` (topk ``(tokens,)``): float16 mass of the ids outside the top k.
- ``logprobs`` (dense ``(tokens, V)``): float16 log-probabilities.
- ``counts`` (sampled ``(entries,)``): how often each id was drawn; ``entries`` ``(tokens,)``: how
  many distinct ids each token has (uint8 when ``draws`` < 256, else uint16).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCHEMES = ("topk", "sampled", "dense")
DISTRIBUTION_DIR = "distribution"
PerToken = dict[str, np.ndarray]  # one row's distribution: the arrays of its tokens (see ``SparseSpec``)


@dataclass(frozen=True)
class SparseSpec:
    """How a cache stores its teacher's per-token distribution.

    Attributes:
        scheme: topk, sampled or dense.
        vocab_size: the teacher's vocabulary (ids are in [0, vocab_size)).
        temperature: the distributions are of softmax(logits / temperature).
        k: topk: ids kept per token.
        draws: sampled: draws per token, with replacement.
        start_column: the row column holding each row's first position with a distribution (the
            positions before it have none); None: every position has one.
    """

    scheme: str
    vocab_size: int
    temperature: float = 1.0
    k: int | None = None
    draws: int | None = None
    start_column: str | None = None

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"distribution scheme must be one of {SCHEMES}; got {self.scheme!r}")
        if self.vocab_size < 2 or self.temperature <= 0:
            raise ValueError(f"distribution needs vocab_size >= 2 and temperature > 0; got {self}")
        if self.scheme == "topk" and not (self.k and 1 <= self.k < self.vocab_size):
            raise ValueError(f"topk needs 1 <= k < vocab_size ({self.vocab_size}); got k={self.k!r}")
        if self.scheme == "sampled" and not (self.draws and 1 <= self.draws < 65536):
            raise ValueError(f"sampled needs 1 <= draws < 65536; got draws={self.draws!r}")

    @property
    def arrays(self) -> tuple[str, ...]:
        """The arrays a row's distribution holds (and the shard stores)."""
        return {"topk": ("ids", "probs", "tail"), "sampled": ("ids", "counts", "entries"),
                "dense": ("logprobs",)}[self.scheme]  # fmt: skip

    def starts(self, columns: dict, rows: int) -> np.ndarray:
        """(N,) each row's first position with a distribution, from the rows' ``columns``."""
        return np.asarray(columns[self.start_column], np.int64) if self.start_column else np.zeros(rows, np.int64)

    def stored_tokens(self, lengths: np.ndarray, columns: dict) -> np.ndarray:
        """(N,) how many positions of each row have a distribution, from its length and ``columns``.

        Raises:
            ValueError: a start outside its row.
        """
        lengths = np.asarray(lengths, np.int64)
        starts = self.starts(columns, len(lengths))
        if np.any(starts < 0) or np.any(starts >= lengths):
            row = int(np.flatnonzero((starts < 0) | (starts >= lengths))[0])
            raise ValueError(f"row {row}: {self.start_column} {starts[row]} outside its {lengths[row]} tokens")
        return lengths - starts

    @property
    def id_dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.vocab_size <= 1 << 16 else np.uint32)

    @property
    def count_dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.draws is not None and self.draws < 256 else np.uint16)

    def check_row(self, row: PerToken, tokens: int, where: str) -> None:
        """Raise ValueError unless ``row`` is one row's distribution over ``tokens`` positions."""
        if set(row) != set(self.arrays):
            raise ValueError(f"{where}: distribution arrays {sorted(row)}, the spec stores {list(self.arrays)}")
        shapes = {"topk": {"ids": (tokens, self.k), "probs": (tokens, self.k), "tail": (tokens,)},
                  "dense": {"logprobs": (tokens, self.vocab_size)},
                  "sampled": {"entries": (tokens,)}}[self.scheme]  # fmt: skip
        for name, shape in shapes.items():
            if np.shape(row[name]) != shape:
                raise ValueError(f"{where}: distribution {name} must be {shape}; got {np.shape(row[name])}")
        if self.scheme == "sampled":
            entries = int(np.sum(row["entries"]))
            if np.shape(row["ids"]) != (entries,) or np.shape(row["counts"]) != (entries,):
                raise ValueError(f"{where}: sampled ids and counts must hold sum(entries) = {entries} values")
            drawn = np.bincount(np.repeat(np.arange(tokens), row["entries"]), row["counts"], minlength=tokens)
            if np.any(drawn != self.draws):
                raise ValueError(f"{where}: each token's counts must add up to draws = {self.draws}")
        ids = row.get("ids")
        if ids is not None and len(ids) and (np.min(ids) < 0 or np.max(ids) >= self.vocab_size):
            raise ValueError(f"{where}: distribution ids outside [0, {self.vocab_size})")


def _token_starts(entries: np.ndarray) -> np.ndarray:
    """(tokens,) each token's first entry, from the distinct ids per token."""
    return np.concatenate([[0], np.cumsum(entries)[:-1]]).astype(np.int64)


def encode_rows(rows: list[PerToken], spec: SparseSpec) -> dict[str, np.ndarray]:
    """A shard's rows' distributions as the arrays it stores (see the module docstring)."""
    joined = {name: np.concatenate([np.asarray(r[name]) for r in rows]) if rows else None for name in spec.arrays}
    if spec.scheme == "dense":
        logprobs = joined["logprobs"] if rows else np.zeros((0, spec.vocab_size))
        return {"logprobs": logprobs.astype(np.float16)}
    if spec.scheme == "topk":
        ids = joined["ids"] if rows else np.zeros((0, spec.k), np.int64)
        probs = joined["probs"] if rows else np.zeros((0, spec.k))
        order = np.argsort(ids, axis=1, kind="stable")  # ascending ids: small gaps
        ids, probs = np.take_along_axis(ids, order, 1), np.take_along_axis(probs, order, 1)
        gaps = np.diff(ids, axis=1, prepend=0)
        levels = np.round(255 * np.sqrt(np.clip(probs, 0, 1, dtype=np.float64)))
        tail = joined["tail"] if rows else np.zeros(0)
        return {"ids": gaps.astype(spec.id_dtype), "probs": levels.astype(np.uint8),
                "tail": np.asarray(tail, np.float32).astype(np.float16)}  # fmt: skip
    entries = (joined["entries"] if rows else np.zeros(0)).astype(np.int64)
    ids = (joined["ids"] if rows else np.zeros(0)).astype(np.int64)
    counts = joined["counts"] if rows else np.zeros(0)
    token = np.repeat(np.arange(len(entries)), entries)  # (entries,) the token of each entry
    order = np.lexsort((ids, token))  # by token, then ascending id
    ids, counts = ids[order], counts[order]
    gaps = np.diff(ids, prepend=0)
    starts = _token_starts(entries)[entries > 0]
    gaps[starts] = ids[starts]  # each token's first id as it is
    return {"ids": gaps.astype(spec.id_dtype), "counts": counts.astype(spec.count_dtype),
            "entries": entries.astype(spec.count_dtype)}  # fmt: skip


def decode_arrays(stored: dict[str, np.ndarray], spec: SparseSpec) -> dict[str, np.ndarray]:
    """Undo ``encode_rows``: ids as int64 (ascending per token), probabilities (top-k) and
    log-probabilities (dense) float32, tail float32, counts and entries int64."""
    if spec.scheme == "dense":
        return {"logprobs": stored["logprobs"].astype(np.float32)}
    if spec.scheme == "topk":
        ids = np.cumsum(stored["ids"].astype(np.int64), axis=1)
        return {"ids": ids, "probs": np.square(stored["probs"].astype(np.float32) / 255),
                "tail": stored["tail"].astype(np.float32)}  # fmt: skip
    entries = stored["entries"].astype(np.int64)
    running = np.concatenate([[0], np.cumsum(stored["ids"].astype(np.int64))])
    base = running[_token_starts(entries)]  # the running sum before each token's first entry
    ids = running[1:] - np.repeat(base, entries)
    return {"ids": ids, "counts": stored["counts"].astype(np.int64), "entries": entries}


def row_offsets(tokens: np.ndarray, stored: dict[str, np.ndarray], spec: SparseSpec) -> dict[str, np.ndarray]:
    """(N + 1,) offsets of each row's block in every stored array, from the rows' ``stored_tokens``:
    tokens, or entries for sampled ids/counts."""
    tokens = np.concatenate([[0], np.cumsum(tokens, dtype=np.int64)])
    offsets = {name: tokens for name in spec.arrays}
    if spec.scheme == "sampled":
        entries = np.concatenate([[0], np.cumsum(stored["entries"].astype(np.int64))])
        offsets["ids"] = offsets["counts"] = entries[tokens]
    return offsets

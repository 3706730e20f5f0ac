"""Batches for students, streamed from a cache shard by shard (the teacher is never loaded)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from cache_store import Cache

from .capture import ATTENTION, HIDDEN
from .data import UNLABELED
from .training import Batch, Collator, length_grouped_batches


class CacheBatches:
    """Shuffled, padded batches of one cache split with the teacher outputs a student needs.

    Shards are read whole, one at a time, in an order shuffled from ``(seed, epoch)``;
    within a shard, rows of similar length are batched together and the batches shuffled.
    A run is therefore reproducible, and reads are sequential.

    Args:
        hidden_layers, attention_layers: teacher layers whose tensors each batch carries.
        labeled_only: skip unlabeled rows (for the hard-label baseline).
    """

    def __init__(self, cache: Cache, split: str, *, batch_size: int, seed: int, collate: Collator,
                 hidden_layers=(), attention_layers=(), labeled_only: bool = False):  # fmt: skip
        self.cache, self.split, self.batch_size, self.seed, self.collate = cache, split, batch_size, seed, collate
        self.wanted = [(HIDDEN, k) for k in hidden_layers] + [(ATTENTION, k) for k in attention_layers]
        self.labeled_only = labeled_only
        if labeled_only:  # count the labeled rows of each shard once
            rows = [int((d.rows.label != UNLABELED).sum()) for d in self.cache.iter_shards(split)]
        else:
            rows = [entry.rows for entry in self.cache.shards(split)]
        self._batches = sum(-(-n // batch_size) for n in rows)  # one short batch at most per shard

    def __len__(self) -> int:
        return self._batches

    def _shard_batches(self, data, rng: np.random.Generator) -> list[np.ndarray]:
        rows = np.flatnonzero(data.rows.label != UNLABELED) if self.labeled_only else np.arange(len(data.rows))
        lengths = np.array([len(data.rows.input_ids[i]) for i in rows])
        return [rows[b] for b in length_grouped_batches(lengths, self.batch_size, rng, window=len(rows) or 1)]

    def epoch(self, epoch: int) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, epoch])
        shards = self.cache.shards(self.split)
        for shard_index in rng.permutation(len(shards)):
            data = self.cache.read_shard(shards[shard_index], self.wanted)
            for rows in self._shard_batches(data, rng):
                yield self._collate(data, rows)

    def _collate(self, data, rows: np.ndarray) -> Batch:
        batch = {
            **self.collate([data.rows.input_ids[i] for i in rows]),  # input_ids, attention_mask: (B, T)
            "labels": torch.from_numpy(data.rows.label[rows].astype(np.int64)),  # (B,)
            "teacher_logits": torch.from_numpy(data.rows.logits[rows]),  # (B, C)
        }
        for name, layer in self.wanted:
            arrays = [data.example_tensor(name, layer, i) for i in rows]
            batch[f"{name}/{layer}"] = _pad_tensors(arrays, batch["input_ids"].shape[1], name)
        return batch


def _pad_tensors(arrays: list[np.ndarray], longest: int, name: str) -> torch.Tensor:
    """Zero-pad per-example tensors: hidden (L, H) -> (B, T, H); attention (h, L, L) -> (B, h, T, T)."""
    first = arrays[0]
    if name == HIDDEN:
        out = torch.zeros((len(arrays), longest, first.shape[-1]), dtype=torch.float32)
        for i, a in enumerate(arrays):
            out[i, : len(a)] = torch.from_numpy(a.astype(np.float32))
    else:
        out = torch.zeros((len(arrays), first.shape[0], longest, longest), dtype=torch.float32)
        for i, a in enumerate(arrays):
            n = a.shape[-1]
            out[i, :, :n, :n] = torch.from_numpy(a.astype(np.float32))
    return out

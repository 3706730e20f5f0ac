"""Batches for students, streamed from a cache shard by shard (the teacher is never loaded)."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from cache_store import Cache

from .capture import ATTENTION, HIDDEN
from .data import UNLABELED
from .training import Batch, pad_ids


class CacheBatches:
    """Shuffled, padded batches of one cache split with the teacher outputs a student needs.

    Shard order and row order within each shard are shuffled from ``(seed, epoch)``, so a
    run is reproducible; rows left over at a shard's end join the next shard's first batch.

    Args:
        hidden_layers, attention_layers: teacher layers whose tensors each batch carries.
        labeled_only: skip unlabeled rows (for the hard-label baseline).
    """

    def __init__(self, cache: Cache, split: str, *, batch_size: int, seed: int, pad_id: int,
                 hidden_layers=(), attention_layers=(), labeled_only: bool = False):  # fmt: skip
        self.cache, self.split, self.batch_size, self.seed, self.pad_id = cache, split, batch_size, seed, pad_id
        self.wanted = [(HIDDEN, k) for k in hidden_layers] + [(ATTENTION, k) for k in attention_layers]
        self.labeled_only = labeled_only
        self.rows = self._count_rows()

    def _count_rows(self) -> int:
        if not self.labeled_only:
            return self.cache.split(self.split).rows
        return sum(int((shard.rows.label != UNLABELED).sum()) for shard in self.cache.iter_shards(self.split))

    def __len__(self) -> int:
        return -(-self.rows // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, epoch])
        shards = self.cache.shards(self.split)
        pending = []
        for shard_index in rng.permutation(len(shards)):
            data = self.cache.read_shard(shards[shard_index], self.wanted)
            for i in rng.permutation(len(data.rows)):
                if self.labeled_only and data.rows.label[i] == UNLABELED:
                    continue
                pending.append(self._example(data, i))
                if len(pending) == self.batch_size:
                    yield self._collate(pending)
                    pending = []
        if pending:
            yield self._collate(pending)

    def _example(self, data, i: int) -> dict:
        return {
            "ids": data.rows.input_ids[i],
            "label": data.rows.label[i],
            "logits": data.rows.logits[i],
            **{key: data.example_tensor(*key, i) for key in self.wanted},
        }

    def _collate(self, examples: list[dict]) -> Batch:
        input_ids, mask = pad_ids([e["ids"] for e in examples], self.pad_id)  # (B, T)
        batch = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": torch.tensor(np.array([e["label"] for e in examples]), dtype=torch.long),  # (B,)
            "teacher_logits": torch.from_numpy(np.stack([e["logits"] for e in examples])),  # (B, C)
        }
        longest = input_ids.shape[1]
        for name, layer in self.wanted:
            batch[f"{name}/{layer}"] = _pad_tensors([e[(name, layer)] for e in examples], longest, name)
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

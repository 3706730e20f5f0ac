"""Batches for students, streamed from a cache (or, with --online, from the tokenized data).

An epoch's batches are planned before anything is read, from each shard's row count and
row statistics alone, deterministically from ``(seed, epoch)``:

1. under torchrun, rank r owns every world-th shard; each rank shuffles its shards;
2. within a shard the selected rows are cut into blocks of ``block_rows``, and the
   blocks shuffled;
3. the rows then pass through a shuffle buffer of ``buffer_rows`` (never across a shard's
   end): each buffer's rows are grouped by length into batches (little padding) and the
   batches shuffled.

Every rank gets the same number of batches (the fewest any rank has), as DDP needs. The
plan is a list, so a resumed run starts at its batch number without reading what came
before, and DataLoader workers each build every W-th group of batches (``_Handover``): the
order is the plan's, whatever the number of workers. Reads are whole shards, verified; the
process building batches keeps the shard it is on and reads its next one on a thread meanwhile.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cache_store import Cache, ShardData, ShardRows, TensorSpec
from cache_store.distribution import PerToken, SparseSpec, decode_arrays, encode_rows, row_offsets
from cache_store.shard import decode, encode

from ..config import Curriculum, Selection
from ..contract import ATTENTION, EXAMPLE_ID, HIDDEN, TEACHER_LOGITS, distribution_key, teacher_key, tensor_key
from ..errors import ConfigError
from ..inspection import TeacherStats
from ..runtime import autocast
from ..tasks import LABEL, LOGITS, Task
from ..tasks.causal_lm import host_rows
from ..tasks.next_token import scored, select_distribution, teacher_probabilities, token_coordinates
from ..training import Batch, Collator, collate_rows, column_batch, length_grouped_batches, to_device

Select = Callable[[TeacherStats, int], np.ndarray]  # a shard's rows to stream in an epoch, as a boolean mask
Wanted = tuple[int, str, int]  # a teacher tensor a batch carries: (teacher position, tensor name, layer)


def row_selection(selection: Selection | None, curriculum: Curriculum | None = None, *, epochs: int = 1) -> Select:
    """The rows of a shard an epoch streams, from the teacher's statistics of its rows: those ``distill.select``
    keeps, and of them, with ``distill.curriculum``, those among the epoch's easiest fraction of the shard
    (``Curriculum.fraction`` over the students' ``epochs``)."""

    def keep(stats: TeacherStats, epoch: int) -> np.ndarray:
        mask = kept(selection, stats) if selection is not None else np.ones(len(stats.confidence), bool)
        if curriculum is not None:
            mask &= kept(Selection(by=curriculum.by, keep=curriculum.fraction(epoch, epochs)), stats)
        return mask

    return keep


def kept(selection: Selection, stats: TeacherStats) -> np.ndarray:
    """A boolean mask of the rows ``selection`` keeps."""
    if selection.by == "correct":
        return stats.correct | (stats.labels < 0)
    values = getattr(stats, selection.by)
    mask = np.ones(len(values), bool)
    if selection.min is not None:
        mask &= values >= selection.min
    if selection.max is not None:
        mask &= values <= selection.max
    if selection.keep is not None:
        surest = values if selection.by != "entropy" else -values
        chosen = np.zeros(len(values), bool)
        chosen[np.argsort(-surest, kind="stable")[: round(selection.keep * len(values))]] = True
        mask &= chosen
    return mask


class CacheSource:
    """Shards of one split of a teacher's cache, or of several teachers' caches over the same examples:
    their row counts, row statistics (the first teacher's), and the shards themselves.

    Each shard's rows are read once and kept (they are small beside its tensors): every
    pass plans its batches from them.

    Raises:
        ConfigError: the caches split the examples into other shards (capture.shard_rows differs).
    """

    def __init__(self, caches: Cache | Sequence[Cache], split: str):
        self.caches = [caches] if isinstance(caches, Cache) else list(caches)
        self.split = split
        self.entries = [cache.shards(split) for cache in self.caches]  # per teacher, per shard
        first = self.caches[0]
        for cache, entries in zip(self.caches[1:], self.entries[1:], strict=True):
            if [e.rows for e in entries] != [e.rows for e in self.entries[0]]:
                raise ConfigError(
                    f"teacher caches {first.key} and {cache.key} cut {split} into other shards ({len(self.entries[0])} "
                    f"and {len(entries)}); capture every teacher with the same capture.shard_rows"
                )
        self._rows: dict[int, ShardRows] = {}

    def __len__(self) -> int:
        return len(self.entries[0])

    def rows(self, shard: int) -> ShardRows:
        if shard not in self._rows:
            self._rows[shard] = self.caches[0].read_shard(self.entries[0][shard], []).rows
        return self._rows[shard]

    def read(self, shard: int, wanted: list[Wanted], distribution: bool = False) -> list[ShardData]:
        """Each teacher's part of ``shard``: its rows (with its logits) and the tensors ``wanted`` of it."""
        out = []
        for k, (cache, entries) in enumerate(zip(self.caches, self.entries, strict=True)):
            mine = [(name, layer) for teacher, name, layer in wanted if teacher == k]
            data = cache.read_shard(entries[shard], mine, distribution=distribution and k == 0)
            if k and not np.array_equal(data.rows.example_id, out[0].rows.example_id):
                raise ConfigError(
                    f"teacher caches {self.caches[0].key} and {cache.key} hold other examples in shard {shard} of "
                    f"{self.split}; fuse only caches captured from the same data"
                )
            out.append(data)
        return out


class TokenSource:
    """The same shard layout over a split's rows without the teacher's outputs (the teacher runs live)."""

    def __init__(self, rows: ShardRows, *, shard_rows: int):
        rows = ShardRows(rows.example_id, rows.input_ids, {k: v for k, v in rows.columns.items() if k != LOGITS})
        self.shards = [rows.take(np.arange(start, min(start + shard_rows, len(rows))))
                       for start in range(0, len(rows), shard_rows)]  # fmt: skip

    def __len__(self) -> int:
        return len(self.shards)

    def rows(self, shard: int) -> ShardRows:
        return self.shards[shard]

    def read(self, shard: int, wanted: list[Wanted], distribution: bool = False) -> list[ShardData]:
        return [ShardData(rows=self.rows(shard), tensors={}, offsets={}, specs={})]


class StudentStream(IterableDataset):
    """The planned batches of one split (see the module docstring), as a torch IterableDataset.

    Args:
        task: the cache's task: which rows are labeled, and the row columns a batch carries.
        wanted: the teacher tensors each batch carries, (teacher, name, layer), padded to the batch.
        distribution: a causal LM cache's distributions, when each batch carries them (``pad_distributions``).
        labeled_only: stream labeled rows only (the hard-label baseline).
        select: sample selection over the teacher's row statistics, per epoch (``row_selection``); None
            streams every row.
        rank, world: this process's part under torchrun.
    """

    def __init__(self, source: CacheSource | TokenSource, *, task: Task, collate: Collator, batch_size: int, seed: int,
                 wanted: list[Wanted] = (), labeled_only: bool = False, select: Select | None = None,
                 block_rows: int = 256, buffer_rows: int = 1024, rank: int = 0, world: int = 1,
                 distribution: SparseSpec | None = None):  # fmt: skip
        self.source, self.collate, self.batch_size, self.seed = source, collate, batch_size, seed
        self.distribution = distribution
        self.fills = dict(task.batch_columns)
        self.wanted, self.block_rows, self.buffer_rows = list(wanted), block_rows, buffer_rows
        self.rank, self.world, self.labeled_only, self.select = rank, world, labeled_only, select
        self.eligible, self.stats, self.lengths = [], [], []  # per shard: labeled rows, teacher statistics, lengths
        for shard in range(len(source)):
            rows = source.rows(shard)
            self.eligible.append(task.labeled(rows) if labeled_only else np.ones(len(rows), bool))
            self.stats.append(TeacherStats.from_logits(rows[LOGITS], rows[LABEL]) if select is not None else None)
            self.lengths.append(rows.lengths)
        self._selected: dict[int, list[np.ndarray]] = {}
        self._epoch, self._start = 0, 0

    def selected(self, epoch: int) -> list[np.ndarray]:
        """Per shard, the rows ``epoch`` streams."""
        if epoch not in self._selected:
            self._selected[epoch] = [
                np.flatnonzero(eligible if stats is None else eligible & np.asarray(self.select(stats, epoch), bool))
                for eligible, stats in zip(self.eligible, self.stats, strict=True)
            ]
        return self._selected[epoch]

    def _shards(self, rank: int) -> np.ndarray:
        """The shards of ``rank``: every world-th, the same each epoch (their order is shuffled per epoch)."""
        return np.arange(rank, len(self.source), self.world)

    def _pools(self, rows: np.ndarray) -> list[np.ndarray]:
        return [rows[i : i + self.buffer_rows] for i in range(0, len(rows), self.buffer_rows)]

    def batches_per_rank(self, epoch: int = 0) -> list[int]:
        """How many batches each rank's shards give in ``epoch``."""
        selected = self.selected(epoch)
        return [
            sum(
                -(-len(pool) // self.batch_size)
                for shard in self._shards(rank)
                for pool in self._pools(selected[shard])
            )
            for rank in range(self.world)
        ]

    def steps(self, epoch: int = 0) -> int:
        """Batches in ``epoch`` on each rank: the fewest any rank has."""
        return min(self.batches_per_rank(epoch))

    def __len__(self) -> int:
        """Batches in the epoch being iterated (``at``)."""
        return self.steps(self._epoch)

    def plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """This rank's batches of ``epoch``: (shard, row indices) each."""
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        batches = []
        for shard in rng.permutation(self._shards(self.rank)):
            rows = self.selected(epoch)[shard]
            blocks = [rows[i : i + self.block_rows] for i in range(0, len(rows), self.block_rows)]
            rows = np.concatenate([blocks[b] for b in rng.permutation(len(blocks))]) if blocks else rows
            for pool in self._pools(rows):
                grouped = length_grouped_batches(self.lengths[shard][pool], self.batch_size, rng, window=len(pool))
                batches += [(int(shard), pool[b]) for b in grouped]
        return batches[: self.steps(epoch)]

    def at(self, epoch: int, start: int = 0) -> StudentStream:
        """Iterate ``epoch`` from batch ``start`` (a resumed run)."""
        self._epoch, self._start = epoch, start
        return self

    def __iter__(self) -> Iterator[Batch] | Iterator[Handed]:
        """The planned batches; in a DataLoader worker, its share of them, handed over in groups (``_Handover``)."""
        planned = self.plan(self._epoch)[self._start :]
        info = get_worker_info()
        if info is None:
            yield from self._batches(planned)
            return
        size = max(1, HANDOVER_ROWS // self.batch_size)
        groups = [planned[i : i + size] for i in range(0, len(planned), size)][info.id :: info.num_workers]
        batches, handover = self._batches([b for group in groups for b in group]), _Handover(info.id, info.num_workers)
        for group in groups:
            yield handover([next(batches) for _ in group])

    def _batches(self, planned: list[tuple[int, np.ndarray]]) -> Iterator[Batch]:
        """The ``planned`` batches, each shard read on a thread while the batches of the one before are built."""
        runs = [(shard, [rows for _, rows in group]) for shard, group in itertools.groupby(planned, key=lambda b: b[0])]
        with ThreadPoolExecutor(1) as reader:  # reads (I/O, checksums, decoding) the next shard meanwhile
            reading = self.distribution is not None
            following = reader.submit(self.source.read, runs[0][0], self.wanted, reading) if runs else None
            for i, (_, batches) in enumerate(runs):
                data = following.result()
                if i + 1 < len(runs):
                    following = reader.submit(self.source.read, runs[i + 1][0], self.wanted, reading)
                for rows in batches:
                    yield self._collate(data, rows)

    def _collate(self, teachers: list[ShardData], rows: np.ndarray) -> Batch:
        """input_ids, attention_mask (B, T), the task's columns (label: (B,) or (B, T), ...) and each
        teacher's logits (B, C) or (B, T, C), zero-padded (``teacher_key``)."""
        data = teachers[0]
        batch = collate_rows(self.collate, data.rows, rows, self.fills)
        batch[EXAMPLE_ID] = torch.from_numpy(data.rows.example_id[rows])
        if LOGITS in data.rows.columns:  # not when the teacher runs live
            length = batch["input_ids"].shape[1]
            for k, part in enumerate(teachers):
                batch[teacher_key(TEACHER_LOGITS, k)] = column_batch(part.rows, LOGITS, rows, length, 0)
        if data.distribution is not None:
            per_row = [data.example_distribution(i) for i in rows]
            starts = self.distribution.starts(data.rows.columns, len(data.rows))[rows]
            batch |= pad_distributions(per_row, batch["input_ids"].shape[1], self.distribution, starts)
        for k, name, layer in self.wanted:
            arrays = [teachers[k].example_tensor(name, layer, i) for i in rows]
            batch[tensor_key(name, layer, k)] = _pad_tensors(arrays, batch["input_ids"].shape[1], name)
        return batch

    def loader(self, epoch: int, start: int = 0, *, workers: int = 0, pin_memory: bool = False) -> Iterable[Batch]:
        """The batches of ``epoch`` from batch ``start`` through a DataLoader, in plan order for any ``workers``
        (whose batches come through ``_Handover``, and are pinned as they are taken)."""
        loader = DataLoader(self.at(epoch, start), batch_size=None, num_workers=workers,
                            pin_memory=pin_memory and not workers, prefetch_factor=PREFETCH if workers else None,
                            persistent_workers=False)  # fmt: skip
        return itertools.chain.from_iterable(map(_Taker(pin_memory), loader)) if workers else loader


def pad_distributions(
    rows: list[PerToken], longest: int, spec: SparseSpec, starts: np.ndarray
) -> dict[str, torch.Tensor]:
    """Rows' per-token distributions as batch tensors, each row's from its position in ``starts`` (B,)
    (zero before it and after the row's end), by ``distribution_key``: topk ids (B, T, k), probs (B, T, k),
    tail (B, T); sampled ids and counts (B, T, M) with M the most distinct ids of any position (counts 0
    after a position's own); dense logprobs (B, T, V)."""
    batch = len(rows)
    if spec.scheme == "sampled":
        widest = max(int(r["entries"].max()) for r in rows)
        ids = np.zeros((batch, longest, widest), np.int64)
        counts = np.zeros((batch, longest, widest), np.int64)
        for b, row in enumerate(rows):
            token = starts[b] + np.repeat(np.arange(len(row["entries"])), row["entries"])
            slot = np.arange(len(token)) - np.repeat(np.cumsum(row["entries"]) - row["entries"], row["entries"])
            ids[b, token, slot], counts[b, token, slot] = row["ids"], row["counts"]
        out = {"ids": ids, "counts": counts}
    else:
        out = {}
        for name in spec.arrays:
            first = rows[0][name]
            padded = np.zeros((batch, longest, *first.shape[1:]), dtype=np.int64 if name == "ids" else np.float32)
            for b, row in enumerate(rows):
                padded[b, starts[b] : starts[b] + len(row[name])] = row[name]
            out[name] = padded
    return {distribution_key(name): torch.from_numpy(value) for name, value in out.items()}


PREFETCH = 2  # handovers each DataLoader worker prepares ahead of the training process
HANDOVER_ROWS = 256  # a worker hands its batches over in groups of about this many rows (one batch at least)
Layout = tuple[tuple[str, torch.dtype, tuple[int, ...], int], ...]  # per batch: each tensor's key, dtype, shape, offset
Handed = tuple[int, int, torch.Tensor | None, int, tuple[Layout, ...]]  # worker, slot, the slot if new, bytes, layouts


class _Handover:
    """How a DataLoader worker hands its batches to the training process: a group of batches at a time
    (``HANDOVER_ROWS``), copied into a shared-memory slot that it reuses; only the slot's number and the
    layout cross over (a new slot once, when first used). DataLoader itself would put every tensor of
    every batch into a shared-memory file of its own, made and faulted in each time (about 1 ms a MB
    here, more than building the batch), and pass each batch through its queues.

    DataLoader gives the workers at most ``PREFETCH`` x workers groups to prepare beyond those the
    training process has taken, and that process copies each group out as it takes it (``_Taker``); so
    with that many slots per worker, plus one for the group being copied out and one spare, a slot is
    never rewritten before its group was copied out.
    """

    def __init__(self, worker: int, workers: int):
        self.worker, self.count = worker, PREFETCH * workers + 2
        self.slots: list[torch.Tensor] = []
        self.handed = 0

    def __call__(self, batches: list[Batch]) -> Handed:
        total = sum(_aligned(tensor.nbytes) for batch in batches for tensor in batch.values())
        slot = self.handed % self.count
        self.handed += 1
        new = None
        if slot == len(self.slots) or self.slots[slot].numel() < total:
            new = torch.empty(total + total // 4, dtype=torch.uint8).share_memory_()  # room for longer batches
            self.slots[slot : slot + 1] = [new]  # a new slot, or a larger one in its place
        layouts, offset = [], 0
        for batch in batches:
            layout = []
            for key, tensor in batch.items():
                self.slots[slot][offset : offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
                layout.append((key, tensor.dtype, tuple(tensor.shape), offset))
                offset += _aligned(tensor.nbytes)
            layouts.append(tuple(layout))
        return self.worker, slot, new, total, tuple(layouts)


def _aligned(nbytes: int) -> int:
    """Bytes a tensor takes in a slot: rounded up to 64, so every tensor's view starts aligned."""
    return -(-nbytes // 64) * 64


class _Taker:
    """The training process's side of ``_Handover``: each group copied out of its slot (into pinned memory
    with ``pin``), its batches' tensors views of the copy."""

    def __init__(self, pin: bool):
        self.pin, self.slots = pin, {}

    def __call__(self, handed: Handed) -> list[Batch]:
        worker, slot, new, total, layouts = handed
        if new is not None:
            self.slots[worker, slot] = new
        flat = torch.empty(total, dtype=torch.uint8, pin_memory=self.pin)
        flat.copy_(self.slots[worker, slot][:total])
        return [
            {key: flat[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
             for key, dtype, shape, offset in layout}
            for layout in layouts
        ]  # fmt: skip


def _pad_tensors(arrays: list[np.ndarray], longest: int, name: str) -> torch.Tensor:
    """Zero-pad per-example tensors, in the dtype they are read in (float16 as stored: half the bytes to
    copy, hand over and send to the device; the objective widens them there): hidden (L, H) -> (B, T, H);
    attention (h, L, L) -> (B, h, T, T)."""
    first = arrays[0]
    if name == HIDDEN:
        out = np.zeros((len(arrays), longest, first.shape[-1]), first.dtype)
        for i, a in enumerate(arrays):
            out[i, : len(a)] = a
    else:
        out = np.zeros((len(arrays), first.shape[0], longest, longest), first.dtype)
        for i, a in enumerate(arrays):
            n = a.shape[-1]
            out[i, :, :n, :n] = a
    return torch.from_numpy(out)


class LiveTeacher:
    """The teacher in eval mode, adding to each batch exactly what its cache holds: computed at the
    cache's precision, the cached attention heads, values rounded to their storage dtype (or
    quantization), padding zeroed."""

    def __init__(self, model: nn.Module, *, task: Task, tokenizer, specs: tuple[TensorSpec, ...],
                 heads: tuple[int, ...] | None, precision: torch.dtype = torch.float32,
                 sparse: SparseSpec | None = None, seed: int = 0):  # fmt: skip
        """``specs``: the tensors the cache stores; ``heads``: the teacher heads it keeps maps of (None: all);
        ``precision``: the autocast dtype the cache's values were computed at; ``sparse`` and ``seed``: how
        a causal LM cache selected its distributions (``capture.logits``)."""
        self.model, self.task, self.device, self.precision = model, task, next(model.parameters()).device, precision
        self.sparse, self.seed = sparse, seed
        self.inputs = Collator.for_model(tokenizer, model.config).inputs
        self.specs = {spec.name: spec for spec in specs}
        self.heads = list(heads) if heads is not None else None

    @torch.no_grad()
    def annotate(self, batch: dict[str, torch.Tensor], wanted: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        needs_attention = any(name == ATTENTION for name, _ in wanted)
        if needs_attention and self.model.config._attn_implementation != "eager":
            self.model.set_attn_implementation("eager")
        with autocast(self.device, self.precision):
            out = self.model(**{k: batch[k] for k in self.inputs}, output_hidden_states=True,
                             output_attentions=needs_attention)  # fmt: skip
        logits = self.task.outputs(out).float()
        if self.sparse is not None:
            batch |= to_device(self._distributions(logits, batch), self.device)
        else:
            batch[TEACHER_LOGITS] = (
                logits * _padding_zeroed(batch["attention_mask"], HIDDEN) if logits.ndim == 3 else logits
            )
        for name, layer in wanted:
            if name == HIDDEN:
                value = out.hidden_states[layer]  # (B, T, H)
            else:
                value = out.attentions[layer - 1] if self.heads is None else out.attentions[layer - 1][:, self.heads]
            value = value.float() * _padding_zeroed(batch["attention_mask"], name)
            batch[tensor_key(name, layer)] = self._as_stored(value, self.specs[name])
        return batch

    def _distributions(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch's distributions as the cache holds them: selected as at capture, stored and read back."""
        mask, spec = batch["attention_mask"], self.sparse
        start = batch[spec.start_column] if spec.start_column else None
        if spec.scheme == "dense":  # on the device: float16 as stored, zero where the cache holds none
            logprobs = teacher_probabilities(logits, spec.temperature).log().half().float()
            return {distribution_key("logprobs"): logprobs * scored(mask, start).unsqueeze(-1)}
        flat, where, positions = token_coordinates(batch[EXAMPLE_ID], mask, start)
        tokens = scored(mask, start).sum(1).cpu().numpy()
        probs = teacher_probabilities(logits.flatten(0, 1).index_select(0, flat), spec.temperature)
        selected = select_distribution(probs, spec, seed=self.seed, split="train", example_ids=where,
                                       positions=positions)  # fmt: skip
        rows = host_rows({k: v.cpu().numpy() for k, v in selected.items()}, tokens, spec)
        stored = encode_rows(rows, spec)
        read, offsets = decode_arrays(stored, spec), row_offsets(tokens, stored, spec)
        back = [
            {name: a[offsets[name][i] : offsets[name][i + 1]] for name, a in read.items()} for i in range(len(rows))
        ]
        starts = np.zeros(len(rows), np.int64) if start is None else start.cpu().numpy()
        return pad_distributions(back, mask.shape[1], spec, starts)

    def _as_stored(self, value: torch.Tensor, spec) -> torch.Tensor:
        """``value`` as the cache returns it: encoded to the stored dtype and decoded again (float16 stays float16)."""
        if spec.dtype == "float32" and spec.quantization is None:
            return value
        return torch.from_numpy(decode(encode(value.cpu().numpy(), spec), spec)).to(self.device)


def _padding_zeroed(mask: torch.Tensor, name: str) -> torch.Tensor:
    """A multiplier that zeroes padded positions, as the cache's zero padding does: (B, T, 1) or (B, 1, T, T)."""
    mask = mask.float()
    return mask[:, :, None] if name == HIDDEN else (mask[:, :, None] * mask[:, None, :])[:, None]

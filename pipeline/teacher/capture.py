"""Stage 1: run the teacher once over every split and write a self-contained teacher cache.

The cache holds all that stage 2 needs (``pipeline.contract``): the rows of train,
validation and test with the teacher's logits, its hidden states and attention maps (of
``capture.tensor_splits``), the tokenizer, the label names, the teacher's card (its config,
size, and its metrics on validation and test from the cached logits) and, when bundled,
the teacher's checkpoint.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cache_store import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    BackgroundWriter,
    CacheWriter,
    Fingerprint,
    Location,
    Manifest,
    ShardRows,
    TensorSpec,
    name_cache,
    open_cache,
)
from cache_store.distribution import DISTRIBUTION_DIR, SparseSpec
from cache_store.shard import build_shard

from ..config import CaptureConfig, ExperimentConfig, Generation, LogitsCapture
from ..contract import (
    ATTENTION,
    HIDDEN,
    SPLITS,
    TEACHER,
    TEACHER_RECORD,
    TOKENIZER,
    CacheMetadata,
    TeacherCard,
    capture_identity,
    experiment_identity,
    teacher_fingerprint,
    tokenizer_fingerprint,
    update_rows,
)
from ..data import Splits, load_splits
from ..errors import ConfigError
from ..models import count_parameters, directory_bytes, load_tokenizer
from ..runtime import ALONE, Ranks, autocast, barrier, process_group, resolve_device, resolve_precision
from ..tasks import Task
from ..tasks.causal_lm import (
    COVERED_MASS,
    TARGET_START,
    generate,
    host_rows,
    lm_samples,
    stop_ids,
)
from ..tasks.next_token import (
    COVERED,
    SPLIT_SALT,
    probabilities_and_stats,
    select_distribution,
    teacher_probabilities,
    token_coordinates,
)
from ..training import Collator, split_rows, to_device, token_budget_batches
from .train import require_teacher, teacher_task

BUNDLE_LIMIT = 1 << 30  # bundle_teacher: null bundles a teacher whose files are under 1 GiB


@dataclass(frozen=True)
class CaptureResult:
    location: Location
    key: str
    manifest: Manifest | None  # None while other writers still owe shards
    reused: bool


@dataclass(frozen=True)
class CachePlan:
    """Everything that decides a cache's content, and the key derived from it."""

    key: str
    location: Location
    teacher_path: Path
    splits: Splits
    rows: dict[str, ShardRows]  # every split's cache rows as the task encodes them, without the teacher's outputs
    teacher_fingerprint: str  # the teacher's files (weights, config, tokenizer): which teacher this is
    data_fingerprint: str  # every split's rows: token ids, lengths, example ids, labels and the task's other columns
    tokenizer_fingerprint: str  # the vocabulary the token ids refer to


def plan_cache(cfg: ExperimentConfig) -> CachePlan:
    """Load and tokenize the data, locate the teacher, and compute the cache key.

    The key chains the teacher's fingerprint (taken once, when the teacher was saved), the
    data fingerprint (every split's rows as the task encodes them: token ids, example ids,
    labels), the task, the capture settings and the format version: the weights are not
    hashed again.
    """
    cfg.require("data", "teacher", stage="teacher-cache")
    task = teacher_task(cfg)
    splits = load_splits(cfg.data, seed=cfg.seed, task=task)
    teacher_path, teacher_key = require_teacher(cfg, splits)
    tokenizer = load_tokenizer(teacher_path)
    rows = {name: task.encode(tokenizer, splits[name], cfg.data) for name in SPLITS}
    data = Fingerprint("kdcache-data").update_json("task", task.name)
    for name in SPLITS:
        update_rows(data, name, rows[name])
    # a ready-made teacher's key is its files' fingerprint; a fine-tuned one's was taken when it was saved
    teacher_fp = teacher_fingerprint(teacher_path) if cfg.teacher.fine_tune else teacher_key
    data_fp = data.hexdigest()
    fp = Fingerprint("kdcache-cache").update_json("format_version", FORMAT_VERSION)
    fp.update_json("teacher", teacher_fp).update_json("data", data_fp)
    fp.update_json("capture", capture_identity(cfg.capture))
    key = fp.hexdigest()
    location = Location(cfg.capture.cache_root) / key
    return CachePlan(key, location, teacher_path, splits, rows, teacher_fp, data_fp,
                     tokenizer_fingerprint(tokenizer))  # fmt: skip


def run_capture(cfg: ExperimentConfig, *, num_shards: int = 1, shard_index: int = 0) -> CaptureResult:
    """Capture the teacher's outputs for train, validation and test (tensors for ``capture.tensor_splits``).

    Reuses a complete cache with the same key at once, resumes a partial one from its
    committed shards, and with ``num_shards`` > 1 fills only every ``num_shards``-th shard
    from ``shard_index`` (the manifest is written by whichever writer completes the set).
    Under torchrun each rank takes its part that way, and rank 0 writes the manifest once
    every rank is done.
    """
    ranks = Ranks.from_env()
    if ranks.world > 1:
        if num_shards != 1:
            raise ConfigError("under torchrun each rank takes its part of the shards; drop --num-shards/--shard-index")
        num_shards, shard_index = ranks.world, ranks.rank
    if not 0 <= shard_index < num_shards:
        raise ConfigError(
            f"--shard-index must be in 0..{num_shards - 1} for --num-shards {num_shards}; got {shard_index}"
        )
    with process_group(ranks):
        return _capture(cfg, ranks, num_shards=num_shards, shard_index=shard_index)


def _capture(cfg: ExperimentConfig, ranks: Ranks, *, num_shards: int, shard_index: int) -> CaptureResult:
    say = print if ranks.is_main else lambda *args: None
    plan = plan_cache(cfg)
    say(plan.splits.summary())
    if plan.location.exists(MANIFEST_NAME):
        manifest = open_cache(plan.location).manifest
        if bundled(cfg, plan) and TEACHER not in manifest.attachments:
            raise ConfigError(
                f"cache {plan.key} at {plan.location} exists without the teacher's checkpoint that this config "
                "bundles; remove it (`kdcache cache rm`) to capture it again with the teacher, or set "
                "capture.bundle_teacher: false"
            )
        if ranks.is_main:
            name_cache(cfg.capture.cache_root, cfg.name, plan.key, record=experiment_identity(cfg))
        say(f"reused cache {plan.key} at {plan.location} ({manifest.rows} rows, {manifest.bytes / 1e6:.1f} MB)")
        return CaptureResult(plan.location, plan.key, manifest, reused=True)
    model = load_teacher(cfg, plan, resolve_device(cfg.device, ranks))
    return fill_cache(cfg, plan, model, ranks=ranks, num_shards=num_shards, shard_index=shard_index)


def load_teacher(cfg: ExperimentConfig, plan: CachePlan, device: torch.device):
    """The plan's teacher in eval mode on ``device``, with eager attention when attention maps are captured."""
    model = teacher_task(cfg).load_model(plan.teacher_path, attention_maps=bool(cfg.capture.attention_layers))
    return model.to(device).eval()


def fill_cache(cfg: ExperimentConfig, plan: CachePlan, model, *, ranks: Ranks = ALONE, num_shards: int = 1,
               shard_index: int = 0) -> CaptureResult:  # fmt: skip
    """Run the loaded teacher over this writer's pending shards and commit them; the manifest
    once all are present. Batches are formed and computed on the main thread while a
    background thread compresses, checksums and commits the previous shards."""
    say = print if ranks.is_main else lambda *args: None
    capture, device = cfg.capture, next(model.parameters()).device
    precision = resolve_precision(capture.precision, device)
    sparse = sparse_spec(cfg, model.config)
    writer = CacheWriter(
        plan.location,
        key=plan.key,
        columns=teacher_task(cfg).columns(model.config.num_labels),
        tensors=tensor_specs(cfg, model.config),
        distribution=sparse,
        split_rows={name: len(plan.rows[name]) for name in SPLITS},
        tensor_splits=capture.tensor_splits,
        shard_rows=capture.shard_rows,
        producer={"precision": str(precision).removeprefix("torch.")},
        metadata=cache_metadata(cfg, plan, model).to_json(),
    )
    todo = writer.pending(num_shards=num_shards, shard_index=shard_index)
    for problem in writer.damaged:
        say(f"capture: committed shard {problem}; computing it again")
    done = writer.committed_count()
    if done:
        say(f"resuming cache {plan.key}: {done} of {len(writer.tasks)} shards already committed")
    forward = teacher_forward(cfg, plan, model, precision=precision, sparse=sparse)
    written = 0  # bytes committed, counted on the writer's thread

    def count(entry) -> None:  # None: another writer committed that shard
        nonlocal written
        written += entry.bytes if entry is not None else 0

    desc = "capture" if ranks.world == 1 else f"capture (rank 0 of {ranks.world})"
    bar = tqdm(total=sum(t.row_end - t.row_start for t in todo), desc=desc, unit="ex", disable=not ranks.is_main)
    with (
        bar,
        BackgroundWriter(writer, on_commit=count) as bg,
    ):
        tokens = 0
        for task in todo:
            rows = plan.rows[task.split].take(np.arange(task.row_start, task.row_end))
            if not writer.is_committed(task):  # a writer running beside this one may have done it meanwhile
                captured = forward(rows, tensors=task.split in capture.tensor_splits, split=task.split)
                rows = captured.rows
                bg.submit(task, rows, captured.tensors, captured.distribution)
            ids = rows.input_ids
            tokens += sum(map(len, ids))
            elapsed = max(bar.format_dict["elapsed"], 1e-3)
            bar.update(len(ids))
            bar.set_postfix(split=task.split, tok_s=f"{tokens / elapsed:.0f}", MB_s=f"{written / 1e6 / elapsed:.1f}")
    if ranks.world == 1:
        manifest = finish_cache(cfg, plan, writer, model)
    else:  # every rank's shards are committed before rank 0 writes the manifest
        barrier(ranks)
        if ranks.is_main:
            manifest = finish_cache(cfg, plan, writer, model)
        else:
            writer.close()
        barrier(ranks)
        if not ranks.is_main:
            manifest = open_cache(plan.location).manifest
    if manifest is None:
        say(f"committed shards of cache {plan.key}; {writer.committed_count()} of {len(writer.tasks)} present, "
            "the manifest is written once the other writers finish")  # fmt: skip
    else:
        say(f"wrote cache {plan.key} at {plan.location} ({manifest.rows} rows, {manifest.bytes / 1e6:.1f} MB)")
    return CaptureResult(plan.location, plan.key, manifest, reused=False)


def cache_metadata(cfg: ExperimentConfig, plan: CachePlan, model) -> CacheMetadata:
    """What the manifest says of the teacher, the data and the tokenizer (metrics come at the finish)."""
    record = plan.teacher_path / TEACHER_RECORD
    history = json.loads(record.read_text()).get("history", []) if record.exists() else []
    card = TeacherCard(
        source=cfg.teacher.base_model, key=plan.teacher_path.name if cfg.teacher.fine_tune else None,
        fingerprint=plan.teacher_fingerprint, config=json.loads((plan.teacher_path / "config.json").read_text()),
        params=count_parameters(model), size_bytes=directory_bytes(plan.teacher_path), bundled=bundled(cfg, plan),
        steps=history[-1].get("steps") if history else None, metrics={},
    )  # fmt: skip
    return CacheMetadata(
        teacher=card, label_names=plan.splits["train"].label_names, max_length=cfg.data.max_length,
        data_fingerprint=plan.data_fingerprint, tokenizer_fingerprint=plan.tokenizer_fingerprint,
        dataset=cfg.data.dataset, data_report=plan.splits.dropped, capture=capture_identity(cfg.capture),
        task=teacher_task(cfg).name,
    )  # fmt: skip


def bundled(cfg: ExperimentConfig, plan: CachePlan) -> bool:
    """Whether the cache carries the teacher's checkpoint: ``capture.bundle_teacher``, or when under 1 GiB."""
    if cfg.capture.bundle_teacher is not None:
        return cfg.capture.bundle_teacher
    return directory_bytes(plan.teacher_path) < BUNDLE_LIMIT


def finish_cache(cfg: ExperimentConfig, plan: CachePlan, writer: CacheWriter, model) -> Manifest | None:
    """Once every shard is committed: the teacher's metrics on validation and test from the cached
    logits, a causal LM's greedy continuations of the prompts, the tokenizer (and, when bundled, the
    teacher) attached, the manifest, and the cache named after the experiment
    (``<cache_root>/.names/<name>.json``, with the experiment's identity). None while shards are missing."""
    if writer.committed_count() < len(writer.tasks):
        return writer.finish()
    metrics, task = {}, teacher_task(cfg)
    for split in ("validation", "test"):
        rows = ShardRows.concat(writer.committed_rows(split))
        metrics[split] = task.metrics(rows[task.outputs_column], rows, plan.splits[split].label_names)
    card = {**writer.metadata["teacher"], "metrics": metrics}
    tokenizer = load_tokenizer(plan.teacher_path)
    extra = {"teacher": card}
    if task.caches_distributions:
        rows = ShardRows.concat([r for split in cfg.capture.tensor_splits for r in writer.committed_rows(split)])
        tokens = writer.distribution.stored_tokens(rows.lengths, rows.columns)
        extra["covered_mass"] = float(np.average(rows[COVERED_MASS], weights=tokens))
        extra["samples"] = lm_samples(model, tokenizer, ShardRows.concat(writer.committed_rows("test")),
                                      plan.splits["test"].texts, prompts=cfg.capture.prompts,
                                      generation=cfg.generation)  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        attachments = {TOKENIZER: Path(folder)} | ({TEACHER: plan.teacher_path} if card["bundled"] else {})
        manifest = writer.finish(metadata=extra, attachments=attachments)
    name_cache(cfg.capture.cache_root, cfg.name, plan.key, record=experiment_identity(cfg))
    return manifest


@dataclass(frozen=True)
class CaptureEstimate:
    """What a capture will cost, extrapolated from a sample of rows."""

    rows: int
    bytes_by_output: dict[str, int]  # "rows" (ids, labels, logits) and each stored tensor
    seconds: float  # teacher forward and writing, at the sample's rate

    @property
    def bytes(self) -> int:
        return sum(self.bytes_by_output.values())


def estimate_capture(cfg: ExperimentConfig, *, sample_rows: int = 256) -> CaptureEstimate:
    """Run the teacher on evenly spaced rows, store them as one shard in a temporary
    directory, and scale each output's bytes and the time by what the full capture holds.

    Rows scale by count; each tensor by its element count (tokens for hidden states,
    squared tokens for attention maps) in the splits that store it, so the estimate follows
    the real length mix.
    """
    plan = plan_cache(cfg)
    device = resolve_device(cfg.device)
    model = load_teacher(cfg, plan, device)
    task = teacher_task(cfg)
    sparse = sparse_spec(cfg, model.config)
    forward = teacher_forward(cfg, plan, model, precision=resolve_precision(cfg.capture.precision, device),
                              sparse=sparse)  # fmt: skip
    specs = tensor_specs(cfg, model.config)
    every = ShardRows.concat([plan.rows[name] for name in SPLITS])
    lengths = every.lengths
    stored_lengths = np.concatenate([plan.rows[name].lengths for name in cfg.capture.tensor_splits])
    index = np.unique(np.linspace(0, len(every) - 1, min(sample_rows, len(every))).astype(int))
    rows = every.take(index)
    start = time.perf_counter()
    captured = forward(rows, split="train")
    rows = captured.rows
    with tempfile.TemporaryDirectory() as staging:
        build_shard(Path(staging), rows, captured.tensors, {s.name: s for s in specs}, relative_path="estimate",
                    row_start=0, columns=task.columns(model.config.num_labels), distribution=captured.distribution,
                    sparse=sparse)  # fmt: skip
        seconds = time.perf_counter() - start
        files = {str(p.relative_to(staging)): p.stat().st_size for p in Path(staging).rglob("*") if p.is_file()}
    scaled = {"rows": sum(b for n, b in files.items() if not n.startswith("tensors.zarr/")) * len(every) / len(rows)}
    for spec in specs:
        stored = sum(b for n, b in files.items() if n.startswith(f"tensors.zarr/{spec.name}/"))
        elements = spec.offsets(stored_lengths)[-1] / spec.offsets(lengths[index])[-1]
        scaled[spec.name] = stored * elements
    if sparse is not None:  # per token, in the splits that store it
        stored = sum(b for n, b in files.items() if n.startswith(f"tensors.zarr/{DISTRIBUTION_DIR}/"))
        scaled[DISTRIBUTION_DIR] = stored * stored_lengths.sum() / lengths[index].sum()
    tokens = lengths.sum() / lengths[index].sum()
    return CaptureEstimate(len(every), {k: int(v) for k, v in scaled.items()}, seconds * tokens)


def sparse_spec(cfg: ExperimentConfig, model_config) -> SparseSpec | None:
    """How a causal LM's cache stores the teacher's next-token distributions (None for other tasks)."""
    if not teacher_task(cfg).caches_distributions:
        return None
    logits = cfg.capture.logits or LogitsCapture()
    return SparseSpec(logits.scheme, vocab_size=model_config.vocab_size, temperature=logits.temperature,
                      k=logits.k if logits.scheme == "topk" else None,
                      draws=logits.draws if logits.scheme == "sampled" else None, start_column=TARGET_START)  # fmt: skip


def tensor_specs(cfg: ExperimentConfig, model_config) -> list[TensorSpec]:
    """The ragged tensors a cache stores, checked against the teacher's depth."""
    depth, capture = model_config.num_hidden_layers, cfg.capture
    for what, layers, low in (
        ("hidden_layers", capture.hidden_layers, 0),
        ("attention_layers", capture.attention_layers, 1),
    ):
        bad = [layer for layer in layers if not low <= layer <= depth]
        if bad:
            raise ConfigError(f"capture.{what} {list(layers)}: {bad} outside {low}..{depth} for this teacher")
    specs = []
    if capture.hidden_layers:
        shape = ("L", model_config.hidden_size)
        specs.append(TensorSpec(HIDDEN, tuple(capture.hidden_layers), shape, dtype=capture.hidden_dtype))
    heads = model_config.num_attention_heads
    if capture.attention_heads is not None and max(capture.attention_heads) >= heads:
        raise ConfigError(
            f"capture.attention_heads {list(capture.attention_heads)}: this teacher has heads 0..{heads - 1}"
        )
    if capture.attention_layers:
        shape = (len(capture.attention_heads or range(heads)), "L", "L")
        specs.append(
            TensorSpec(
                ATTENTION,
                tuple(capture.attention_layers),
                shape,
                dtype=capture.attention_dtype,
                quantization=capture.attention_quantization,
            )
        )
    return specs


def teacher_forward(cfg: ExperimentConfig, plan: CachePlan, model, *, precision: torch.dtype,
                    sparse: SparseSpec | None) -> TeacherForward:  # fmt: skip
    """The plan's teacher computing what its cache stores, answering prompts first for a sequence-level cache."""
    tokenizer = load_tokenizer(plan.teacher_path)
    return TeacherForward(model, teacher_task(cfg), Collator.for_model(tokenizer, model.config), cfg.capture,
                          device=next(model.parameters()).device, precision=precision, sparse=sparse,
                          generation=cfg.generation,
                          stops=stop_ids(model, tokenizer) if cfg.generation else ())  # fmt: skip


class TeacherForward:
    """The teacher's outputs for a window of rows (a shard), unpadded and in row order.

    Rows are length-sorted and cut into batches under a row and padded-token budget
    (``token_budget_batches``), so the batches, and therefore the values, depend only on
    the window's rows and the two limits: never on which process or rank computes it.
    Outputs are reduced on the device before they are copied back: padding dropped,
    only the configured layers and heads kept, hidden states cast to their storage dtype,
    a causal LM's distributions selected (top-k, sampled or dense: ``sparse``) from each row's
    first scored position. With ``generation`` the rows are prompts: the teacher answers each
    first (``answer``), and the outputs are those of prompt + answer.
    """

    def __init__(self, model, task: Task, collate: Collator, capture: CaptureConfig, *, device: torch.device,
                 precision: torch.dtype, sparse: SparseSpec | None = None, generation: Generation | None = None,
                 stops: list[int] = ()):  # fmt: skip
        self.model, self.task, self.collate, self.capture = model, task, collate, capture
        self.device, self.precision, self.sparse = device, precision, sparse
        self.generation, self.stops = generation, list(stops)
        self.hidden_dtype = torch.float16 if capture.hidden_dtype == "float16" else torch.float32
        self.attention_dtype = torch.float16 if capture.attention_dtype == "float16" else torch.float32
        self.heads = list(capture.attention_heads) if capture.attention_heads is not None else None

    @torch.inference_mode()
    def answer(self, rows: ShardRows, split: str) -> ShardRows:
        """``rows`` of prompts, each followed by the teacher's answer. Prompts are batched as the forward
        pass batches rows (``token_budget_batches``, counting each answer's tokens), and a sampled
        batch is seeded by the generation seed, the split and its first row's example id: the answers
        depend on the rows, the limits and the seed only."""
        gen, prompts = self.generation, rows.input_ids
        answered = [None] * len(rows)
        for index in token_budget_batches(rows.lengths + gen.max_new_tokens, max_rows=self.capture.batch_size,
                                          max_tokens=self.capture.batch_tokens):  # fmt: skip
            seed = (gen.seed * 1_000_003 + SPLIT_SALT[split]) * 1_000_003 + int(rows.example_id[index[0]])
            with autocast(self.device, self.precision):
                answers = generate(self.model, [prompts[i] for i in index], pad_id=self.collate.pad_id,
                                   stops=self.stops, max_new_tokens=gen.max_new_tokens, sample=gen.sample,
                                   temperature=gen.temperature, top_p=gen.top_p, seed=seed % 2**63)  # fmt: skip
            for i, answer in zip(index, answers, strict=True):
                answered[i] = np.concatenate([prompts[i], answer]).astype(prompts[i].dtype)
        return ShardRows(rows.example_id, answered, dict(rows.columns))

    @torch.inference_mode()
    def __call__(self, rows: ShardRows, *, tensors: bool = True, split: str = "train") -> Captured:
        """The teacher's outputs for ``rows`` (tensors and distributions only with ``tensors``: a split that
        stores rows only gets none)."""
        if self.generation is not None:
            rows = self.answer(rows, split)
        capture, n, ids = self.capture, len(rows), rows.input_ids
        hidden_layers = capture.hidden_layers if tensors else ()
        attention_layers = capture.attention_layers if tensors else ()
        sparse = self.sparse if tensors else None
        lengths = rows.lengths
        starts = self.sparse.starts(rows.columns, n) if self.sparse is not None else None
        stored = lengths - starts if starts is not None else None  # a causal LM's positions with a distribution
        outputs = [None] * n
        distribution = [None] * n if sparse is not None else None
        covered = np.zeros(n, np.float32)  # a causal LM's: each row's mean mass of its stored distributions
        out_tensors = {(HIDDEN, k): [None] * n for k in hidden_layers}
        out_tensors |= {(ATTENTION, k): [None] * n for k in attention_layers}
        copies = []  # (rows, host tensors): device-to-host copies that may still be in flight
        for index in token_budget_batches(lengths, max_rows=capture.batch_size, max_tokens=capture.batch_tokens):
            batch = to_device(self.collate([ids[i] for i in index]), self.device)
            with autocast(self.device, self.precision):
                out = self.model(
                    **batch,
                    output_hidden_states=bool(hidden_layers),
                    output_attentions=bool(attention_layers),
                )
            real = batch["attention_mask"].flatten().nonzero().squeeze(1)  # the B*T positions that are tokens
            logits = self.task.outputs(out).float()  # (B, C), or (B, T, C) per token
            if self.sparse is None:
                kept = {"outputs": self.task.batch_outputs(logits, batch, real)}
            else:  # a causal LM: its block sums, and the distributions from the same probabilities
                temperature = self.sparse.temperature
                tempered = None if temperature == 1 else teacher_probabilities(logits, temperature)
                start = torch.from_numpy(starts[index]).to(self.device)
                probs, stats = probabilities_and_stats(logits, batch["input_ids"], batch["attention_mask"], start)
                kept = {"outputs": stats.float()}
            if sparse is not None:
                flat = (probs if tempered is None else tempered).flatten(0, 1)  # (B*T, V)
                keep, where, positions = token_coordinates(torch.from_numpy(rows.example_id[index]).to(self.device),
                                                           batch["attention_mask"], start)  # fmt: skip
                if len(keep) < len(flat):  # padding, a prompt: keep the positions the cache stores
                    flat = flat.index_select(0, keep)
                selected = select_distribution(flat, sparse, seed=capture_seed(capture), split=split,
                                               example_ids=where, positions=positions)  # fmt: skip
                kept |= {f"distribution/{name}": value for name, value in selected.items()}  # (tokens, ...)
            if hidden_layers:
                kept[HIDDEN] = torch.stack(
                    [out.hidden_states[k].flatten(0, 1).index_select(0, real) for k in hidden_layers]
                ).to(self.hidden_dtype)  # (K, tokens, H), row after row
            for k in attention_layers:
                maps = out.attentions[k - 1] if self.heads is None else out.attentions[k - 1][:, self.heads]
                kept[(ATTENTION, k)] = maps.to(self.attention_dtype)  # (B, heads, T, T)
            copies.append((index, {name: t.to("cpu", non_blocking=True) for name, t in kept.items()}))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the host copies are complete from here on
        for index, host in copies:
            bounds = np.concatenate([[0], np.cumsum(lengths[index])])
            per_row = split_rows(host["outputs"].numpy(), lengths[index], self.task.outputs_per_token)
            for i, value in zip(index, per_row, strict=True):
                outputs[i] = value
            if sparse is not None:
                selected = {name.removeprefix("distribution/"): t.numpy() for name, t in host.items()
                            if isinstance(name, str) and name.startswith("distribution/")}  # fmt: skip
                first = np.concatenate([[0], np.cumsum(stored[index])])
                for row, (i, part) in enumerate(zip(index, host_rows(selected, stored[index], sparse), strict=True)):
                    distribution[i] = part
                    covered[i] = selected[COVERED][first[row] : first[row + 1]].mean()
            if hidden_layers:
                packed = host[HIDDEN].numpy()
                for j, k in enumerate(hidden_layers):
                    for row, i in enumerate(index):
                        out_tensors[(HIDDEN, k)][i] = packed[j, bounds[row] : bounds[row + 1]]
            for k in attention_layers:
                maps = host[(ATTENTION, k)].numpy()
                for row, i in enumerate(index):
                    out_tensors[(ATTENTION, k)][i] = maps[row, :, : lengths[i], : lengths[i]]
        columns = {self.task.outputs_column: outputs if self.task.outputs_per_token else np.stack(outputs)}
        if self.sparse is not None:
            columns[COVERED_MASS] = covered
        return Captured(ShardRows(rows.example_id, ids, rows.columns | columns), distribution, out_tensors)


@dataclass(frozen=True)
class Captured:
    """A window's teacher outputs, per row in row order."""

    rows: ShardRows  # the rows (a prompt followed by the teacher's answer) with the columns the teacher fills:
    # the task's outputs column ((N, C), or N arrays (L_i, C) per token; a causal LM's block sums) and a causal
    # LM's covered mass
    distribution: list[dict[str, np.ndarray]] | None  # a causal LM's per-token distributions (cache_store layout)
    tensors: dict[tuple[str, int], list[np.ndarray]]  # (tensor, layer) -> N arrays


def capture_seed(capture: CaptureConfig) -> int:
    return (capture.logits or LogitsCapture()).seed

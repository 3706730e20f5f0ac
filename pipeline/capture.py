"""Stage 1: run the teacher once over the data and write its outputs into a cache."""

from __future__ import annotations

import dataclasses
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
    CacheWriter,
    Fingerprint,
    Location,
    Manifest,
    ShardRows,
    TensorSpec,
    open_cache,
)
from cache_store.shard import build_shard

from .config import ConfigError, ExperimentConfig
from .data import TextData, load_splits, tokenize
from .models import load_classifier, load_tokenizer, model_files
from .teacher import require_teacher
from .training import pad_ids

CAPTURED_SPLITS = ("train", "validation")
HIDDEN, ATTENTION = "hidden_states", "attentions"


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
    splits: dict[str, TextData]
    token_ids: dict[str, list[np.ndarray]]
    data_fingerprint: str  # token ids, lengths, labels and example ids of the captured splits
    tokenizer_fingerprint: str  # the vocabulary the token ids refer to


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what token ids mean: the vocabulary and the special tokens (not the file format)."""
    fp = Fingerprint("kdcache-tokenizer").update_json("vocab", tokenizer.get_vocab())
    return fp.update_json("special", tokenizer.all_special_tokens).hexdigest()


def plan_cache(cfg: ExperimentConfig) -> CachePlan:
    """Load and tokenize the data, locate the teacher, and compute the cache key.

    The key hashes the teacher's files (weights, config, tokenizer), the token ids, labels
    and example ids of every captured split, the capture settings and the format version.
    """
    splits = load_splits(cfg.data, seed=cfg.seed)
    teacher_path, _ = require_teacher(cfg, splits)
    tokenizer = load_tokenizer(teacher_path)
    token_ids = {name: tokenize(tokenizer, splits[name], max_length=cfg.data.max_length) for name in CAPTURED_SPLITS}
    data = Fingerprint("kdcache-data")
    for name in CAPTURED_SPLITS:
        ids = token_ids[name]
        data.update_array(f"{name}/ids", np.concatenate(ids)).update_array(f"{name}/lengths", [len(x) for x in ids])
        data.update_array(f"{name}/labels", splits[name].labels)
        data.update_array(f"{name}/example_id", splits[name].example_id)
    data_fp = data.hexdigest()
    fp = Fingerprint("kdcache-cache").update_json("format_version", FORMAT_VERSION)
    fp.update_files("teacher", teacher_path, model_files(teacher_path)).update_json("data", data_fp)
    fp.update_json("capture", {**dataclasses.asdict(cfg.capture), "cache_root": None, "precision": "float32"})
    key = fp.hexdigest()
    location = Location(cfg.capture.cache_root) / key
    return CachePlan(key, location, teacher_path, splits, token_ids, data_fp, tokenizer_fingerprint(tokenizer))


def run_capture(cfg: ExperimentConfig, *, num_shards: int = 1, shard_index: int = 0) -> CaptureResult:
    """Capture the teacher's logits, hidden states and attention maps for the train and validation splits.

    Reuses a complete cache with the same key at once, resumes a partial one from its
    committed shards, and with ``num_shards`` > 1 fills only every ``num_shards``-th shard
    from ``shard_index`` (the manifest is written by whichever writer completes the set).
    """
    if not 0 <= shard_index < num_shards:
        raise ConfigError(
            f"--shard-index must be in 0..{num_shards - 1} for --num-shards {num_shards}; got {shard_index}"
        )
    plan = plan_cache(cfg)
    if plan.location.exists(MANIFEST_NAME):
        manifest = open_cache(plan.location).manifest
        print(f"reused cache {plan.key} at {plan.location} ({manifest.rows} rows, {manifest.bytes / 1e6:.1f} MB)")
        return CaptureResult(plan.location, plan.key, manifest, reused=True)
    capture = cfg.capture
    model = load_classifier(plan.teacher_path, attention_maps=bool(capture.attention_layers))
    model.eval()
    writer = CacheWriter(
        plan.location,
        key=plan.key,
        num_labels=model.config.num_labels,
        tensors=tensor_specs(cfg, model.config),
        split_rows={name: len(plan.token_ids[name]) for name in CAPTURED_SPLITS},
        shard_rows=capture.shard_rows,
        metadata={
            "teacher": str(plan.teacher_path),
            "dataset": cfg.data.dataset,
            "label_names": list(plan.splits["train"].label_names),
            "max_length": cfg.data.max_length,
            "data_fingerprint": plan.data_fingerprint,
            "tokenizer_fingerprint": plan.tokenizer_fingerprint,
            "capture": {**dataclasses.asdict(capture), "cache_root": None},
        },
    )
    done = writer.committed_count()
    if done:
        print(f"resuming cache {plan.key}: {done} of {len(writer.tasks)} shards already committed")
    todo = list(writer.pending(num_shards=num_shards, shard_index=shard_index))
    pad_id = load_tokenizer(plan.teacher_path).pad_token_id
    with tqdm(total=sum(t.row_end - t.row_start for t in todo), desc="capture", unit="ex") as bar:
        tokens = 0
        for task in todo:
            rows = slice(task.row_start, task.row_end)
            ids, data = plan.token_ids[task.split][rows], plan.splits[task.split]
            if not writer.is_committed(task):  # a writer running beside this one may have done it meanwhile
                logits, tensors = _teacher_outputs(model, ids, pad_id, cfg)
                writer.write_shard(task, ShardRows(data.example_id[rows], ids, data.labels[rows], logits), tensors)
            tokens += sum(map(len, ids))
            bar.update(len(ids))
            bar.set_postfix(split=task.split, tok_s=f"{tokens / max(bar.format_dict['elapsed'], 1e-3):.0f}")
    manifest = writer.finish()
    if manifest is None:
        print(f"committed shards of cache {plan.key}; {writer.committed_count()} of {len(writer.tasks)} present, "
              "the manifest is written once the other writers finish")  # fmt: skip
    else:
        print(f"wrote cache {plan.key} at {plan.location} ({manifest.rows} rows, {manifest.bytes / 1e6:.1f} MB)")
    return CaptureResult(plan.location, plan.key, manifest, reused=False)


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
    squared tokens for attention maps), so the estimate follows the real length mix.
    """
    plan = plan_cache(cfg)
    model = load_classifier(plan.teacher_path, attention_maps=bool(cfg.capture.attention_layers)).eval()
    specs = tensor_specs(cfg, model.config)
    ids = [x for name in CAPTURED_SPLITS for x in plan.token_ids[name]]
    lengths = np.array([len(x) for x in ids])
    index = np.unique(np.linspace(0, len(ids) - 1, min(sample_rows, len(ids))).astype(int))
    sample = [ids[i] for i in index]
    start = time.perf_counter()
    logits, tensors = _teacher_outputs(model, sample, load_tokenizer(plan.teacher_path).pad_token_id, cfg)
    with tempfile.TemporaryDirectory() as staging:
        rows = ShardRows(index.astype(np.int64), sample, np.zeros(len(sample), np.int64), logits)
        build_shard(Path(staging), rows, tensors, {s.name: s for s in specs}, num_labels=model.config.num_labels,
                    relative_path="estimate", row_start=0)  # fmt: skip
        seconds = time.perf_counter() - start
        files = {str(p.relative_to(staging)): p.stat().st_size for p in Path(staging).rglob("*") if p.is_file()}
    scaled = {"rows": sum(b for n, b in files.items() if not n.startswith("tensors.zarr/")) * len(ids) / len(sample)}
    for spec in specs:
        stored = sum(b for n, b in files.items() if n.startswith(f"tensors.zarr/{spec.name}/"))
        elements = spec.offsets(lengths)[-1] / spec.offsets(lengths[index])[-1]
        scaled[spec.name] = stored * elements
    tokens = lengths.sum() / lengths[index].sum()
    return CaptureEstimate(len(ids), {k: int(v) for k, v in scaled.items()}, seconds * tokens)


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
    if capture.attention_layers:
        shape = (model_config.num_attention_heads, "L", "L")
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


@torch.inference_mode()
def _teacher_outputs(model, ids: list[np.ndarray], pad_id: int, cfg: ExperimentConfig):
    """Logits (N, C) and unpadded per-example tensors for one shard, batched by length."""
    capture = cfg.capture
    order = np.argsort([len(x) for x in ids], kind="stable")  # short rows together: little padding
    logits = np.zeros((len(ids), model.config.num_labels), np.float32)
    tensors = {(HIDDEN, k): [None] * len(ids) for k in capture.hidden_layers}
    tensors |= {(ATTENTION, k): [None] * len(ids) for k in capture.attention_layers}
    for start in range(0, len(order), capture.batch_size):
        index = order[start : start + capture.batch_size]
        input_ids, mask = pad_ids([ids[i] for i in index], pad_id)
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            output_hidden_states=bool(capture.hidden_layers),
            output_attentions=bool(capture.attention_layers),
        )
        logits[index] = out.logits.float().numpy()  # (B, C)
        for row, i in enumerate(index):
            n = len(ids[i])
            for k in capture.hidden_layers:
                tensors[(HIDDEN, k)][i] = out.hidden_states[k][row, :n].numpy()  # (L, H)
            for k in capture.attention_layers:
                tensors[(ATTENTION, k)][i] = out.attentions[k - 1][row, :, :n, :n].numpy()  # (heads, L, L)
    return logits, tensors

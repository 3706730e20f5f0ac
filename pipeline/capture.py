"""Stage 1: run the teacher once over the data and write its outputs into a cache."""

from __future__ import annotations

import dataclasses
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
    Manifest,
    ShardRows,
    TensorSpec,
    read_manifest,
)

from .config import ConfigError, ExperimentConfig
from .data import TextData, load_splits, tokenize
from .models import load_classifier, load_tokenizer, model_files
from .teacher import require_teacher
from .training import pad_ids

CAPTURED_SPLITS = ("train", "validation")
HIDDEN, ATTENTION = "hidden_states", "attentions"


@dataclass(frozen=True)
class CaptureResult:
    path: Path
    manifest: Manifest
    reused: bool


@dataclass(frozen=True)
class CachePlan:
    """Everything that decides a cache's content, and the key derived from it."""

    key: str
    path: Path
    teacher_path: Path
    splits: dict[str, TextData]
    token_ids: dict[str, list[np.ndarray]]


def plan_cache(cfg: ExperimentConfig) -> CachePlan:
    """Load and tokenize the data, locate the teacher, and compute the cache key.

    The key hashes the teacher's files (weights, config, tokenizer), the token ids, labels
    and example ids of every captured split, the capture settings and the format version.
    """
    splits = load_splits(cfg.data, seed=cfg.seed)
    teacher_path, _ = require_teacher(cfg, splits)
    tokenizer = load_tokenizer(teacher_path)
    token_ids = {name: tokenize(tokenizer, splits[name], max_length=cfg.data.max_length) for name in CAPTURED_SPLITS}
    fp = Fingerprint("kdcache-cache").update_json("format_version", FORMAT_VERSION)
    fp.update_files("teacher", teacher_path, model_files(teacher_path))
    for name in CAPTURED_SPLITS:
        ids = token_ids[name]
        fp.update_array(f"{name}/ids", np.concatenate(ids)).update_array(f"{name}/lengths", [len(x) for x in ids])
        fp.update_array(f"{name}/labels", splits[name].labels).update_array(
            f"{name}/example_id", splits[name].example_id
        )
    fp.update_json("capture", {**dataclasses.asdict(cfg.capture), "cache_root": None, "precision": "float32"})
    key = fp.hexdigest()
    return CachePlan(key, Path(cfg.capture.cache_root) / key, teacher_path, splits, token_ids)


def run_capture(cfg: ExperimentConfig) -> CaptureResult:
    """Capture the teacher's logits, hidden states and attention maps for the train and validation splits.

    Reuses a complete cache with the same key at once.
    """
    plan = plan_cache(cfg)
    if (plan.path / MANIFEST_NAME).exists():
        manifest = read_manifest(plan.path)
        print(f"reused cache {plan.key} at {plan.path} ({manifest.rows} rows, {manifest.bytes / 1e6:.1f} MB)")
        return CaptureResult(plan.path, manifest, reused=True)
    capture = cfg.capture
    model = load_classifier(plan.teacher_path, attention_maps=bool(capture.attention_layers))
    model.eval()
    specs = tensor_specs(cfg, model.config)
    writer = CacheWriter(
        plan.path,
        key=plan.key,
        num_labels=model.config.num_labels,
        tensors=specs,
        metadata={
            "teacher": str(plan.teacher_path),
            "dataset": cfg.data.dataset,
            "label_names": list(plan.splits["train"].label_names),
            "max_length": cfg.data.max_length,
            "capture": dataclasses.asdict(capture),
        },
    )
    pad_id = load_tokenizer(plan.teacher_path).pad_token_id
    for name in CAPTURED_SPLITS:
        ids, data = plan.token_ids[name], plan.splits[name]
        with tqdm(total=len(ids), desc=f"capture {name}", unit="ex") as bar:
            for start in range(0, len(ids), capture.shard_rows):
                rows = slice(start, start + capture.shard_rows)
                logits, tensors = _teacher_outputs(model, ids[rows], pad_id, cfg)
                shard_rows = ShardRows(data.example_id[rows], ids[rows], data.labels[rows], logits)
                writer.write_shard(name, shard_rows, tensors)
                bar.update(len(shard_rows))
                bar.set_postfix(tok_s=f"{sum(map(len, ids[: rows.stop])) / bar.format_dict['elapsed']:.0f}")
    manifest = writer.finish()
    print(f"wrote cache {plan.key} at {plan.path} ({manifest.rows} rows, {manifest.bytes / 1e6:.1f} MB)")
    return CaptureResult(plan.path, manifest, reused=False)


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
        specs.append(TensorSpec(ATTENTION, tuple(capture.attention_layers), shape, dtype=capture.attention_dtype))
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

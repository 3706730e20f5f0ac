"""What the teacher stage and the student stage share: a teacher cache, and the names in it.

Stage 1 (``pipeline.teacher``) writes a teacher cache; stage 2 (``pipeline.student``)
reads nothing else, and neither imports the other. Both import this module, which says
what a teacher cache holds beyond its format (``cache_store``): the splits, the tensor
names, the attachments, and the metadata that names the teacher, the data and the
tokenizer, so that a colleague with only the cache's URL can distill from it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cache_store import CacheFormatError, Fingerprint, Manifest, ShardRows

from .config import CaptureConfig, ExperimentConfig, load_dataset_spec, resolve_location
from .models import model_files

SPLITS = ("train", "validation", "test")  # every teacher cache holds all three
HIDDEN, ATTENTION = "hidden_states", "attentions"  # the ragged tensors, by layer
TOKENIZER, TEACHER = "tokenizer", "teacher"  # attachments: the tokenizer's files, the teacher's checkpoint
TEACHER_RECORD = "teacher.json"  # beside a fine-tuned teacher's weights: its key, fingerprint and epochs
TEACHER_LOGITS = "teacher_logits"  # the batch key of the teacher's logits (the rows' other columns keep their names)
EXAMPLE_ID = "example_id"  # the batch key of each row's example id


def distribution_key(name: str) -> str:
    """The batch key of an array of the teacher's per-token distributions: ``teacher_distribution/ids``."""
    return f"teacher_distribution/{name}"


def tensor_key(name: str, layer: int, teacher: int = 0) -> str:
    """The batch key of a teacher tensor: ``hidden_states/3``; of the ``teacher``-th of several, ``teacher2/hidden_states/3``."""
    return teacher_key(f"{name}/{layer}", teacher)


def teacher_key(key: str, teacher: int) -> str:
    """The batch key of what the ``teacher``-th of several teachers gives under ``key`` (the first's keeps it)."""
    return key if teacher == 0 else f"teacher{teacher}/{key}"


def update_rows(fp: Fingerprint, name: str, rows: ShardRows) -> Fingerprint:
    """Add rows' token ids, lengths, example ids and every column (arrays by bytes, text as JSON)."""
    fp.update_array(f"{name}/ids", np.concatenate(rows.input_ids) if len(rows) else np.zeros(0, np.int32))
    fp.update_array(f"{name}/lengths", rows.lengths).update_array(f"{name}/example_id", rows.example_id)
    for column, value in sorted(rows.columns.items()):
        if isinstance(value, np.ndarray):
            fp.update_array(f"{name}/{column}", value)
        elif value and isinstance(value[0], np.ndarray):
            fp.update_array(f"{name}/{column}", np.concatenate([v.reshape(-1) for v in value]))
            fp.update_array(f"{name}/{column}/shapes", np.array([v.shape for v in value]))
        else:
            fp.update_json(f"{name}/{column}", value)
    return fp


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what token ids mean: the vocabulary and the special tokens (not the file format)."""
    fp = Fingerprint("kdcache-tokenizer").update_json("vocab", tokenizer.get_vocab())
    return fp.update_json("special", tokenizer.all_special_tokens).hexdigest()


def files_fingerprint(directory: Path) -> str:
    """A hash of a model directory's files (weights, config, tokenizer), its teacher record aside."""
    names = [name for name in model_files(directory) if name != TEACHER_RECORD]
    return Fingerprint("kdcache-teacher-files").update_files("teacher", directory, names).hexdigest()


def teacher_fingerprint(directory: Path) -> str:
    """Which teacher a directory holds: the fingerprint its record took when it was saved, else its files' hash."""
    record = Path(directory) / TEACHER_RECORD
    if record.exists():
        fingerprint = json.loads(record.read_text()).get("fingerprint")
        if fingerprint:
            return fingerprint
    return files_fingerprint(Path(directory))


def capture_identity(capture: CaptureConfig) -> dict:
    """The capture settings that decide a cache's content: all but where it lives, how rows are
    batched and whether the teacher's checkpoint travels with it.

    Precision is hashed as configured, so a machine without the capture's device (a
    colleague's laptop) computes the same key. What ``auto`` resolved to is recorded in
    every shard's entry, and resuming a cache with another precision is refused.
    """
    settings = dataclasses.asdict(capture)
    for name in ("cache_root", "batch_size", "batch_tokens", "bundle_teacher"):
        del settings[name]
    return settings


def experiment_identity(cfg: ExperimentConfig) -> dict:
    """The config sections a cache was made from, and the size and modification time of each data
    file (as Hugging Face datasets fingerprints local files): kept with the cache's name (not in
    its manifest, which holds nothing that varies between machines), and compared when stage 2
    finds the cache by the experiment's name, without reading the data."""
    spec = load_dataset_spec(cfg.data.dataset)
    files = {}
    for path in spec.paths():
        resolved = Path(resolve_location(path))
        if resolved.exists():
            stat = resolved.stat()
            files[path] = [stat.st_size, stat.st_mtime_ns]
    teacher = {k: v for k, v in dataclasses.asdict(cfg.teacher).items() if k not in ("output_root", "checkpoint_steps")}
    return {
        "seed": cfg.seed,
        "data": dataclasses.asdict(cfg.data),
        "dataset": dataclasses.asdict(spec),
        "files": files,
        "teacher": teacher,
        "capture": capture_identity(cfg.capture),
    }


@dataclass(frozen=True)
class TeacherCard:
    """The teacher a cache was written by: enough to rate students against it without its weights."""

    source: str  # teacher.base_model as the config named it (a path, a Hub id, pkg://...)
    key: str | None  # its teacher key when fine-tuned from ``source`` (None: ``source`` used as it is)
    fingerprint: str  # hash of its files (weights, config, tokenizer): which teacher this is
    config: dict  # its Hugging Face config (model type, depth, width, heads, labels)
    params: int
    size_bytes: int  # its checkpoint on disk
    bundled: bool  # its checkpoint is the cache's ``teacher`` attachment
    steps: int | None  # optimizer steps of its fine-tuning (None: used as it was)
    metrics: dict[str, dict[str, float]]  # validation, test -> the task's metrics of the cached logits


@dataclass(frozen=True)
class CacheMetadata:
    """What a teacher cache's manifest records beyond the format: written by capture, read by distill."""

    teacher: TeacherCard
    label_names: tuple[str, ...]
    max_length: int
    data_fingerprint: str  # token ids, lengths, labels and example ids of every split
    tokenizer_fingerprint: str  # the vocabulary the token ids refer to
    dataset: str  # the dataset definition it was made from
    data_report: dict[str, dict[str, int]]  # split (or "data set": before splitting) -> rows dropped, by reason
    capture: dict  # the capture settings that decide its content (capture_identity)
    task: str  # the task the teacher was captured for: what it emits per example (pipeline.tasks)
    samples: tuple[dict, ...] = ()  # a causal LM's prompts and the teacher's continuations or answers, each
    # {"prompt", "prompt_ids", "new_tokens", "continuation"} (pipeline.tasks.causal_lm.lm_samples)
    covered_mass: float | None = None  # a causal LM's: the mean probability mass its stored distributions cover

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> CacheMetadata:
        """Raises CacheFormatError when the manifest is not a teacher cache's."""
        raw = manifest.metadata
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in raw]
        if missing or not isinstance(raw.get("teacher"), dict):
            raise CacheFormatError(
                f"cache {manifest.key} is not a kdcache teacher cache (no {missing} in its metadata)"
            )
        try:
            values = {f.name: raw[f.name] for f in dataclasses.fields(cls)}
            return cls(**{**values, "teacher": TeacherCard(**raw["teacher"]), "label_names": tuple(raw["label_names"]),
                          "samples": tuple(raw["samples"])})  # fmt: skip
        except TypeError as e:
            raise CacheFormatError(f"cache {manifest.key}: malformed teacher metadata ({e})") from None

    @property
    def teacher_name(self) -> str:
        """The teacher as the report names it: ``pkg://.../model`` or ``32247e71 (fine-tuned pkg://.../model)``."""
        card = self.teacher
        return card.source if card.key is None else f"{card.key} (fine-tuned {card.source})"

    @property
    def stored_heads(self) -> tuple[int, ...] | None:
        """The teacher's attention heads the cache holds maps of (None: all of them)."""
        heads = self.capture.get("attention_heads")
        return tuple(heads) if heads is not None else None

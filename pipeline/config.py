"""Experiment configuration: frozen dataclasses with every default in one place, read from YAML.

Relative paths in a config are relative to the working directory (the repository root
when run through make). ``pkg://PACKAGE/path`` names a file inside an installed Python
package, which is how the embedded demo finds its packaged model and data.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cache_store.manifest import DTYPES, QUANTIZATIONS

from .errors import ConfigError
from .tasks import TASKS

PACKAGE_SCHEME = "pkg://"


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


PRECISION_NAMES = ("auto", "float32", "bfloat16", "float16")  # auto: bfloat16 (or float16) on CUDA, float32 on CPU


def _check_precision(section: str, value: str) -> None:
    _check(value in PRECISION_NAMES, f"{section}.precision must be one of {list(PRECISION_NAMES)}; got {value!r}")


@dataclass(frozen=True)
class SplitSources:
    """Where each split comes from: a file or glob each, or a split name of a saved or hub data set.

    A split given no source is cut at random from train (``data.test_size``, ``data.validation_size``).
    """

    train: str | None = None
    validation: str | None = None
    test: str | None = None


@dataclass(frozen=True)
class TransferFiles:
    """Unlabeled transfer text laid out unlike the labeled files: its own text columns, format, encoding.

    Its text columns are read as the definition's (a token-classification definition's words
    column may come from a column of plain text: its words are split on whitespace).
    """

    path: str  # a file or glob, or pkg://...
    text_columns: tuple[str, ...] | None = None  # None: the definition's text_columns
    format: str | None = None  # None: the definition's, or from the file name
    encoding: str | None = None  # None: the definition's


@dataclass(frozen=True)
class DatasetSpec:
    """Where a labeled text data set lives and how to read it (a file under data/).

    Exactly one of ``path`` (one file, split at random; or a saved Hugging Face data set,
    with its own splits), ``files`` (a file or glob per split) or ``hub`` (a data set in the
    local Hugging Face cache, by name, with its own splits).
    """

    path: str | None = None  # CSV/TSV/JSON/JSONL/Parquet file, a saved HF dataset (dict) directory, or pkg://...
    files: SplitSources | None = None  # a file or glob per split, e.g. GLUE's train.tsv and dev.tsv
    hub: str | None = None  # a data set in the local HF cache by name (offline), e.g. glue
    hub_config: str | None = None  # its configuration, e.g. sst2
    splits: SplitSources | None = None  # a saved DatasetDict's or hub data set's split serving as each of ours
    unlabeled: tuple[str | TransferFiles, ...] = ()  # transfer text without labels (unlabeled training rows):
    # files or globs laid out as the labeled ones, or TransferFiles with their own columns
    text_columns: tuple[str, ...] = ("text",)  # one column, or two for sentence pairs
    label_column: str = "label"
    label_names: tuple[str, ...] | None = None  # class order; rows with other labels are counted and dropped
    # (a task without labels, causal-lm, keeps the rows of these classes and reads no label)
    format: str | None = None  # csv, tsv, json, jsonl, parquet or hf; None: from the file name
    encoding: str = "utf-8"
    column_names: tuple[str, ...] | None = None  # a headerless CSV/TSV: its columns, in order
    quoting: bool = True  # False: quote characters are plain text (as in GLUE's TSV files)

    def __post_init__(self):
        _check(1 <= len(self.text_columns) <= 2, f"text_columns must name 1 or 2 columns; got {self.text_columns!r}")
        given = [name for name in ("path", "files", "hub") if getattr(self, name) is not None]
        _check(len(given) == 1, f"a dataset definition needs exactly one of path, files or hub; got {given or 'none'}")
        _check(
            self.splits is None or self.files is None, "splits names the splits of a path or hub data set, not files"
        )
        bad = [u.text_columns for u in self.unlabeled
               if isinstance(u, TransferFiles) and u.text_columns is not None
               and len(u.text_columns) != len(self.text_columns)]  # fmt: skip
        _check(not bad, f"unlabeled text_columns {bad} must name as many columns as text_columns {self.text_columns}")

    @property
    def source(self) -> str:
        """The definition's data as error messages name it: its path, its hub name, or its split files."""
        return self.path or self.hub or "files"

    def paths(self) -> list[str]:
        """Every local data file the definition names (globs expanded, pkg:// resolved)."""
        patterns = [self.path] if self.path else []
        if self.files is not None:
            patterns += [p for p in dataclasses.astuple(self.files) if p]
        return [
            f
            for pattern in [*patterns, *(getattr(u, "path", u) for u in self.unlabeled)]
            for f in matching_files(pattern) or [resolve_location(pattern)]
        ]


@dataclass(frozen=True)
class Prompts:
    """causal-lm, sequence-level KD: each text is a prompt the teacher answers (``capture.generate``).

    ``template`` wraps the text (``{text}`` stands for it); with ``chat_template`` the result is
    a user message in the tokenizer's chat template, followed by its assistant header. A text
    longer than the template leaves room for under ``data.max_length`` tokens is cut at its end.
    """

    template: str = "{text}"
    chat_template: bool = False

    def __post_init__(self):
        _check("{text}" in self.template, f"data.prompts.template must contain {{text}}; got {self.template!r}")


@dataclass(frozen=True)
class DataConfig:
    dataset: str  # path of a dataset definition (YAML), e.g. data/rotten_tomatoes.yaml
    test_size: int | float = 0.15  # held-out rows for the final report: a count, or a fraction in (0, 1)
    validation_size: int | float = 0.05  # rows for model selection during training: a count or a fraction
    labeled_train_size: int | None = None  # keep labels on this many training rows; the rest are unlabeled
    max_examples: int | None = None  # use only this many rows in all (quick runs); None: all
    max_length: int = 128  # tokens per example after truncation
    doc_stride: int = 64  # question answering: tokens by which a long context's windows overlap
    block_length: int = 128  # causal-lm: tokens per block the documents are packed into
    prompts: Prompts | None = None  # causal-lm: the texts are prompts the teacher answers, not text to pack

    def __post_init__(self):
        _check(self.test_size > 0 and self.validation_size > 0, "data.test_size and data.validation_size must be > 0")
        _check(self.max_length >= 8, f"data.max_length must be >= 8; got {self.max_length!r}")
        _check(self.doc_stride >= 1, f"data.doc_stride must be >= 1; got {self.doc_stride!r}")
        _check(self.block_length >= 2, f"data.block_length must be >= 2; got {self.block_length!r}")
        _check(
            self.labeled_train_size is None or self.labeled_train_size > 0,
            f"data.labeled_train_size must be > 0 or null; got {self.labeled_train_size!r}",
        )


@dataclass(frozen=True)
class TeacherConfig:
    base_model: str  # HF model id, local directory or pkg://...
    fine_tune: bool = True  # False: base_model already is a classifier for this task
    epochs: int = 3
    learning_rate: float = 5e-5
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    precision: str = "auto"  # autocast dtype: auto, float32, bfloat16 or float16 (float16 adds loss scaling)
    checkpoint_steps: int = 500  # save a resumable checkpoint every this many steps (and after every epoch)
    output_root: str = "models/teachers"  # fine-tuned teachers live in <output_root>/<key>/
    seed: int | None = None  # the fine-tuning's initialization and batch order; None: the experiment's seed
    # (which also splits the data): teachers of other seeds over the same rows, for distill.teachers

    def __post_init__(self):
        _check(self.epochs >= 1, f"teacher.epochs must be >= 1; got {self.epochs!r}")
        _check(0 < self.learning_rate < 1, f"teacher.learning_rate must be in (0, 1); got {self.learning_rate!r}")
        _check(self.checkpoint_steps > 0, f"teacher.checkpoint_steps must be > 0; got {self.checkpoint_steps!r}")
        _check_precision("teacher", self.precision)


LOGIT_SCHEMES = ("topk", "sampled", "dense")


@dataclass(frozen=True)
class LogitsCapture:
    """What a causal LM's cache keeps of the teacher's next-token distribution at each position."""

    scheme: str = "sampled"  # topk, sampled (draws with replacement, as ids and counts) or dense
    k: int = 50  # topk: the most probable ids kept
    draws: int = 50  # sampled: draws per position
    temperature: float = 1.0  # the distributions are softmax(logits / temperature)
    seed: int = 0  # sampled: seeds the draws

    def __post_init__(self):
        _check(self.scheme in LOGIT_SCHEMES, f"capture.logits.scheme must be one of {list(LOGIT_SCHEMES)}; got "
                                             f"{self.scheme!r}")  # fmt: skip
        _check(self.k >= 1 and 1 <= self.draws < 65536, f"capture.logits needs k >= 1 and draws in [1, 65535]; got "
                                                        f"k={self.k!r}, draws={self.draws!r}")  # fmt: skip
        _check(self.temperature > 0, f"capture.logits.temperature must be > 0; got {self.temperature!r}")


@dataclass(frozen=True)
class Generation:
    """How the teacher answers a causal-lm cache's prompts (``data.prompts``), once, at capture."""

    max_new_tokens: int = 48  # an answer ends at the end-of-sequence token or after this many tokens
    sample: bool = False  # False: greedy; True: sampled at temperature and top_p, seeded
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0  # sampled answers: seeds each batch's draws

    def __post_init__(self):
        _check(self.max_new_tokens >= 1, f"capture.generate.max_new_tokens must be >= 1; got {self.max_new_tokens!r}")
        _check(self.temperature > 0 and 0 < self.top_p <= 1,
               f"capture.generate needs temperature > 0 and top_p in (0, 1]; got {self.temperature!r}, {self.top_p!r}")  # fmt: skip


@dataclass(frozen=True)
class CaptureConfig:
    hidden_layers: tuple[int, ...] = ()  # teacher layers (1..N; 0 = embeddings) whose hidden states are stored
    attention_layers: tuple[int, ...] = ()  # teacher layers (1..N) whose attention maps are stored
    attention_heads: tuple[int, ...] | None = None  # heads (0-based) whose maps are stored; None: all
    hidden_dtype: str = "float16"  # float16, bfloat16 (stored as its bit pattern) or float32
    attention_dtype: str = "float16"
    attention_quantization: str | None = None  # "sqrt-uint8": round(255 * sqrt(p)), about 1/5 of float16
    precision: str = "auto"  # teacher forward: auto, float32, bfloat16 or float16 autocast (part of the key)
    batch_size: int = 64  # most rows per batch (on a GPU, 256 or more)
    batch_tokens: int = 8192  # most padded tokens per batch (rows are length-sorted within each shard)
    shard_rows: int = 1024  # examples per shard, and the window rows are length-sorted within
    tensor_splits: tuple[str, ...] = (
        "train",
    )  # splits whose hidden states, attention maps and LM distributions are stored
    logits: LogitsCapture | None = (
        None  # causal-lm: the teacher's distribution kept per position (None: LogitsCapture())
    )
    prompts: tuple[str, ...] = ()  # causal-lm: texts the teacher (at capture) and each student (in the report)
    # continue greedily, side by side; none: the first words of the first test documents
    generate: Generation | None = None  # causal-lm with data.prompts: how the teacher answers (None: Generation())
    bundle_teacher: bool | None = None  # store the teacher's checkpoint in the cache; None: when under 1 GB
    cache_root: str = "caches"  # caches live in <cache_root>/<key>/

    def __post_init__(self):
        _check(self.shard_rows > 0, f"capture.shard_rows must be > 0; got {self.shard_rows!r}")
        _check(self.batch_size > 0, f"capture.batch_size must be > 0; got {self.batch_size!r}")
        _check(self.batch_tokens > 0, f"capture.batch_tokens must be > 0; got {self.batch_tokens!r}")
        _check(
            self.attention_heads is None or (len(self.attention_heads) > 0 and min(self.attention_heads) >= 0),
            f"capture.attention_heads must list head numbers (0-based) or be null; got {self.attention_heads!r}",
        )
        _check_precision("capture", self.precision)
        bad = [split for split in self.tensor_splits if split not in ("train", "validation", "test")]
        _check(not bad, f"capture.tensor_splits must name train, validation or test; got {bad}")
        for name in ("hidden_dtype", "attention_dtype"):
            value = getattr(self, name)
            _check(value in DTYPES, f"capture.{name} must be one of {list(DTYPES)}; got {value!r}")
        _check(
            self.attention_quantization in QUANTIZATIONS,
            f"capture.attention_quantization must be one of {list(QUANTIZATIONS)}; got {self.attention_quantization!r}",
        )


# The loss terms (pipeline/losses.py holds them): logits, hidden states, attention maps.
LOSS_KINDS = ("kl", "reverse_kl", "jsd", "logit_mse", "ce", "hidden_mse", "hidden_cosine", "cls_mse", "attention_mse",
              "attention_kl")  # fmt: skip
FEATURE_KINDS = ("hidden_mse", "hidden_cosine", "cls_mse", "attention_mse", "attention_kl")  # compare tensors
TAILS = ("bucket", "renormalize")  # a top-k cache's KL: the other ids as one outcome, or left out
MAPPINGS = ("auto", "uniform", "last")  # or explicit pairs in layer_map


@dataclass(frozen=True)
class LossTerm:
    """One weighted term of a student's loss; weight and temperature may follow a linear schedule."""

    kind: str  # one of LOSS_KINDS
    weight: float = 1.0
    weight_end: float | None = None  # linear from weight at the first step to weight_end at the last; None: constant
    temperature: float | None = None  # kl, reverse_kl, jsd: softmax temperature (the term is scaled by T^2);
    # None: 2.0, or for a causal-lm cache the temperature its distributions were taken at (the only one it allows)
    temperature_end: float | None = None  # linear schedule, as weight_end (not with a causal-lm cache)
    tail: str = "bucket"  # a top-k causal-lm cache: the ids outside the top k as one outcome, or renormalize
    teacher: int | None = None  # hidden and attention terms: the distill.teachers position whose tensors they
    # compare; None: the student's first teacher

    def __post_init__(self):
        _check(self.kind in LOSS_KINDS, f"unknown loss kind {self.kind!r}; choose from {list(LOSS_KINDS)}")
        _check(self.weight >= 0 and (self.weight_end or 0) >= 0, f"loss {self.kind}: weights must be >= 0")
        _check(
            (self.temperature is None or self.temperature > 0)
            and (self.temperature_end is None or self.temperature_end > 0),
            f"loss {self.kind}: temperature must be > 0; got {self.temperature!r}",
        )
        _check(self.tail in TAILS, f"loss {self.kind}: tail must be one of {list(TAILS)}; got {self.tail!r}")
        _check(self.teacher is None or self.kind in FEATURE_KINDS,
               f"loss {self.kind}: only hidden and attention terms name a teacher; logit terms learn from the "
               "student's teachers (its teachers:), fused")  # fmt: skip


DEFAULT_TEMPERATURE = 2.0  # of a kl term that names none, on a cache of logits
DEFAULT_LOSS = (LossTerm("kl", 0.5), LossTerm("ce", 0.5))


@dataclass(frozen=True)
class StudentArchitecture:
    """A student built from a config: the teacher's model type at this size, randomly initialized."""

    layers: int
    hidden_size: int
    heads: int
    intermediate_size: int | None = None  # None: 4 x hidden_size

    def __post_init__(self):
        _check(self.layers >= 1 and self.heads >= 1, "student architecture needs layers >= 1 and heads >= 1")
        _check(
            self.hidden_size % self.heads == 0,
            f"student architecture: hidden_size {self.hidden_size} must be a multiple of heads {self.heads}",
        )


@dataclass(frozen=True)
class LoraConfig:
    """Train low-rank adapters (peft) instead of the full weights; the classifier head stays trainable."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("query", "value")


@dataclass(frozen=True)
class StudentConfig:
    name: str
    teacher_layers: tuple[int, ...] | None = None  # cut from these teacher layers (1..N), DistilBERT-style
    pretrained: str | None = None  # or start from this checkpoint (same tokenizer as the teacher)
    architecture: StudentArchitecture | None = None  # or build this size from the teacher's config
    mapping: str = "auto"  # auto (cut layers, else uniform), uniform, or last; layer_map overrides
    layer_map: tuple[tuple[int, int], ...] | None = None  # explicit (student layer, teacher layer) pairs
    loss: tuple[LossTerm, ...] | None = None  # this student's loss terms; None: distill.loss
    freeze_embeddings: bool = False  # keep the word embeddings fixed (faster steps on CPU)
    freeze_layers: int = 0  # keep the first k transformer layers fixed
    lora: LoraConfig | None = None  # train LoRA adapters through peft instead of the full weights
    teachers: tuple[int, ...] | None = None  # the distill.teachers (by position) its logit terms learn from; None: all
    fusion: Fusion | None = None  # how it fuses them; None: distill.fusion

    def __post_init__(self):
        _check(self.teachers is None or (len(self.teachers) > 0 and min(self.teachers) >= 0),
               f"student {self.name!r}: teachers must list teacher positions (0-based) or be null")  # fmt: skip
        given = [self.teacher_layers is not None, self.pretrained is not None, self.architecture is not None]
        bad_pairs = [list(p) for p in self.layer_map or () if len(p) != 2 or min(p) < 0]
        _check(
            not bad_pairs,
            f"student {self.name!r}: layer_map must list [student layer, teacher layer] pairs of layers >= 0; "
            f"got {bad_pairs}",
        )
        _check(
            sum(given) == 1, f"student {self.name!r}: give exactly one of teacher_layers, pretrained or architecture"
        )
        _check(self.mapping in MAPPINGS, f"student {self.name!r}: mapping must be one of {list(MAPPINGS)}")
        _check(self.freeze_layers >= 0, f"student {self.name!r}: freeze_layers must be >= 0")


FUSION_RULES = ("mean", "weighted", "confidence", "best")


@dataclass(frozen=True)
class Fusion:
    """How a student's logit targets fuse several teachers' class distributions (at the term's temperature):
    ``mean`` of their probabilities, ``weighted`` mean (``weights``, one per teacher of distill.teachers),
    ``confidence``: per outcome, each teacher weighted by its top probability, or ``best``: per outcome, the
    teacher that is right on a labeled one (the most confident of those right), else the most confident."""

    rule: str = "mean"
    weights: tuple[float, ...] | None = None

    def __post_init__(self):
        _check(self.rule in FUSION_RULES, f"fusion.rule must be one of {list(FUSION_RULES)}; got {self.rule!r}")
        _check((self.rule == "weighted") == (self.weights is not None),
               "fusion.weights are given with rule weighted, and only then")  # fmt: skip
        _check(self.weights is None or (min(self.weights) >= 0 and sum(self.weights) > 0),
               f"fusion.weights must be >= 0 and not all 0; got {self.weights!r}")  # fmt: skip


SELECT_BY = ("confidence", "margin", "entropy", "correct")  # what distill.select keeps training rows by


@dataclass(frozen=True)
class Selection:
    """distill.select: the training rows students and baselines learn from, kept by the teacher's cached
    class distribution per row (sequence classification). Planned from the cached rows before any
    training, the same for every seed and epoch."""

    by: str = "confidence"  # confidence (top probability), margin (top minus second), entropy (nats), or
    # correct: the labeled rows the teacher gets right, and every unlabeled row
    min: float | None = None  # keep rows whose measure is at least this
    max: float | None = None  # keep rows whose measure is at most this
    keep: float | None = None  # keep this fraction of each shard's rows, the surest first (highest
    # confidence or margin, lowest entropy)

    def __post_init__(self):
        _check(self.by in SELECT_BY, f"distill.select.by must be one of {list(SELECT_BY)}; got {self.by!r}")
        bounds = [name for name in ("min", "max", "keep") if getattr(self, name) is not None]
        if self.by == "correct":
            _check(not bounds, f"distill.select.by correct takes no {', '.join(bounds)}")
        else:
            _check(bool(bounds), f"distill.select.by {self.by} needs min, max or keep")
        _check(self.keep is None or 0 < self.keep <= 1, f"distill.select.keep must be in (0, 1]; got {self.keep!r}")


@dataclass(frozen=True)
class Curriculum:
    """distill.curriculum: easy rows first, then harder ones ("baby steps"). Each epoch streams the easiest
    fraction of each shard's rows by the teacher's cached class distribution (highest confidence or margin,
    lowest entropy; sequence classification), growing linearly from ``start`` at the first epoch to every
    row at epoch ``epochs``; planned before any training, the same for every seed."""

    by: str = "confidence"  # confidence, margin or entropy
    start: float = 0.5  # the fraction of each shard's rows the first epoch streams
    epochs: int | None = None  # every row from this epoch (1-based) on; None: the students' last

    def __post_init__(self):
        _check(self.by in SELECT_BY[:3], f"distill.curriculum.by must be one of {list(SELECT_BY[:3])}; got {self.by!r}")
        _check(0 < self.start <= 1, f"distill.curriculum.start must be in (0, 1]; got {self.start!r}")
        _check(self.epochs is None or self.epochs >= 1, f"distill.curriculum.epochs must be >= 1; got {self.epochs!r}")

    def fraction(self, epoch: int, epochs: int) -> float:
        """The fraction of rows epoch ``epoch`` (0-based) streams, when the students train ``epochs`` epochs."""
        full = (self.epochs or epochs) - 1
        return 1.0 if epoch >= full else self.start + (1 - self.start) * epoch / full


@dataclass(frozen=True)
class TaskSource:
    """One task of a multi-task student (distill.tasks): its teacher's cache, and its name in the reports."""

    cache: str  # a path, URL, or config file (.yaml) whose teacher-cache made the cache
    name: str | None = None  # None: the config's name, or the cache's key


SAMPLING_RULES = ("proportional", "round_robin", "temperature")


@dataclass(frozen=True)
class TaskSampling:
    """How a multi-task student's epoch interleaves its tasks' batches. An epoch takes as many steps as all the
    tasks' epochs together; ``proportional``: each task its own batches, in a seeded random order; ``round_robin``:
    the tasks in turn, equal shares; ``temperature``: shares proportional to (a task's batches)^(1/temperature),
    in a seeded random order (1: proportional; large: equal). A task whose share exceeds its batches goes on into
    its next epoch's."""

    rule: str = "proportional"
    temperature: float = 2.0

    def __post_init__(self):
        _check(self.rule in SAMPLING_RULES, f"distill.task_sampling.rule must be one of {list(SAMPLING_RULES)}; got "
                                            f"{self.rule!r}")  # fmt: skip
        _check(self.temperature > 0, f"distill.task_sampling.temperature must be > 0; got {self.temperature!r}")


@dataclass(frozen=True)
class DistillConfig:
    students: tuple[StudentConfig, ...]
    loss: tuple[LossTerm, ...] = DEFAULT_LOSS  # the terms every student uses unless it names its own
    epochs: int = 3
    learning_rate: float = 1e-4
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    seeds: tuple[int, ...] = (0,)  # each student (and baseline) is trained once per seed
    baselines: bool = True  # also train each student architecture on hard labels only
    baseline_epochs: int | None = None  # None: enough epochs for each baseline to take at least its student's steps
    block_rows: int = 256  # rows read and shuffled together within a shard
    buffer_rows: int = 1024  # shuffle buffer: its rows are batched by length, the batches shuffled
    loader_workers: int = 0  # DataLoader worker processes (0: read in the training process)
    checkpoint_steps: int = 200  # save a resumable checkpoint every this many steps (and after every epoch)
    run_root: str = "runs"  # each run writes <run_root>/<timestamp>-<name>/; <run_root>/latest points to it
    select: Selection | None = None  # train on the rows the teacher's outputs choose; None: every row
    curriculum: Curriculum | None = None  # easy rows first, a growing fraction per epoch; None: every row each epoch
    trackers: tuple[str, ...] = ("tensorboard",)  # where training scalars go: tensorboard, wandb (offline by default)
    teachers: tuple[str, ...] = ()  # teacher caches over the same examples: paths, URLs, or configs (.yaml) whose
    # teacher-cache made them; the first gives the rows, tokenizer and test split; none: the config's own cache
    fusion: Fusion = field(default_factory=Fusion)  # how students with several teachers fuse their logits
    tasks: tuple[TaskSource, ...] = ()  # several tasks per student: one shared encoder, a head per task's cache
    task_sampling: TaskSampling = field(default_factory=TaskSampling)  # how a multi-task epoch interleaves them

    def __post_init__(self):
        _check(len(self.students) > 0, "distill.students must list at least one student")
        names = [s.name for s in self.students]
        _check(len(set(names)) == len(names), f"student names must be unique; got {names}")
        _check(len(self.seeds) > 0, "distill.seeds must list at least one seed")
        _check(len(self.loss) > 0, "distill.loss must list at least one term")
        for name in ("block_rows", "buffer_rows", "checkpoint_steps"):
            _check(getattr(self, name) > 0, f"distill.{name} must be > 0; got {getattr(self, name)!r}")
        _check(self.loader_workers >= 0, f"distill.loader_workers must be >= 0; got {self.loader_workers!r}")
        _check(
            self.baseline_epochs is None or self.baseline_epochs >= 1,
            f"distill.baseline_epochs must be >= 1 or null; got {self.baseline_epochs!r}",
        )
        if self.tasks:
            _check(len(self.tasks) >= 2, "distill.tasks lists the tasks of a multi-task student: at least two")
            _check(not self.teachers, "distill.tasks and distill.teachers: give each task one teacher's cache")
            _check(self.select is None and self.curriculum is None,
                   "distill.select and distill.curriculum apply to one task's rows, not to distill.tasks")  # fmt: skip
        unknown = sorted(set(self.trackers) - {"tensorboard", "wandb"})
        _check(not unknown, f"distill.trackers: unknown {unknown}; choose from ['tensorboard', 'wandb']")
        count = max(len(self.teachers), 1)
        for student in self.students:
            outside = sorted(t for t in student.teachers or () if t >= count)
            _check(not outside, f"student {student.name!r}: teachers {outside} beyond the {count} of distill.teachers")
            terms = [t.teacher for t in student.loss or self.loss if t.teacher is not None]
            _check(max(terms, default=0) < count,
                   f"student {student.name!r}: a loss term names teacher {max(terms, default=0)}, beyond the {count} "
                   "of distill.teachers")  # fmt: skip
        for fusion in (self.fusion, *(s.fusion for s in self.students if s.fusion is not None)):
            _check(fusion.weights is None or len(fusion.weights) == count,
                   f"fusion.weights must give one weight per teacher ({count}); got {fusion.weights!r}")  # fmt: skip


@dataclass(frozen=True)
class ExperimentConfig:
    """An experiment. Each stage needs its sections: the teacher stage ``data`` and ``teacher``
    (and ``capture``); the student stage only ``distill``, when it is given the cache."""

    name: str | None = None  # names runs and the cache; None: the config file's name
    task: str | None = None  # a name of pipeline.tasks.TASKS (None: sequence-classification, or in distill the cache's)
    data: DataConfig | None = None
    teacher: TeacherConfig | None = None
    distill: DistillConfig | None = None
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    seed: int = 0  # the data split and the teacher's fine-tuning
    device: str = "auto"  # auto (CUDA when there is one, else CPU), cpu, cuda or cuda:N

    def __post_init__(self):
        _check(self.task is None or self.task in TASKS, f"unknown task {self.task!r}; choose from {sorted(TASKS)}")
        for name in ("logits", "prompts", "generate"):
            _check(
                not getattr(self.capture, name) or self.task == "causal-lm",
                f"capture.{name} applies to causal-lm caches; config {self.name!r} is "
                f"{self.task or 'sequence-classification'}",
            )
        prompted = self.data is not None and self.data.prompts is not None
        _check(not prompted or self.task == "causal-lm", f"data.prompts applies to causal-lm; config {self.name!r} is "
                                                         f"{self.task or 'sequence-classification'}")  # fmt: skip
        _check(self.capture.generate is None or prompted, "capture.generate needs data.prompts (the prompts to answer)")
        _check(not (prompted and self.capture.prompts), "capture.prompts continue plain text; with data.prompts the "
                                                        "report shows the answers to the first test prompts")  # fmt: skip

    @property
    def generation(self) -> Generation | None:
        """How the teacher answers the prompts of a sequence-level cache (None: the data is plain text)."""
        if self.data is None or self.data.prompts is None:
            return None
        return self.capture.generate or Generation()

    @property
    def teacher_seed(self) -> int:
        """The seed of the teacher's fine-tuning: ``teacher.seed``, or the experiment's."""
        return self.seed if self.teacher is None or self.teacher.seed is None else self.teacher.seed

    def teacher_stages(self) -> list[ExperimentConfig]:
        """The experiments whose teacher stages this one needs: the config files among ``distill.teachers`` and
        ``distill.tasks`` (as they are written), and this one when it has its own data: and teacher: (or names no
        such file)."""
        caches = [*self.distill.teachers, *(t.cache for t in self.distill.tasks)] if self.distill else []
        named = [load_config(c) for c in caches if is_config_file(c)]
        own = self.data is not None or self.teacher is not None or not named
        return [*([self] if own else []), *(c for c in named if c.name != self.name)]

    def require(self, *sections: str, stage: str) -> None:
        """Refuse a config that lacks a section ``stage`` needs."""
        missing = [name for name in sections if getattr(self, name) is None]
        _check(
            not missing, f"config {self.name!r} has no {', '.join(f'{m}:' for m in missing)} section; {stage} needs it"
        )


def is_config_file(entry: str) -> bool:
    """Whether a cache entry (distill.teachers, distill.tasks) names a config file rather than a cache."""
    return entry.endswith((".yaml", ".yml"))


def load_config(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> ExperimentConfig:
    """Read an experiment YAML into an ExperimentConfig.

    Args:
        overrides: ``dotted.key=value`` settings applied on top of the file, the value read
            as YAML (``distill.seeds=[0,1,2]``, ``distill.students.0.freeze_embeddings=false``).

    Raises:
        ConfigError: unknown or missing keys, or values out of range; the message names the key.
    """
    raw = _read_config(Path(path))
    for override in overrides:
        _apply_override(raw, override)
    raw.setdefault("name", Path(path).stem)
    return _build(ExperimentConfig, raw, str(path))


def _read_config(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file's keys; with ``extends: other.yaml`` (relative to the file), the other file's keys
    with this one's merged over them, section by section (lists are replaced, and the name is not inherited)."""
    raw = _read_yaml(path)
    base = raw.pop("extends", None)
    if base is None:
        return raw
    parent = path.parent / str(base)
    _check(parent.resolve() not in seen, f"{path}: extends {base}, which extends it again")
    inherited = _read_config(parent, (*seen, path.resolve()))
    inherited.pop("name", None)
    return _merged(inherited, raw)


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def _apply_override(raw: dict, override: str) -> None:
    dotted, sep, text = override.partition("=")
    _check(bool(sep and dotted), f"override {override!r} must look like key.subkey=value")
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        if isinstance(node, list):
            _check(part.isdigit() and int(part) < len(node), f"override {dotted}: no item {part!r}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        _check(isinstance(node, (dict, list)), f"override {dotted}: {part!r} holds a value, not keys")
    value = yaml.safe_load(text)
    if isinstance(node, list):
        _check(last.isdigit() and int(last) < len(node), f"override {dotted}: no item {last!r}")
        node[int(last)] = value
    else:
        node[last] = value


def load_dataset_spec(path: str | Path) -> DatasetSpec:
    """Read a dataset definition YAML (see data/)."""
    return _build(DatasetSpec, _read_yaml(path), str(path))


def _read_yaml(path: str | Path) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    _check(isinstance(raw, dict), f"{path} must hold a mapping of keys")
    return raw


def _build(cls, raw, where: str):
    """Turn a YAML mapping into the dataclass ``cls``, refusing unknown keys by name."""
    _check(isinstance(raw, dict), f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    _check(not unknown, f"{where}: unknown key(s) {unknown}; choose from {sorted(known)}")
    values = {name: _convert(hints[name], value, f"{where}.{name}") for name, value in raw.items()}
    try:
        return cls(**values)
    except TypeError as e:  # a required key is missing
        raise ConfigError(f"{where}: {e}") from None


def _convert(hint, value, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options[:-1]:  # the first type that takes the value (int | float: 3 stays an int, 0.2 a float)
            try:
                return _convert(option, value, where)
            except ConfigError:
                pass
        return _convert(options[-1], value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is tuple:
        _check(isinstance(value, (list, tuple)), f"{where}: expected a list, got {value!r}")
        item = args[0]
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # label_names: [0, 1] in YAML names the classes "0" and "1"
    if hint in (int, float, str, bool):
        _check(
            isinstance(value, hint) and not (hint is int and isinstance(value, bool)),
            f"{where}: expected {hint.__name__}, got {value!r}",
        )
    return value


def matching_files(pattern: str) -> list[str]:
    """The files a data location names: a glob's matches (``**`` recursive), sorted, or the file itself;
    none when nothing is there."""
    resolved = resolve_location(pattern)
    if any(c in resolved for c in "*?["):
        return sorted(glob.glob(resolved, recursive=True))
    return [resolved] if Path(resolved).exists() else []


def resolve_location(location: str) -> str:
    """Turn ``pkg://PACKAGE/rel/path`` into a path inside the installed package; anything else is returned as is.

    Raises:
        ConfigError: the package is not installed.
    """
    if not location.startswith(PACKAGE_SCHEME):
        return location
    package, _, relative = location[len(PACKAGE_SCHEME) :].partition("/")
    spec = importlib.util.find_spec(package)  # locate without importing: these packages only carry files
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {package!r} (for {location}) is not installed; run `make setup`")
    return str(Path(spec.submodule_search_locations[0]) / relative)

"""Labeled text data: load a data set, split it with a fixed seed, tokenize it.

Any CSV/TSV/JSON/JSONL/Parquet file or saved Hugging Face dataset works, read through
``datasets``; a dataset definition under data/ names its columns and classes.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from .config import ConfigError, DataConfig, DatasetSpec, load_dataset_spec, resolve_location

UNLABELED = -1  # label of a training row whose label is hidden: the teacher's logits teach it
SPLITS = ("train", "validation", "test")
_COMPRESSED = {".bz2", ".gz", ".xz", ".zst", ".zip"}
_BUILDERS = {"csv": ("csv", {}), "tsv": ("csv", {"delimiter": "\t"}), "json": ("json", {}),
             "jsonl": ("json", {}), "parquet": ("parquet", {})}  # fmt: skip


@dataclass(frozen=True)
class TextData:
    """Texts with integer labels; ``example_id`` is each row's index in the loaded data set."""

    example_id: np.ndarray  # (N,) int64
    texts: list[tuple[str, ...]]  # one or two texts per row
    labels: np.ndarray  # (N,) int64; UNLABELED where hidden
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.example_id)

    def take(self, index: np.ndarray) -> TextData:
        return TextData(self.example_id[index], [self.texts[i] for i in index], self.labels[index], self.label_names)


def load_text_data(spec: DatasetSpec) -> TextData:
    """Read the data set a definition describes, mapping labels to class ids.

    Raises:
        ConfigError: missing file or columns, or labels that cannot be mapped.
    """
    table = _read_table(spec)
    missing = [c for c in (*spec.text_columns, spec.label_column) if c not in table.column_names]
    if missing:
        raise ConfigError(f"{spec.path}: no column(s) {missing}; it has {table.column_names}")
    raw_labels = table[spec.label_column]
    names = spec.label_names or tuple(sorted({str(v) for v in raw_labels if v is not None}))
    index = {name: i for i, name in enumerate(names)}
    keep = [i for i, v in enumerate(raw_labels) if str(v) in index]
    if not keep:
        raise ConfigError(f"{spec.path}: no row has a label in {list(names)}")
    columns = [table[c] for c in spec.text_columns]
    texts = [tuple("" if col[i] is None else str(col[i]) for col in columns) for i in keep]
    labels = np.array([index[str(raw_labels[i])] for i in keep], dtype=np.int64)
    return TextData(np.arange(len(keep), dtype=np.int64), texts, labels, tuple(names))


def _read_table(spec: DatasetSpec) -> datasets.Dataset:
    path = Path(resolve_location(spec.path))
    if not path.exists():
        raise ConfigError(f"data set {spec.path} not found at {path}")
    fmt = spec.format or _format_from_name(path)
    if fmt == "hf":
        loaded = datasets.load_from_disk(str(path))
        return loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded
    if fmt not in _BUILDERS:
        raise ConfigError(f"unknown data format {fmt!r} for {spec.path}; choose from {sorted([*_BUILDERS, 'hf'])}")
    builder, options = _BUILDERS[fmt]
    if builder == "csv":
        options = {**options, "encoding": spec.encoding}
    return datasets.load_dataset(builder, data_files=str(path), split="train", **options)


def _format_from_name(path: Path) -> str:
    if path.is_dir():
        return "hf"
    suffixes = [s for s in path.suffixes if s not in _COMPRESSED]
    return suffixes[-1].lstrip(".").lower() if suffixes else ""


def _size(value: int | float, total: int) -> int:
    return int(round(value * total)) if isinstance(value, float) else int(value)


@dataclass(frozen=True)
class Splits:
    """A data set cut into train, validation and test, and what was dropped to keep test held out."""

    parts: dict[str, TextData]  # split name -> its rows
    test_overlap: dict[str, int]  # train, validation -> rows dropped because their text is also in test

    def __getitem__(self, name: str) -> TextData:
        return self.parts[name]

    def __iter__(self):
        return iter(self.parts)

    def summary(self) -> str:
        """One line: the rows per split, the labeled training rows, and the test overlap dropped."""
        sizes = ", ".join(f"{name} {len(self.parts[name])}" for name in SPLITS)
        labeled = int((self.parts["train"].labels != UNLABELED).sum())
        dropped = " and ".join(f"{n} {name}" for name, n in self.test_overlap.items())
        return f"data: {sizes} rows ({labeled} labeled train rows); dropped {dropped} rows whose text is also in test"


def normalized(texts: tuple[str, ...]) -> tuple[str, ...]:
    """A row's texts as compared for overlap: Unicode NFKC, case-folded, whitespace collapsed."""
    return tuple(" ".join(unicodedata.normalize("NFKC", t).casefold().split()) for t in texts)


def split_data(data: TextData, cfg: DataConfig, *, seed: int) -> Splits:
    """Shuffle with ``seed`` and cut into test, validation and train (in that order).

    Train and validation rows whose normalized text (``normalized``) equals a test row's
    are dropped, so the test split measures unseen text. With ``labeled_train_size`` set,
    only that many training rows, drawn at random (seeded) so they spread over the cache's
    shards, keep their label; the others become unlabeled transfer text that the teacher
    labels through the cache.
    """
    order = np.random.default_rng(seed).permutation(len(data))
    if cfg.max_examples is not None:
        order = order[: cfg.max_examples]
    n_test, n_val = _size(cfg.test_size, len(order)), _size(cfg.validation_size, len(order))
    if n_test < 1 or n_val < 1 or n_test + n_val >= len(order):
        raise ConfigError(
            f"data: {len(order)} rows cannot give test_size={cfg.test_size}, "
            f"validation_size={cfg.validation_size} and a training split"
        )
    test = data.take(order[:n_test])
    held_out = {normalized(t) for t in test.texts}
    parts, overlap = {"test": test}, {}
    for name, index in (("validation", order[n_test : n_test + n_val]), ("train", order[n_test + n_val :])):
        fresh = np.array([normalized(data.texts[i]) not in held_out for i in index], dtype=bool)
        parts[name], overlap[name] = data.take(index[fresh]), int((~fresh).sum())
    if not len(parts["train"]) or not len(parts["validation"]):
        raise ConfigError(f"data: every train or validation row also appears in test ({overlap})")
    train = parts["train"]
    if cfg.labeled_train_size is not None and cfg.labeled_train_size < len(train):
        labeled = np.zeros(len(train), dtype=bool)
        labeled[np.random.default_rng([seed, 1]).choice(len(train), cfg.labeled_train_size, replace=False)] = True
        parts["train"] = TextData(train.example_id, train.texts, np.where(labeled, train.labels, UNLABELED),
                                  train.label_names)  # fmt: skip
    return Splits(
        {name: parts[name] for name in SPLITS}, {"train": overlap["train"], "validation": overlap["validation"]}
    )


def load_splits(cfg: DataConfig, *, seed: int) -> Splits:
    """Load the configured data set and split it."""
    return split_data(load_text_data(load_dataset_spec(cfg.dataset)), cfg, seed=seed)


def tokenize(tokenizer, data: TextData, *, max_length: int) -> list[np.ndarray]:
    """Token ids per example (no padding), truncated to ``max_length``."""
    columns = list(zip(*data.texts, strict=True)) if data.texts else [[]]
    encoded = tokenizer(*[list(c) for c in columns], truncation=True, max_length=max_length,
                        return_attention_mask=False, return_token_type_ids=False)  # fmt: skip
    return [np.asarray(ids, dtype=np.int32) for ids in encoded["input_ids"]]

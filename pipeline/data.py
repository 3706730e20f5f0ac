"""Labeled text data: load a data set laid out as its benchmark ships it, split it, tokenize it.

A dataset definition under data/ names one file (split at random with a fixed seed), a
file or glob per split (GLUE's train.tsv and dev.tsv, say), a saved Hugging Face data set
or one in the local Hugging Face cache by name (their own splits), and optionally files
of unlabeled transfer text. Every format ``datasets`` reads works: CSV/TSV (headerless
too), JSON/JSONL, Parquet; and CoNLL files of tagged words, plain or compressed. The task
(``pipeline.tasks``) says what a row's texts and label are: a class, tags per word, answers. Rows that cannot be used are counted, by split and reason, and
reported in one line (and in the cache's manifest), never dropped silently.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import fsspec
import numpy as np

from .config import (
    DataConfig,
    DatasetSpec,
    SplitSources,
    TransferFiles,
    load_dataset_spec,
    matching_files,
    resolve_location,
)
from .contract import SPLITS
from .errors import DataError
from .tasks import SEQUENCE_CLASSIFICATION, Problem, Task
from .tasks.sequence_classification import UNKNOWN_LABEL

WHOLE = "data set"  # the source name of a data set given as one file (split at random)
EMPTY_TEXT, IN_TEST = "empty text", "text also in test"
_COMPRESSED = {".bz2", ".gz", ".xz", ".zst", ".zip"}
_BUILDERS = {"csv": ("csv", {}), "tsv": ("csv", {"delimiter": "\t"}), "json": ("json", {}),
             "jsonl": ("json", {}), "parquet": ("parquet", {})}  # fmt: skip


@dataclass(frozen=True)
class TextData:
    """Rows of text with their labels as the task reads them; ``example_id`` is each row's index
    among the data set's usable rows."""

    example_id: np.ndarray  # (N,) int64
    texts: list[tuple[str, ...]]  # per row: one or two texts, a sentence's words, or a question and its context
    labels: np.ndarray  # (N,) per row its label as the task reads it (a class id, tag ids, answers); object or int64
    labeled: np.ndarray  # (N,) bool: False where the label is hidden (transfer text) or there is none
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.example_id)

    def take(self, index: np.ndarray) -> TextData:
        return TextData(self.example_id[index], [self.texts[i] for i in index], self.labels[index],
                        self.labeled[index], self.label_names)  # fmt: skip

    def hiding(self, index: np.ndarray) -> TextData:
        """These rows with the labels at ``index`` hidden (unlabeled rows)."""
        labeled = self.labeled.copy()
        labeled[index] = False
        return TextData(self.example_id, self.texts, self.labels, labeled, self.label_names)


@dataclass(frozen=True)
class Splits:
    """A data set cut into train, validation and test, and the rows left out on the way."""

    parts: dict[str, TextData]  # split name -> its rows
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)  # source or split -> reason -> rows
    scaled: str = ""  # how --max-examples scaled the configured sizes, when it did

    def __getitem__(self, name: str) -> TextData:
        return self.parts[name]

    def __iter__(self):
        return iter(self.parts)

    def summary(self) -> str:
        """One line: rows per split, labeled training rows, and every row left out, by where and why."""
        sizes = ", ".join(f"{name} {len(self.parts[name]):,}" for name in SPLITS)
        labeled = int(self.parts["train"].labeled.sum())
        dropped = [f"{n:,} {where} rows ({why})" for where, reasons in self.dropped.items()
                   for why, n in reasons.items() if n]  # fmt: skip
        line = f"data: {sizes} rows ({labeled:,} labeled training rows)"
        line += f"; dropped {', '.join(dropped)}" if dropped else "; no row dropped"
        return line + (f"; {self.scaled}" if self.scaled else "")


def normalized(texts: tuple[str, ...]) -> tuple[str, ...]:
    """A row's texts as compared for overlap: Unicode NFKC, case-folded, whitespace collapsed."""
    return tuple(" ".join(unicodedata.normalize("NFKC", t).casefold().split()) for t in texts)


def load_splits(cfg: DataConfig, *, seed: int, task: Task = SEQUENCE_CLASSIFICATION) -> Splits:
    """Load the configured data set as ``task`` reads it, and split it (see ``split_sources``)."""
    spec = load_dataset_spec(cfg.dataset)
    tables = read_sources(spec)
    return split_sources(to_text_data(tables, spec, task=task), cfg, seed=seed)


def read_sources(spec: DatasetSpec) -> dict[str, datasets.Dataset]:
    """The definition's tables by source: ``WHOLE`` for one file to split at random, else split
    names; plus ``unlabeled`` when it names transfer text.

    Raises:
        DataError: a file, split or data set that is not there.
    """
    if spec.files is not None:
        tables = {name: _read_files(pattern, spec) for name, pattern in _sources(spec.files).items()}
    elif spec.hub is not None:
        tables = _split_dict(_load_hub(spec), spec)
    else:
        path = Path(resolve_location(spec.path))
        if not path.exists():
            raise DataError(f"data set {spec.path} not found at {path}")
        loaded = datasets.load_from_disk(str(path)) if (spec.format or _format_from_name(path)) == "hf" else None
        if isinstance(loaded, datasets.DatasetDict):
            tables = _split_dict(loaded, spec)
        else:
            tables = {WHOLE: loaded if loaded is not None else _read_files(spec.path, spec)}
    if spec.unlabeled:
        like = next(iter(tables.values()))
        parts = [_read_transfer(source, spec, like) for source in spec.unlabeled]
        tables["unlabeled"] = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if WHOLE not in tables and "train" not in tables:
        raise DataError(f"{spec.source}: no train split among {sorted(tables)}")
    return tables


def _sources(sources: SplitSources) -> dict[str, str]:
    return {name: value for name in SPLITS if (value := getattr(sources, name)) is not None}


def _load_hub(spec: DatasetSpec) -> datasets.DatasetDict:
    try:
        return datasets.load_dataset(spec.hub, spec.hub_config)
    except Exception as e:  # offline and not in the local cache, a wrong name, ...
        raise DataError(
            f"data set {spec.hub!r} ({spec.hub_config}) is not in the local Hugging Face cache ({e})"
        ) from None


def _split_dict(loaded: datasets.DatasetDict, spec: DatasetSpec) -> dict[str, datasets.Dataset]:
    """Our splits from a DatasetDict's: ``spec.splits`` names its split for each of ours (default: the same name)."""
    wanted = _sources(spec.splits) if spec.splits is not None else {n: n for n in SPLITS if n in loaded}
    missing = [theirs for theirs in wanted.values() if theirs not in loaded]
    if missing:
        raise DataError(f"{spec.source}: no split {missing}; it has {sorted(loaded)}")
    return {ours: loaded[theirs] for ours, theirs in wanted.items()}


def _read_files(pattern: str, spec: DatasetSpec, *, labeled: bool = True) -> datasets.Dataset:
    """One table from a file or glob in the definition's format."""
    files = matching_files(pattern)
    if not files:
        raise DataError(f"data file {pattern} not found at {resolve_location(pattern)}")
    fmt = spec.format or _format_from_name(Path(files[0]))
    if fmt == "conll":
        return _read_conll(files, spec, labeled=labeled)
    if fmt == "txt":
        return _read_text(files, spec)
    if fmt not in _BUILDERS:
        raise DataError(
            f"unknown data format {fmt!r} for {pattern}; choose from {sorted([*_BUILDERS, 'conll', 'hf', 'txt'])}"
        )
    builder, options = _BUILDERS[fmt]
    if builder == "csv":
        options = {**options, "encoding": spec.encoding}
        if spec.column_names is not None:
            options["column_names"] = list(spec.column_names)
        if not spec.quoting:
            options["quoting"] = 3  # csv.QUOTE_NONE: quote characters are text
    try:
        return datasets.load_dataset(builder, data_files=files, split="train", **options)
    except (ValueError, datasets.exceptions.DatasetGenerationError) as e:
        raise DataError(f"cannot read {pattern} as {fmt} ({e.__cause__ or e})") from None


def _read_transfer(source: str | TransferFiles, spec: DatasetSpec, like: datasets.Dataset) -> datasets.Dataset:
    """Transfer text as a table of the definition's text columns, held as in ``like`` (a labeled
    table): where that holds words (CoNLL), plain text is split into words on whitespace.

    Raises:
        DataError: the files are not there, or lack a text column.
    """
    if isinstance(source, str):
        source = TransferFiles(source)
    columns = source.text_columns or spec.text_columns
    layout = dataclasses.replace(spec, text_columns=columns, format=source.format or spec.format,
                                 encoding=source.encoding or spec.encoding,
                                 column_names=None if source.text_columns else spec.column_names)  # fmt: skip
    table = _read_files(source.path, layout, labeled=False)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"unlabeled {source.path}: no column(s) {missing}; it has {table.column_names}")
    table = table.select_columns(list(columns)).rename_columns(dict(zip(columns, spec.text_columns, strict=True)))
    words = [c for c in spec.text_columns if _holds_words(like, c) and not _holds_words(table, c)]
    if words:
        table = table.map(lambda row: {c: str(row[c] or "").split() for c in words})
    return table


def _holds_words(table: datasets.Dataset, column: str) -> bool:
    """Whether a table's column holds lists (a sentence's words) rather than text."""
    return column in table.features and not isinstance(table.features[column], datasets.Value)


def _read_conll(files: list[str], spec: DatasetSpec, *, labeled: bool) -> datasets.Dataset:
    """Sentences of a CoNLL file: one word per line with its tag in the last column (``word<TAB>tag``,
    or CoNLL-2003's four columns), a blank line between sentences, ``-DOCSTART-`` lines skipped.
    Columns: ``text_columns[0]`` (the words) and ``label_column`` (the tags; absent when unlabeled).

    Raises:
        DataError: a labeled line without a tag, naming its file and line.
    """
    words, tags, sentence, sentence_tags = [], [], [], []
    for file in files:
        with fsspec.open(file, "rt", encoding=spec.encoding, compression="infer") as f:
            for number, line in enumerate(f, 1):
                fields = line.split()
                if fields and fields[0] == "-DOCSTART-":
                    continue
                if fields:
                    if labeled and len(fields) < 2:
                        raise DataError(f"{file} line {number}: {line.strip()!r} has no tag (CoNLL: word<TAB>tag)")
                    sentence.append(fields[0])
                    sentence_tags.append(fields[-1])
                if not fields and sentence:
                    words.append(sentence)
                    tags.append(sentence_tags)
                    sentence, sentence_tags = [], []
            if sentence:  # a file that does not end with a blank line
                words.append(sentence)
                tags.append(sentence_tags)
                sentence, sentence_tags = [], []
    columns = {spec.text_columns[0]: words} | ({spec.label_column: tags} if labeled else {})
    return datasets.Dataset.from_dict(columns)


def _read_text(files: list[str], spec: DatasetSpec) -> datasets.Dataset:
    """Plain text files, plain or compressed: each paragraph (text between blank lines) a document,
    in column ``text_columns[0]``."""
    documents = []
    for file in files:
        with fsspec.open(file, "rt", encoding=spec.encoding, compression="infer") as f:
            documents += [" ".join(p.split()) for p in f.read().split("\n\n") if p.strip()]
    return datasets.Dataset.from_dict({spec.text_columns[0]: documents})


def _format_from_name(path: Path) -> str:
    if path.is_dir():
        return "hf"
    suffixes = [s for s in path.suffixes if s not in _COMPRESSED]
    return suffixes[-1].lstrip(".").lower() if suffixes else ""


def to_text_data(tables: dict[str, datasets.Dataset], spec: DatasetSpec, *,
                 task: Task = SEQUENCE_CLASSIFICATION) -> tuple[dict[str, TextData], dict]:  # fmt: skip
    """Each source's usable rows with their labels as ``task`` reads them, and the rows dropped per
    source and reason.

    Example ids number the usable rows of all sources in order. Class names come from
    ``label_names`` (or the column's class names, or its values); a row whose label the
    task cannot read (an unknown class, a tag count that differs from the word count, an
    answer not in its context), or without text, is dropped and counted.

    Raises:
        DataError: missing columns, or a source with no usable row.
    """
    labeled_tables = {source: t for source, t in tables.items() if source != "unlabeled"}
    names = spec.label_names or _label_names(labeled_tables, spec, task)
    task.check_label_names(names)
    index = {name: i for i, name in enumerate(names)}
    out, dropped, next_id = {}, {}, 0
    for source, table in tables.items():
        labeled = source != "unlabeled" or not task.reads_labels  # a causal LM learns every row's own text
        reads = labeled and task.reads_labels
        keeps = not task.reads_labels and spec.label_names is not None  # only the rows of these classes
        wanted = [*spec.text_columns, *([spec.label_column] if reads or keeps else [])]
        missing = [c for c in wanted if c not in table.column_names]
        if missing:
            raise DataError(f"{source} of {spec.source}: no column(s) {missing}; it has {table.column_names}")
        columns = [table[c] for c in spec.text_columns]
        raw = _label_values(table, spec.label_column) if reads or keeps else [None] * len(table)
        reasons: dict[str, int] = {}
        kept = []  # (row, texts, label)
        for i in range(len(table)):
            texts = task.row_texts([col[i] for col in columns])
            label = task.read_label(raw[i], index, texts) if reads and texts is not None else None
            if keeps and texts is not None and raw[i] not in index:
                label = UNKNOWN_LABEL
            problem = EMPTY_TEXT if texts is None else label if isinstance(label, Problem) else None
            if problem:
                reasons[problem] = reasons.get(problem, 0) + 1
            else:
                kept.append((texts, label))
        dropped[source] = reasons
        if not kept:
            raise DataError(f"{source} of {spec.source}: no usable row ({reasons}); label_names is {list(names)}")
        labels = _objects([label for _, label in kept])
        if reads and all(isinstance(v, int) for v in labels):
            labels = labels.astype(np.int64)
        out[source] = TextData(np.arange(next_id, next_id + len(kept), dtype=np.int64), [t for t, _ in kept],
                               labels, np.full(len(kept), labeled), tuple(names) if task.reads_labels else ())  # fmt: skip
        next_id += len(kept)
    return out, dropped


def _objects(values: list) -> np.ndarray:
    """An object array of ``values`` as they are (numpy would stack arrays of equal length)."""
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out


def _label_values(table: datasets.Dataset, column: str) -> list:
    """A label column with class ids as their names (a ClassLabel column, or a sequence of them);
    other values as they are (text, lists, dicts)."""
    feature, values = table.features[column], table[column]
    if isinstance(feature, datasets.ClassLabel):
        return [feature.names[v] if v is not None and 0 <= v < feature.num_classes else None for v in values]
    inner = getattr(feature, "feature", None)
    if isinstance(inner, datasets.ClassLabel):
        return [None if v is None else [inner.names[t] for t in v] for v in values]
    return [None if v is None else v if isinstance(v, list | dict) else str(v) for v in values]


def _label_names(tables: dict[str, datasets.Dataset], spec: DatasetSpec, task: Task) -> tuple[str, ...]:
    """The class names of a definition without ``label_names``: its column's class names, else the task's from the labels."""
    for table in tables.values():
        feature = table.features.get(spec.label_column)
        feature = getattr(feature, "feature", feature)
        if isinstance(feature, datasets.ClassLabel):
            return tuple(feature.names)
    return task.label_names([v for t in tables.values() if spec.label_column in t.column_names
                             for v in _label_values(t, spec.label_column)])  # fmt: skip


def _size(value: int | float, total: int) -> int:
    return int(round(value * total)) if isinstance(value, float) else int(value)


def split_sources(loaded: tuple[dict[str, TextData], dict], cfg: DataConfig, *, seed: int) -> Splits:
    """Train, validation and test from the loaded sources, with ``seed``.

    A data set given as one file is shuffled and cut into test, validation and train; with
    split files (or a data set's own splits), a split not given is cut at random from train.
    Unlabeled transfer text joins train. Train and validation rows whose normalized text
    (``normalized``) equals a test row's are dropped, so test measures unseen text. With
    ``labeled_train_size``, only that many labeled training rows, drawn at random, keep
    their label. Train rows are in random order (a train file's are shuffled), so labeled
    rows spread over the cache's shards.
    ``max_examples`` keeps a random sample of that many rows and scales the sizes given
    as counts by the same fraction.

    Raises:
        DataError: sizes that leave no training rows, or a split whose every row is also in test.
    """
    sources, dropped = loaded
    total = sum(len(d) for d in sources.values())
    fraction = 1.0 if cfg.max_examples is None or cfg.max_examples >= total else cfg.max_examples / total
    if fraction < 1:
        sources = {name: d.take(np.sort(np.random.default_rng([seed, 3, i]).permutation(len(d))[: max(1, round(len(d) * fraction))]))
                   for i, (name, d) in enumerate(sources.items())}  # fmt: skip
    sizes = {
        name: _scaled(getattr(cfg, name), fraction) for name in ("test_size", "validation_size", "labeled_train_size")
    }
    scaled = ""
    if fraction < 1:
        changes = [f"{name} {getattr(cfg, name)} -> {sizes[name]}" for name in sizes
                   if isinstance(getattr(cfg, name), int) and getattr(cfg, name) != sizes[name]]  # fmt: skip
        scaled = f"--max-examples {cfg.max_examples} of {total:,} rows" + (
            f" scales {', '.join(changes)}" if changes else ""
        )
    pool = sources.get(WHOLE, sources.get("train"))
    order = np.random.default_rng(seed).permutation(len(pool))
    cut = {}
    for name in ("test", "validation"):
        if name in sources:
            cut[name] = sources[name]
            continue
        n = _size(sizes[f"{name}_size"], len(pool))
        cut[name], order = pool.take(order[:n]), order[n:]
    if WHOLE not in sources:  # a train file's rows come in its order: shuffle them (a single file's already are)
        order = order[np.random.default_rng([seed, 2]).permutation(len(order))]
    train = pool.take(order)
    if min(len(cut["test"]), len(cut["validation"]), len(train)) < 1:
        raise DataError(f"data: {len(pool)} rows cannot give test_size={cfg.test_size}, "
                        f"validation_size={cfg.validation_size} and a training split")  # fmt: skip
    held_out = {normalized(t) for t in cut["test"].texts}
    parts = {"test": cut["test"]}
    for name, data in (("validation", cut["validation"]), ("train", train), ("unlabeled", sources.get("unlabeled"))):
        if data is None:
            continue
        fresh = np.array([normalized(t) not in held_out for t in data.texts], dtype=bool)
        parts[name] = data.take(np.flatnonzero(fresh))
        dropped.setdefault(name, {})[IN_TEST] = int((~fresh).sum())
        if not len(parts[name]):
            raise DataError(f"data: every {name} row's text also appears in test")
    train = parts["train"]
    labeled = np.arange(len(train))
    if sizes["labeled_train_size"] is not None and sizes["labeled_train_size"] < len(labeled):
        kept = np.random.default_rng([seed, 1]).choice(labeled, sizes["labeled_train_size"], replace=False)
        train = train.hiding(np.setdiff1d(labeled, kept))
    if "unlabeled" in parts:
        train = _interleaved(train, parts.pop("unlabeled"), np.random.default_rng([seed, 4]))
    parts["train"] = train
    return Splits({name: parts[name] for name in SPLITS}, dropped, scaled)


def _interleaved(train: TextData, extra: TextData, rng: np.random.Generator) -> TextData:
    """``extra``'s rows, shuffled, at random places among ``train``'s, whose order is kept (so adding
    transfer text changes neither which labeled rows are kept nor the order the teacher sees them in)."""
    slots = np.zeros(len(train) + len(extra), dtype=bool)
    slots[rng.choice(len(slots), len(extra), replace=False)] = True  # True: a place of an extra row
    order = np.empty(len(slots), dtype=np.int64)
    order[~slots] = np.arange(len(train))
    order[slots] = len(train) + rng.permutation(len(extra))
    return _concat(train, extra).take(order)


def _scaled(value, fraction: float):
    """A size given as a count, scaled by ``fraction`` (at least 1); fractions and None as they are."""
    if isinstance(value, int) and fraction < 1:
        return max(1, round(value * fraction))
    return value


def _concat(a: TextData, b: TextData) -> TextData:
    labels = _objects([*a.labels, *b.labels])  # an unlabeled row's label is None
    return TextData(np.concatenate([a.example_id, b.example_id]), a.texts + b.texts, labels,
                    np.concatenate([a.labeled, b.labeled]), a.label_names)  # fmt: skip

"""Token classification (NER): tags per word, learned per token; entity-level precision, recall and F1.

A word's tag goes on its first sub-token; the other sub-tokens and the special tokens
carry ``IGNORED``, which neither the cross-entropy nor the metric reads (the teacher's
logits for them are still there for a KL term). A word's predicted tag is its first
sub-token's; a word that truncation cut off, or that became no token, is predicted ``O``,
so the metric runs over every word of the data, as the data set's own scorer would.

Entities are read from tag sequences by the CoNLL-2000 ``conlleval`` chunk rules, which
seqeval's default mode follows, for BIO (IOB2) and BIOES tags: an entity starts at a
``B-`` or ``S-`` tag, at an ``I-``/``E-`` tag that follows ``O``, an ``E-``/``S-`` or
another type; it ends after ``E-``/``S-``, before ``B-``, ``S-`` or ``O``, or where the
type changes. Scores are micro-averaged over all entities of all sequences: an entity
counts as found only with its exact type and word span.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cache_store import ColumnSpec, ShardRows

from ..errors import DataError
from .base import IGNORED, LABEL, LOGITS, Problem, Task

OUTSIDE = "O"
PREFIXES = ("B", "I", "E", "S")  # begin, inside, end, single (BIO uses B and I)
TAGS, WORD_STARTS = "tags", "word_starts"  # row columns: each word's gold tag id, each word's first token
UNKNOWN_TAG = Problem("tag not in label_names")
MISCOUNTED = Problem("tags and words differ in number")


class TokenClassification(Task):
    """Tags per word (NER): a word's tag is learned and predicted on its first sub-token.

    A cache row holds the token labels (``label``, IGNORED but on first sub-tokens), each
    word's gold tag and first token (so the metric covers every word, even one that
    truncation cut off) and the teacher's logits per token ``("L", C)``.
    """

    name = "token-classification"
    primary_metric = "entity_f1"
    metric_labels = {"entity_f1": "entity F1", "entity_precision": "precision", "entity_recall": "recall",
                     "token_accuracy": "token accuracy"}  # fmt: skip
    peft_task = "TOKEN_CLS"
    per_token = True

    def auto_model(self):
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification

    def row_texts(self, values: Sequence) -> tuple[str, ...] | None:
        """The sentence's words (its one text column holds a list of them); None when it has none."""
        words = values[0]
        return tuple(str(w) for w in words) if words else None

    def label_names(self, labels: list) -> tuple[str, ...]:
        """Every tag used, ``O`` first, then in sorted order."""
        tags = {str(t) for row in labels if row is not None for t in row}
        return tuple(sorted(tags, key=lambda t: (t != OUTSIDE, t)))

    def check_label_names(self, names: Sequence[str]) -> None:
        problem = check_tag_names(names)
        if problem:
            raise DataError(f"token-classification: {problem}")

    def read_label(self, value, names: dict[str, int], texts: tuple[str, ...]):
        if value is None or len(value) != len(texts):
            return MISCOUNTED
        if any(str(t) not in names for t in value):
            return UNKNOWN_TAG
        return np.array([names[str(t)] for t in value], dtype=np.int64)

    def encode(self, tokenizer, data, cfg) -> ShardRows:
        tags = [label if known else None for label, known in zip(data.labels, data.labeled, strict=True)]
        ids, labels, starts = align_tags(tokenizer, data.texts, tags, max_length=cfg.max_length)
        return ShardRows(data.example_id, ids, {
            LABEL: [x.astype(np.int32) for x in labels],
            TAGS: [np.zeros(0, np.int32) if t is None else t.astype(np.int32) for t in tags],
            WORD_STARTS: [x.astype(np.int32) for x in starts],
        })  # fmt: skip

    def columns(self, num_labels: int) -> tuple[ColumnSpec, ...]:
        return (ColumnSpec(LABEL, "int32", ("L",)), ColumnSpec(TAGS, "int32", ("*",)),
                ColumnSpec(WORD_STARTS, "int32", ("*",)), ColumnSpec(LOGITS, "float32", ("L", num_labels)))  # fmt: skip

    def labeled(self, rows: ShardRows) -> np.ndarray:
        return np.array([bool((labels != IGNORED).any()) for labels in rows[LABEL]], dtype=bool)

    def class_outcomes(self, rows: ShardRows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The first sub-tokens of words with a tag, with it, and every token of a row without tags (class -1)."""
        logits, classes, owners = [], [], []
        for row, (labels, values) in enumerate(zip(rows[LABEL], rows[LOGITS], strict=True)):
            tagged = labels != IGNORED
            keep = tagged if tagged.any() else np.ones(len(labels), bool)
            logits.append(values[keep])
            classes.append(np.where(tagged, labels, -1)[keep])
            owners.append(np.full(int(keep.sum()), row))
        if not logits:
            return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(logits), np.concatenate(classes).astype(np.int64), np.concatenate(owners)

    def distributions(self, logits, batch):
        """Each real token's class logits (tokens, C)."""
        return logits[batch["attention_mask"].bool()]

    def hard_targets(self, batch):
        return batch[LABEL][batch["attention_mask"].bool()]

    def metrics(self, outputs: list[np.ndarray], rows: ShardRows, label_names: Sequence[str]) -> dict[str, float]:
        """Entity-level precision, recall and F1 and word accuracy over the rows' words (seqeval rules)."""
        outside = list(label_names).index(OUTSIDE)
        gold = [[label_names[t] for t in tags] for tags in rows[TAGS]]
        predicted = [[label_names[t] for t in word_tags(np.asarray(out).argmax(-1), starts, outside)]
                     for out, starts in zip(outputs, rows[WORD_STARTS], strict=True)]  # fmt: skip
        return entity_scores(gold, predicted)


def align_tags(tokenizer, words: Sequence[Sequence[str]], tags: Sequence[np.ndarray | None], *,
               max_length: int) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:  # fmt: skip
    """Token ids of each sentence, each token's label and each word's first token.

    Args:
        words: each sentence's words; tags: each sentence's tag ids per word (None: unlabeled,
            every token IGNORED).

    Returns:
        ids (L_i,) int32; labels (L_i,) int64: the word's tag on its first sub-token, else IGNORED;
        word_starts (W_i,) int64: each word's first token, -1 where it has none (cut off, or no token).
    """
    encoded = tokenizer([list(w) for w in words], is_split_into_words=True, truncation=True, max_length=max_length,
                        return_attention_mask=False, return_token_type_ids=False)  # fmt: skip
    ids, labels, starts = [], [], []
    for i, sentence in enumerate(words):
        word_of = encoded.word_ids(i)
        first = np.full(len(sentence), -1, dtype=np.int64)
        label = np.full(len(word_of), IGNORED, dtype=np.int64)
        previous = None
        for position, word in enumerate(word_of):
            if word is not None and word != previous:
                first[word] = position
                if tags[i] is not None:
                    label[position] = tags[i][word]
            previous = word
        ids.append(np.asarray(encoded["input_ids"][i], dtype=np.int32))
        labels.append(label)
        starts.append(first)
    return ids, labels, starts


def word_tags(token_predictions: np.ndarray, word_starts: np.ndarray, outside: int) -> np.ndarray:
    """Each word's predicted tag id: its first token's, or ``outside`` for a word without a token."""
    return np.where(word_starts >= 0, token_predictions[np.maximum(word_starts, 0)], outside)


def check_tag_names(names: Sequence[str]) -> str | None:
    """Why ``names`` are not BIO/BIOES tags (``O``, ``B-TYPE``, ``I-TYPE``, ...), or None when they are."""
    bad = [n for n in names if n != OUTSIDE and (n.partition("-")[0] not in PREFIXES or not n.partition("-")[2])]
    if bad:
        return f"tags {bad} are neither O nor B-, I-, E- or S- and an entity type (BIO or BIOES)"
    return None


def entity_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The entities a tag sequence marks: (type, first word, last word)."""
    spans, start = set(), None
    prev_prefix, prev_type = OUTSIDE, ""
    for i, tag in enumerate([*tags, OUTSIDE]):  # the sentinel closes an entity at the end
        prefix, _, kind = (OUTSIDE, "", "") if tag == OUTSIDE else tag.partition("-")
        ends = (
            prev_prefix in ("E", "S")
            or (prev_prefix in ("B", "I") and prefix in ("B", "S", OUTSIDE))
            or (prev_prefix != OUTSIDE and prev_type != kind)
        )
        starts = (
            prefix in ("B", "S")
            or (prev_prefix in ("E", "S", OUTSIDE) and prefix in ("I", "E"))
            or (prefix != OUTSIDE and prev_type != kind)
        )
        if ends and start is not None:
            spans.add((prev_type, start, i - 1))
            start = None
        if starts:
            start = i
        prev_prefix, prev_type = prefix, kind
    return spans


def entity_scores(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level micro precision, recall and F1, and token (word) accuracy, over paired tag sequences.

    Raises:
        ValueError: the sequences do not pair up word for word.
    """
    if len(gold) != len(predicted) or any(len(g) != len(p) for g, p in zip(gold, predicted, strict=False)):
        raise ValueError("gold and predicted tag sequences must pair up word for word")
    true = {(i, *span) for i, tags in enumerate(gold) for span in entity_spans(tags)}
    found = {(i, *span) for i, tags in enumerate(predicted) for span in entity_spans(tags)}
    hits = len(true & found)
    precision = hits / len(found) if found else 0.0
    recall = hits / len(true) if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    words = [g == p for gs, ps in zip(gold, predicted, strict=True) for g, p in zip(gs, ps, strict=True)]
    return {"entity_f1": f1, "entity_precision": precision, "entity_recall": recall,
            "token_accuracy": float(np.mean(words)) if words else 0.0}  # fmt: skip

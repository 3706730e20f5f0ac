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

OUTSIDE = "O"
PREFIXES = ("B", "I", "E", "S")  # begin, inside, end, single (BIO uses B and I)
IGNORED = -100  # the label of a token that no loss and no metric reads


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

"""Batching: segment ids for sentence pairs, and batches under a row and token budget."""

from __future__ import annotations

import numpy as np
from transformers import AutoTokenizer, BertConfig

from pipeline.training import Collator, token_budget_batches


def unpadded(encoded) -> list[np.ndarray]:
    return [ids[mask == 1] for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)]


def test_collator_gives_the_tokenizers_segment_ids_for_pairs_and_single_texts(tiny_teacher):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_teacher))
    collate = Collator.for_model(tokenizer, BertConfig(type_vocab_size=2))
    firsts, seconds = ["the film is great", "dull", "a very boring story"], ["so funny", "the cast is warm", "flat"]
    pairs = tokenizer(firsts, seconds, padding=True, return_tensors="np")
    batch = collate(unpadded(pairs))
    np.testing.assert_array_equal(batch["input_ids"].numpy(), pairs["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"].numpy(), pairs["attention_mask"])
    np.testing.assert_array_equal(batch["token_type_ids"].numpy(), pairs["token_type_ids"])
    batch = collate(unpadded(tokenizer(firsts, padding=True, return_tensors="np")))
    assert not batch["token_type_ids"].numpy().any()
    assert "token_type_ids" not in Collator.for_model(tokenizer, BertConfig(type_vocab_size=1))([np.array([2, 3])])


def test_token_budget_batches_cover_every_row_once_within_both_limits():
    lengths = np.random.default_rng(0).integers(3, 120, size=500)
    lengths[7] = 400  # longer than the budget: it goes alone
    batches = token_budget_batches(lengths, max_rows=32, max_tokens=1024)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(500))
    assert np.all(np.diff(lengths[rows]) >= 0)  # length-sorted: little padding
    for batch in batches:
        assert len(batch) <= 32
        assert len(batch) == 1 or len(batch) * lengths[batch].max() <= 1024
    assert [7] in [b.tolist() for b in batches]
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert padded < 1.1 * lengths.sum()

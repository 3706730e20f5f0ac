"""Data sets in every supported format, label mapping, deterministic splits, tokenization."""

from __future__ import annotations

import datasets
import numpy as np
import pandas as pd
import pytest

from pipeline.config import ConfigError, DataConfig, DatasetSpec
from pipeline.data import UNLABELED, load_text_data, split_data, tokenize
from pipeline.models import load_tokenizer

FRAME = pd.DataFrame({"a": ["good film", "bad film", "fine", "awful"], "b": ["x", "y", "z", "w"],
                      "y": ["pos", "neg", "meh", "neg"]})  # fmt: skip


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet", "hf"])
def test_every_format_loads_and_unlisted_labels_are_dropped(tmp_path, fmt):
    path = tmp_path / f"data.{fmt}"
    if fmt == "csv":
        FRAME.to_csv(path, index=False)
    elif fmt == "tsv":
        FRAME.to_csv(path, sep="\t", index=False)
    elif fmt == "jsonl":
        FRAME.to_json(path, orient="records", lines=True)
    elif fmt == "parquet":
        FRAME.to_parquet(path)
    else:
        datasets.Dataset.from_pandas(FRAME).save_to_disk(str(path))
    data = load_text_data(
        DatasetSpec(path=str(path), text_columns=("a",), label_column="y", label_names=("neg", "pos"))
    )
    assert data.texts == [("good film",), ("bad film",), ("awful",)]
    assert data.labels.tolist() == [1, 0, 0]
    assert data.label_names == ("neg", "pos")


def test_labels_default_to_sorted_values_and_pairs_keep_both_texts(tmp_path):
    FRAME.to_csv(tmp_path / "d.csv", index=False)
    data = load_text_data(DatasetSpec(path=str(tmp_path / "d.csv"), text_columns=("a", "b"), label_column="y"))
    assert data.label_names == ("meh", "neg", "pos")
    assert data.texts[0] == ("good film", "x")


def test_missing_column_is_named(tmp_path):
    FRAME.to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(ConfigError, match=r"no column\(s\) \['text'\]"):
        load_text_data(DatasetSpec(path=str(tmp_path / "d.csv"), label_column="y"))


def test_split_is_deterministic_disjoint_and_hides_labels_beyond_the_labeled_size(tiny_dataset):
    from pipeline.config import load_dataset_spec

    data = load_text_data(load_dataset_spec(tiny_dataset))
    cfg = DataConfig(dataset=str(tiny_dataset), test_size=0.2, validation_size=10, labeled_train_size=30)
    one, two = split_data(data, cfg, seed=3), split_data(data, cfg, seed=3)
    ids = {name: one[name].example_id for name in one}
    dropped = one.test_overlap
    assert {name: len(v) for name, v in ids.items()} == {
        "train": 86 - dropped["train"], "validation": 10 - dropped["validation"], "test": 24
    }  # fmt: skip
    assert len(np.unique(np.concatenate(list(ids.values())))) == len(data) - sum(dropped.values())
    for name in one:
        np.testing.assert_array_equal(one[name].example_id, two[name].example_id)
    assert (one["train"].labels != UNLABELED).sum() == 30
    assert not np.array_equal(split_data(data, cfg, seed=4)["test"].example_id, ids["test"])


def test_split_refuses_sizes_that_leave_no_training_rows(tiny_dataset):
    from pipeline.config import load_dataset_spec

    data = load_text_data(load_dataset_spec(tiny_dataset))
    with pytest.raises(ConfigError, match="cannot give test_size=100"):
        split_data(data, DataConfig(dataset="x", test_size=100, validation_size=20), seed=0)


def test_tokenize_truncates_and_keeps_no_padding(tiny_teacher):
    from pipeline.data import TextData

    tokenizer = load_tokenizer(tiny_teacher)
    data = TextData(np.arange(2), [("great film",), ("the " * 50,)], np.array([1, 0]), ("neg", "pos"))
    ids = tokenize(tokenizer, data, max_length=16)
    assert [len(x) for x in ids] == [4, 16]
    assert ids[0][0] == tokenizer.cls_token_id and ids[0][-1] == tokenizer.sep_token_id


def test_labeled_rows_are_drawn_at_random_so_they_spread_over_the_shards(tiny_dataset):
    """Labels on the first N train rows would fill the first shards (CE in a few batches; ranks without labels)."""
    from pipeline.config import load_dataset_spec

    data = load_text_data(load_dataset_spec(tiny_dataset))
    cfg = DataConfig(dataset="x", test_size=10, validation_size=10, labeled_train_size=30)
    splits = split_data(data, cfg, seed=0)
    labeled = np.flatnonzero(splits["train"].labels != UNLABELED)
    assert len(labeled) == 30
    quarters = np.array_split(np.arange(len(splits["train"])), 4)  # 16-row shards: every quarter holds labels
    assert all(np.isin(quarter, labeled).sum() >= 3 for quarter in quarters)
    np.testing.assert_array_equal(np.flatnonzero(split_data(data, cfg, seed=0)["train"].labels != UNLABELED), labeled)
    assert not np.array_equal(np.flatnonzero(split_data(data, cfg, seed=1)["train"].labels != UNLABELED), labeled)
    kept = splits["train"].labels[labeled]
    np.testing.assert_array_equal(
        kept, data.labels[np.searchsorted(data.example_id, splits["train"].example_id)][labeled]
    )


def test_train_and_validation_rows_whose_text_is_in_test_are_dropped_and_counted(tmp_path):
    """Texts that differ only in case, spacing or Unicode width are the same text."""
    texts = [f"review number {i}" for i in range(40)]
    variants = [f"Review  NUMBER {i}" if i % 2 else f"ｒeview\tnumber {i}" for i in range(40)]  # one copy of each
    pd.DataFrame({"text": texts + variants, "label": ["pos", "neg"] * 40}).to_csv(tmp_path / "d.csv", index=False)
    data = load_text_data(DatasetSpec(path=str(tmp_path / "d.csv")))
    splits = split_data(data, DataConfig(dataset="x", test_size=20, validation_size=10), seed=0)

    def number(text: str) -> int:
        return int(text.split()[-1])

    in_test = {number(t[0]) for t in splits["test"].texts}
    for name in ("train", "validation"):
        assert not in_test & {number(t[0]) for t in splits[name].texts}, name
    outside = [number(data.texts[i][0]) for i in range(len(data)) if number(data.texts[i][0]) in in_test]
    dropped = len(outside) - len(splits["test"])  # copies of test texts that fell in train or validation
    assert dropped > 0 and sum(splits.test_overlap.values()) == dropped
    assert len(splits["train"]) + len(splits["validation"]) == len(data) - 20 - dropped
    assert splits.summary().endswith(
        f"dropped {splits.test_overlap['train']} train and {splits.test_overlap['validation']} validation rows "
        "whose text is also in test"
    )

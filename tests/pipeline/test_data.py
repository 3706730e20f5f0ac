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
    assert {name: len(v) for name, v in ids.items()} == {"test": 24, "validation": 10, "train": 86}
    assert len(np.unique(np.concatenate(list(ids.values())))) == len(data)
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

"""Data sets in every supported format, label mapping, deterministic splits, tokenization."""

from __future__ import annotations

import datasets
import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.config import DataConfig, DatasetSpec, SplitSources
from pipeline.data import WHOLE, load_splits, read_sources, split_sources, to_text_data
from pipeline.errors import DataError
from pipeline.models import load_tokenizer
from pipeline.tasks import SEQUENCE_CLASSIFICATION


def load_text_data(spec: DatasetSpec):
    """The usable rows of a one-file data set."""
    return to_text_data(read_sources(spec), spec)[0][WHOLE]


def split_data(data, cfg: DataConfig, *, seed: int):
    return split_sources(({WHOLE: data}, {}), cfg, seed=seed)


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
    with pytest.raises(DataError, match=r"no column\(s\) \['text'\]"):
        load_text_data(DatasetSpec(path=str(tmp_path / "d.csv"), label_column="y"))


def test_split_is_deterministic_disjoint_and_hides_labels_beyond_the_labeled_size(tiny_dataset):
    from pipeline.config import load_dataset_spec

    data = load_text_data(load_dataset_spec(tiny_dataset))
    cfg = DataConfig(dataset=str(tiny_dataset), test_size=0.2, validation_size=10, labeled_train_size=30)
    one, two = split_data(data, cfg, seed=3), split_data(data, cfg, seed=3)
    ids = {name: one[name].example_id for name in one}
    dropped = {name: one.dropped[name]["text also in test"] for name in ("train", "validation")}
    assert {name: len(v) for name, v in ids.items()} == {
        "train": 86 - dropped["train"], "validation": 10 - dropped["validation"], "test": 24
    }  # fmt: skip
    assert len(np.unique(np.concatenate(list(ids.values())))) == len(data) - sum(dropped.values())
    for name in one:
        np.testing.assert_array_equal(one[name].example_id, two[name].example_id)
    assert one["train"].labeled.sum() == 30
    assert not np.array_equal(split_data(data, cfg, seed=4)["test"].example_id, ids["test"])


def test_split_refuses_sizes_that_leave_no_training_rows(tiny_dataset):
    from pipeline.config import load_dataset_spec

    data = load_text_data(load_dataset_spec(tiny_dataset))
    with pytest.raises(DataError, match="cannot give test_size=100"):
        split_data(data, DataConfig(dataset="x", test_size=100, validation_size=20), seed=0)


def test_encoding_truncates_and_keeps_no_padding(tiny_teacher):
    from pipeline.data import TextData

    tokenizer = load_tokenizer(tiny_teacher)
    data = TextData(np.arange(2), [("great film",), ("the " * 50,)], np.array([1, 0]), np.array([True, False]),
                    ("neg", "pos"))  # fmt: skip
    rows = SEQUENCE_CLASSIFICATION.encode(tokenizer, data, DataConfig(dataset="x", max_length=16))
    assert [len(x) for x in rows.input_ids] == [4, 16]
    assert rows.input_ids[0][0] == tokenizer.cls_token_id and rows.input_ids[0][-1] == tokenizer.sep_token_id
    assert rows["label"].tolist() == [1, -1]  # a hidden label is stored as UNLABELED


def test_labeled_rows_are_drawn_at_random_so_they_spread_over_the_shards(tiny_dataset):
    """Labels on the first N train rows would fill the first shards (CE in a few batches; ranks without labels)."""
    from pipeline.config import load_dataset_spec

    data = load_text_data(load_dataset_spec(tiny_dataset))
    cfg = DataConfig(dataset="x", test_size=10, validation_size=10, labeled_train_size=30)
    splits = split_data(data, cfg, seed=0)
    labeled = np.flatnonzero(splits["train"].labeled)
    assert len(labeled) == 30
    quarters = np.array_split(np.arange(len(splits["train"])), 4)  # 16-row shards: every quarter holds labels
    assert all(np.isin(quarter, labeled).sum() >= 3 for quarter in quarters)
    np.testing.assert_array_equal(np.flatnonzero(split_data(data, cfg, seed=0)["train"].labeled), labeled)
    assert not np.array_equal(np.flatnonzero(split_data(data, cfg, seed=1)["train"].labeled), labeled)
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
    counts = {name: splits.dropped[name]["text also in test"] for name in ("train", "validation")}
    assert dropped > 0 and sum(counts.values()) == dropped
    assert len(splits["train"]) + len(splits["validation"]) == len(data) - 20 - dropped
    assert f"{counts['train']} train rows (text also in test)" in splits.summary()


def write_tsv(path, rows, *, header=True):
    path.write_text(("sentence\tlabel\n" if header else "") + "".join(f"{t}\t{y}\n" for t, y in rows))


def reviews(n: int, start: int = 0) -> list[tuple[str, int]]:
    return [(f"review {i} is {'good' if i % 2 else 'bad'}", i % 2) for i in range(start, start + n)]


def test_glue_style_split_files_keep_their_splits_and_validation_is_cut_from_train(tmp_path):
    write_tsv(tmp_path / "train.tsv", reviews(60))
    write_tsv(tmp_path / "dev.tsv", reviews(20, start=100) + [("review 3 is good", 1)])  # one train text again
    (tmp_path / "glue.yaml").write_text(yaml.safe_dump({
        "files": {"train": str(tmp_path / "train.tsv"), "test": str(tmp_path / "dev.tsv")},
        "text_columns": ["sentence"], "label_names": [0, 1],
    }))  # fmt: skip
    splits = load_splits(DataConfig(dataset=str(tmp_path / "glue.yaml"), validation_size=10), seed=0)
    assert [t[0] for t in splits["test"].texts][:2] == ["review 100 is bad", "review 101 is good"]  # dev, in order
    assert len(splits["test"]) == 21 and len(splits["validation"]) == 10
    assert len(splits["train"]) == 60 - 10 - splits.dropped["train"]["text also in test"]
    assert splits.dropped["train"]["text also in test"] + splits.dropped["validation"]["text also in test"] == 1
    assert splits["train"].label_names == ("0", "1")


def test_globs_a_saved_dataset_dict_and_its_split_names(tmp_path):
    for part in range(3):
        pd.DataFrame({"text": [t for t, _ in reviews(10, 10 * part)], "label": [y for _, y in reviews(10, 10 * part)]}
                     ).to_csv(tmp_path / f"train-{part}.csv", index=False)  # fmt: skip
    spec = DatasetSpec(files=SplitSources(train=str(tmp_path / "train-*.csv")), label_names=("0", "1"))
    assert len(to_text_data(read_sources(spec), spec)[0]["train"]) == 30
    (tmp_path / "a").mkdir()
    (tmp_path / "train-0.csv").rename(tmp_path / "a" / "part.csv")
    nested = DatasetSpec(files=SplitSources(train=str(tmp_path / "*" / "part.csv")), label_names=("0", "1"))
    assert len(to_text_data(read_sources(nested), nested)[0]["train"]) == 10  # a glob in a folder's name too
    frame = lambda rows: datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]})  # noqa: E731
    datasets.DatasetDict({"train": frame(reviews(40)), "validation": frame(reviews(12, 200))}).save_to_disk(
        str(tmp_path / "dd")
    )
    (tmp_path / "dd.yaml").write_text(yaml.safe_dump({"path": str(tmp_path / "dd"), "splits": {"train": "train",
                                                      "test": "validation"}}))  # fmt: skip
    splits = load_splits(DataConfig(dataset=str(tmp_path / "dd.yaml"), validation_size=5), seed=0)
    assert len(splits["test"]) == 12 and len(splits["validation"]) == 5 and len(splits["train"]) == 35
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"path": str(tmp_path / "dd"), "splits": {"train": "dev"}}))
    with pytest.raises(DataError, match=r"no split \['dev'\]; it has \['train', 'validation'\]"):
        load_splits(DataConfig(dataset=str(tmp_path / "bad.yaml")), seed=0)


def test_unlabeled_transfer_text_joins_train_without_labels_and_spreads(tmp_path):
    write_tsv(tmp_path / "labeled.tsv", reviews(40))
    pd.DataFrame({"sentence": [f"plain text {i}" for i in range(60)]}).to_csv(tmp_path / "more.csv", index=False)
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({
        "path": str(tmp_path / "labeled.tsv"), "unlabeled": [str(tmp_path / "more.csv")],
        "text_columns": ["sentence"], "label_names": [0, 1],
    }))  # fmt: skip
    splits = load_splits(DataConfig(dataset=str(tmp_path / "d.yaml"), test_size=5, validation_size=5), seed=0)
    train = splits["train"]
    unlabeled = np.array([t[0].startswith("plain") for t in train.texts])
    assert unlabeled.sum() == 60 and not train.labeled[unlabeled].any()
    assert train.labeled[~unlabeled].all() and len(train) == 90
    assert not unlabeled[:16].all() and unlabeled[:45].sum() < 45  # shuffled: labels are not all in the last shards
    assert not any(t[0].startswith("plain") for t in splits["test"].texts + splits["validation"].texts)


def test_headerless_tsv_with_quote_characters_as_text(tmp_path):
    rows = [(f'a "quoted {i}" word', i % 2) for i in range(30)]
    write_tsv(tmp_path / "raw.tsv", rows, header=False)
    spec = DatasetSpec(path=str(tmp_path / "raw.tsv"), column_names=("sentence", "label"), quoting=False,
                       text_columns=("sentence",), label_names=("0", "1"))  # fmt: skip
    data = load_text_data(spec)
    assert len(data) == 30 and data.texts[0] == ('a "quoted 0" word',) and data.labels[:2].tolist() == [0, 1]


def test_unusable_rows_are_counted_by_reason_and_a_file_without_any_is_one_error(tmp_path):
    pd.DataFrame({"text": ["good", "", None, "fine", "bad", "meh"], "label": ["pos", "pos", "neg", "?", "neg", None]}
                 ).to_csv(tmp_path / "d.csv", index=False)  # fmt: skip
    spec = DatasetSpec(path=str(tmp_path / "d.csv"), label_names=("neg", "pos"))
    (data,), dropped = to_text_data(read_sources(spec), spec)[0].values(), to_text_data(read_sources(spec), spec)[1]
    assert data.texts == [("good",), ("bad",)]
    assert dropped[WHOLE] == {"label not in label_names": 2, "empty text": 2}
    none = DatasetSpec(path=str(tmp_path / "d.csv"), label_names=("x", "y"))
    with pytest.raises(DataError, match=r"data set of .*d.csv: no usable row .* label_names is \['x', 'y'\]"):
        to_text_data(read_sources(none), none)


def test_max_examples_scales_the_sizes_given_as_counts(tmp_path):
    write_tsv(tmp_path / "d.tsv", reviews(1000))
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"path": str(tmp_path / "d.tsv"), "text_columns": ["sentence"]}))
    cfg = DataConfig(dataset=str(tmp_path / "d.yaml"), test_size=200, validation_size=100, labeled_train_size=300,
                     max_examples=100)  # fmt: skip
    splits = load_splits(cfg, seed=0)
    assert (len(splits["test"]), len(splits["validation"]), len(splits["train"])) == (20, 10, 70)
    assert splits["train"].labeled.sum() == 30
    assert "--max-examples 100 of 1,000 rows scales test_size 200 -> 20, validation_size 100 -> 10" in splits.summary()


def test_a_data_set_in_the_local_hugging_face_cache_by_name(tmp_path, monkeypatch):
    """As if `load_dataset("kdcache-test/reviews")` had run online once: offline, it loads from the cache."""
    import glob
    import os
    import shutil

    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    frame = pd.DataFrame({"text": [t for t, _ in reviews(30)], "label": [y for _, y in reviews(30)]})
    frame.to_parquet(tmp_path / "train.parquet")
    frame.iloc[:10].assign(text=[f"held out {i}" for i in range(10)]).to_parquet(tmp_path / "test.parquet")
    files = {"train": str(tmp_path / "train.parquet"), "test": str(tmp_path / "test.parquet")}
    datasets.load_dataset("parquet", data_files=files, cache_dir=str(cache))
    built = next(p for p in glob.glob(str(cache / "parquet" / "*" / "*" / "*")) if os.path.isdir(p))
    target = cache / "kdcache-test___reviews" / "default" / "0.0.0" / os.path.basename(built)
    shutil.copytree(built, target)
    for name in os.listdir(target):  # the cache names a hub data set's files after it
        os.rename(target / name, target / name.replace("parquet-", "reviews-"))
    (tmp_path / "hub.yaml").write_text(yaml.safe_dump({"hub": "kdcache-test/reviews", "label_names": [0, 1]}))
    splits = load_splits(DataConfig(dataset=str(tmp_path / "hub.yaml"), validation_size=5), seed=0)
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (25, 5, 10)
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump({"hub": "kdcache-test/absent"}))
    with pytest.raises(DataError, match="'kdcache-test/absent' .* is not in the local Hugging Face cache"):
        load_splits(DataConfig(dataset=str(tmp_path / "missing.yaml")), seed=0)

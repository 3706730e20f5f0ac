"""Shared fixtures: a tiny BERT teacher built from a config, a tiny labeled data set, a config."""

from __future__ import annotations

import csv
import logging
import lzma
import os
import random
import socket
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from pipeline.config import load_config

GOOD = ["great", "moving", "brilliant", "funny", "warm", "sharp", "lovely", "smart"]
BAD = ["dull", "flat", "boring", "clumsy", "tired", "messy", "bland", "weak"]
FILLER = ["the", "film", "movie", "story", "is", "a", "and", "very", "plot", "cast", "but", "so"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def review(rng: random.Random, positive: bool) -> str:
    words = rng.choices(FILLER, k=rng.randint(2, 12)) + rng.choices(GOOD if positive else BAD, k=rng.randint(1, 3))
    rng.shuffle(words)
    return " ".join(words)


def write_reviews(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "sentiment"])
        for i in range(rows):
            positive = i % 2 == 0
            writer.writerow([review(rng, positive), "pos" if positive else "neg"])
        writer.writerow(["a plot summary row that is dropped", "plot"])


def write_pairs(path: Path, rows: int, seed: int = 0) -> None:
    """Sentence pairs labeled 1 when the second text's sentiment agrees with the first's."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["premise", "hypothesis", "label"])
        for i in range(rows):
            positive, agrees = i % 2 == 0, i % 4 < 2
            writer.writerow([review(rng, positive), review(rng, positive == agrees), int(agrees)])


def build_tiny_teacher(directory: Path, *, layers: int = 4, hidden: int = 32, seed: int = 0) -> Path:
    """A random tiny BERT classifier and a word-level tokenizer, saved like a real checkpoint."""
    directory.mkdir(parents=True, exist_ok=True)
    words = SPECIAL + sorted(set(GOOD + BAD + FILLER + ["summary", "row", "that", "dropped"]))
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(words)})
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=2,
    )  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def build_tiny_lm(directory: Path, *, layers: int = 4, seed: int = 0) -> Path:
    """A random tiny Llama causal LM (grouped-query attention, tied embeddings) and a word-level
    tokenizer with an end-of-sequence token and a chat template, saved like a real checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    words = ["<pad>", "<unk>", "</s>", *sorted(set(GOOD + BAD + FILLER))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = (  # in the vocabulary's words: a user turn, then the assistant's header
        "{% for m in messages %}the story {{ m['content'] }} so {% endfor %}"
        "{% if add_generation_prompt %}the film is{% endif %}"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="session")
def lm_dataset(tmp_path_factory) -> Path:
    """A dataset definition over 200 synthetic documents of 3 to 30 words, text only."""
    root = tmp_path_factory.mktemp("lm-data")
    rng = random.Random(0)
    with open(root / "docs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text"])
        for _ in range(200):
            writer.writerow([" ".join(rng.choices(GOOD + BAD + FILLER, k=rng.randint(3, 30)))])
    return write_definition(root / "docs.yaml", path=str(root / "docs.csv"), text_columns=["text"])


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    return build_tiny_teacher(tmp_path_factory.mktemp("tiny-teacher"))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A dataset definition (YAML) over 120 synthetic reviews plus one row to drop."""
    root = tmp_path_factory.mktemp("tiny-data")
    write_reviews(root / "reviews.csv", 120)
    return write_definition(root / "reviews.yaml", path=str(root / "reviews.csv"), text_columns=["review"],
                            label_column="sentiment", label_names=["neg", "pos"])  # fmt: skip


@pytest.fixture(scope="session")
def pairs_dataset(tmp_path_factory) -> Path:
    """A dataset definition over 120 synthetic sentence pairs (premise, hypothesis, label)."""
    root = tmp_path_factory.mktemp("pairs-data")
    write_pairs(root / "pairs.csv", 120)
    return write_definition(root / "pairs.yaml", path=str(root / "pairs.csv"), text_columns=["premise", "hypothesis"],
                            label_column="label")  # fmt: skip


def write_definition(definition: Path, **fields) -> Path:
    """A dataset definition (YAML) with these fields, at ``definition``."""
    definition.write_text(yaml.safe_dump(fields))
    return definition


def tiny_config_dict(tmp_path: Path, teacher: Path, dataset: Path) -> dict:
    return {
        "name": "tiny",
        "seed": 0,
        "data": {"dataset": str(dataset), "test_size": 20, "validation_size": 20, "labeled_train_size": 50,
                 "max_length": 32},
        "teacher": {"base_model": str(teacher), "epochs": 1, "learning_rate": 1e-3, "batch_size": 16,
                    "output_root": str(tmp_path / "teachers")},
        "capture": {"hidden_layers": [0, 2, 4], "attention_layers": [2, 4], "batch_size": 8, "shard_rows": 16,
                    "cache_root": str(tmp_path / "caches")},
        "distill": {
            "students": [{"name": "tiny-l2", "teacher_layers": [2, 4]}],
            "loss": [{"kind": "kl", "weight": 0.5, "temperature": 2.0}, {"kind": "ce", "weight": 0.5},
                     {"kind": "hidden_mse", "weight": 1.0}, {"kind": "attention_kl", "weight": 1.0}],
            "epochs": 1, "learning_rate": 1e-3, "batch_size": 16, "run_root": str(tmp_path / "runs"),
        },
    }  # fmt: skip


@pytest.fixture
def config_file(tmp_path, tiny_teacher, tiny_dataset) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tmp_path, tiny_teacher, tiny_dataset)))
    return path


@pytest.fixture
def config(config_file):
    return load_config(config_file)


@pytest.fixture(scope="session")
def s3_bucket():
    """A bucket on a moto server at 127.0.0.1; AWS_ENDPOINT_URL points s3fs at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
    }
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")  # fmt: skip
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"kdcache-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem().mkdir(bucket)
    yield bucket
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


TAGS = ["O", "B-good", "I-good", "B-bad"]


def tagged_sentence(rng: random.Random) -> list[tuple[str, str]]:
    """Filler words around one or two entities: a run of GOOD words (good), a BAD word (bad)."""
    words = [(w, "O") for w in rng.choices(FILLER, k=rng.randint(2, 8))]
    for _ in range(rng.randint(1, 2)):
        at = rng.randint(0, len(words))
        if rng.random() < 0.5:
            run = rng.choices(GOOD, k=rng.randint(1, 2))
            entity = [(run[0], "B-good")] + [(w, "I-good") for w in run[1:]]
        else:
            entity = [(rng.choice(BAD), "B-bad")]
        words[at:at] = entity
    return words


def write_conll(path, sentences: int, seed: int) -> None:
    rng = random.Random(seed)
    text = "-DOCSTART-\tO\n\n" + "".join(
        "".join(f"{w}\t{t}\n" for w, t in tagged_sentence(rng)) + "\n" for _ in range(sentences)
    )
    if path.suffix == ".xz":
        path.write_bytes(lzma.compress(text.encode()))
    else:
        path.write_text(text)


@pytest.fixture(scope="session")
def ner_dataset(tmp_path_factory):
    """CoNLL train (xz-compressed), dev and test files of synthetic tagged sentences, with their own splits."""
    root = tmp_path_factory.mktemp("ner-data")
    for name, n, seed in (("train.conll.xz", 120, 0), ("dev.conll", 20, 1), ("test.conll", 20, 2)):
        write_conll(root / name, n, seed)
    files = {"train": str(root / "train.conll.xz"), "validation": str(root / "dev.conll"),
             "test": str(root / "test.conll")}  # fmt: skip
    return write_definition(root / "ner.yaml", files=files, text_columns=["tokens"], label_column="tags",
                            label_names=TAGS)  # fmt: skip


def task_config(tmp_path, tiny_teacher, dataset, task: str, **data) -> dict:
    raw = tiny_config_dict(tmp_path, tiny_teacher, dataset)
    raw["task"] = task
    raw["data"] = {"dataset": str(dataset), "validation_size": 20, "max_length": 24, **data}
    raw["teacher"]["epochs"] = 2
    raw["distill"]["loss"] = [{"kind": "kl", "weight": 0.5}, {"kind": "ce", "weight": 0.5},
                              {"kind": "hidden_mse", "weight": 1.0}]  # fmt: skip
    raw["capture"]["attention_layers"] = []
    return raw

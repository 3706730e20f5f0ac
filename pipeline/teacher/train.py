"""Stage 0: fine-tune the teacher on the task, content-addressed so it is trained once."""

from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig

from cache_store import Fingerprint

from ..config import ExperimentConfig
from ..contract import TEACHER_RECORD, files_fingerprint, update_rows
from ..data import Splits, TextData, load_splits
from ..errors import ConfigError
from ..models import load_tokenizer, model_dir, model_files, save_model
from ..runtime import resolve_device, resolve_precision
from ..tasks import DEFAULT_TASK, Task, task_named
from ..training import Checkpoint, Collator, Learner, collate_rows, fit, length_grouped_batches, predict

TRAINING_VERSION = 2  # part of the key: bumped when the same inputs would train other weights (2: per-learner RNG)


@dataclass(frozen=True)
class TeacherResult:
    path: Path
    key: str
    reused: bool


def teacher_task(cfg: ExperimentConfig) -> Task:
    """The task the teacher is trained and captured for: the config's, else sequence classification."""
    return task_named(cfg.task or DEFAULT_TASK)


def labeled_train(splits: Splits) -> TextData:
    """The training rows the teacher learns from: those with a label."""
    return splits["train"].take(np.flatnonzero(splits["train"].labeled))


def teacher_key(cfg: ExperimentConfig, base: Path, splits: Splits, tokenizer) -> str:
    """Hash of what determines the fine-tuned weights: base model files, the labeled training rows
    and the validation rows (in order), hyperparameters. Unlabeled transfer text is not part of
    it: adding some does not retrain the teacher."""
    fp = Fingerprint("kdcache-teacher-v3").update_files("base", base, model_files(base))
    task = teacher_task(cfg)
    for name, data in (("train", labeled_train(splits)), ("validation", splits["validation"])):
        update_rows(fp, name, task.encode(tokenizer, data, cfg.data))
    fp.update_json("task", task.name)
    ignored = ("base_model", "output_root", "checkpoint_steps", "seed")  # base_model is hashed by content above
    settings = {k: v for k, v in dataclasses.asdict(cfg.teacher).items() if k not in ignored}
    settings |= {"seed": cfg.teacher_seed, "max_length": cfg.data.max_length, "training_version": TRAINING_VERSION}
    return fp.update_json("settings", settings).hexdigest()


def locate_teacher(cfg: ExperimentConfig, splits: Splits) -> tuple[Path, str]:
    """The teacher directory for ``cfg`` and its key; the base model itself when fine_tune is off."""
    base = model_dir(cfg.teacher.base_model)
    if not cfg.teacher.fine_tune:
        if teacher_task(cfg).reads_labels:
            check_teacher_labels(base, splits["train"].label_names)
        return base, files_fingerprint(base)
    key = teacher_key(cfg, base, splits, load_tokenizer(base))
    return Path(cfg.teacher.output_root) / key, key


def check_teacher_labels(teacher: Path, label_names: tuple[str, ...]) -> None:
    """Refuse a ready-made classifier (``fine_tune: false``) whose classes are not the data set's.

    Its ``num_labels`` must equal the number of classes, and its ``id2label`` names must be
    the data set's ``label_names`` in the same order. Names that carry no order are compared
    by position only: Hugging Face's placeholders (``LABEL_0``, ...) on the teacher's side,
    class ids (``0``, ``1``, ...) on the data set's.
    """
    config = AutoConfig.from_pretrained(str(teacher))
    if config.num_labels != len(label_names):
        raise ConfigError(
            f"teacher {teacher} (fine_tune: false) has {config.num_labels} classes, the data set "
            f"{len(label_names)} {list(label_names)}; fine-tune it (teacher.fine_tune: true) or pick a matching model"
        )
    names = [str(config.id2label[i]) for i in range(config.num_labels)]
    positional = names == [f"LABEL_{i}" for i in range(len(names))] or list(label_names) == [
        str(i) for i in range(len(names))
    ]
    if not positional and names != list(label_names):
        raise ConfigError(
            f"teacher {teacher} (fine_tune: false) orders its classes {names}, the data set {list(label_names)}; "
            "set label_names in the dataset definition to the teacher's order"
        )


def require_teacher(cfg: ExperimentConfig, splits: Splits) -> tuple[Path, str]:
    """Like locate_teacher, but refuses a fine-tuned teacher that has not been trained yet."""
    path, key = locate_teacher(cfg, splits)
    if cfg.teacher.fine_tune and not (path / TEACHER_RECORD).exists():
        raise ConfigError(f"no fine-tuned teacher {key} at {path}; run `kdcache teacher-train --config ...` first")
    return path, key


def run_teacher_train(cfg: ExperimentConfig) -> TeacherResult:
    """Fine-tune ``teacher.base_model`` on the labeled training rows, keep the best epoch, save it.

    Reuses an existing teacher with the same key (same base model, data and settings).
    """
    cfg.require("data", "teacher", stage="teacher-train")
    task = teacher_task(cfg)
    splits = load_splits(cfg.data, seed=cfg.seed, task=task)
    print(splits.summary())
    path, key = locate_teacher(cfg, splits)
    if not cfg.teacher.fine_tune:
        print(f"teacher: using {cfg.teacher.base_model} as is (fine_tune: false)")
        return TeacherResult(path, key, reused=True)
    if (path / TEACHER_RECORD).exists():
        print(f"reused teacher {key} at {path}")
        return TeacherResult(path, key, reused=True)
    base = model_dir(cfg.teacher.base_model)
    tokenizer = load_tokenizer(base)
    train = labeled_train(splits)
    train_rows = task.encode(tokenizer, train, cfg.data)
    validation = task.encode(tokenizer, splits["validation"], cfg.data)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.teacher_seed)
    model = task.load_model(base, num_labels=len(train.label_names)).to(device)
    model.config.id2label = dict(enumerate(train.label_names))
    model.config.label2id = {name: i for i, name in enumerate(train.label_names)}
    collate = Collator.for_model(tokenizer, model.config)
    batch_size = cfg.teacher.batch_size

    lengths = train_rows.lengths
    steps = len(length_grouped_batches(lengths, batch_size, np.random.default_rng(0)))

    def epoch_batches(epoch: int, start: int):
        order = length_grouped_batches(lengths, batch_size, np.random.default_rng([cfg.teacher_seed, epoch]))
        for index in order[start:]:
            yield collate_rows(collate, train_rows, index, task.batch_columns)

    def step_loss(batch, step):
        out = model(**{k: batch[k] for k in collate.inputs})
        return task.hard_loss(task.outputs(out), batch), {}

    checkpoint = Checkpoint(path.with_name(f".{path.name}.checkpoint.pt"))  # beside the teacher, hidden
    tqdm.write(f"teacher: fine-tuning {cfg.teacher.base_model} for {task.name} on {len(train)} labeled rows "
               f"({len(train_rows)} features, {device})")  # fmt: skip
    learner = Learner(
        name="teacher",
        model=model,
        trainable=[model],
        step_loss=step_loss,
        validate=lambda: task.metrics(
            predict(model, validation, task=task, collate=collate), validation, train.label_names
        ),  # fmt: skip
        lr=cfg.teacher.learning_rate,
        weight_decay=cfg.teacher.weight_decay,
        warmup_ratio=cfg.teacher.warmup_ratio,
        seed=cfg.teacher_seed,
        primary_metric=task.primary_metric,
        lower_is_better=task.lower_is_better,
    )
    fit(
        [learner],
        epochs=cfg.teacher.epochs,
        steps_per_epoch=steps,
        epoch_batches=epoch_batches,
        desc="teacher",
        device=device,
        precision=resolve_precision(cfg.teacher.precision, device),
        checkpoint=checkpoint,
        checkpoint_steps=cfg.teacher.checkpoint_steps,
    )
    history = learner.history
    _save_atomically(model, tokenizer, path, record={
        "key": key,
        "base_model": cfg.teacher.base_model,
        "labeled_rows": len(train),
        "steps": history[-1].steps,
        "history": [dataclasses.asdict(h) for h in history],
    })  # fmt: skip
    checkpoint.remove()
    best = max(history, key=lambda h: task.score(h.validation)).validation[task.primary_metric]
    print(f"trained teacher {key} at {path} (validation {task.primary_metric} {best:.4f})")
    return TeacherResult(path, key, reused=False)


def _save_atomically(model, tokenizer, path: Path, *, record: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        save_model(model, tokenizer, tmp)
        record = {**record, "fingerprint": files_fingerprint(tmp)}  # hashed once, here; stages read it back
        (tmp / TEACHER_RECORD).write_text(json.dumps(record, indent=1))
        if path.exists():  # an incomplete directory from an interrupted run
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

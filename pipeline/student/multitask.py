"""Several tasks per student: one shared encoder with a head per task, each task from its own teacher's cache.

``distill.tasks`` names the caches (one teacher each; their tokenizers must agree). A run
first trains, per task, the configured students and baselines alone, exactly as a
single-task run would (``<run>/<task>/``); then, per seed, each student once as a
multi-task model: the encoder built as the student says (cut from the first task's
teacher, for a cut student), and for every other task a head of that task's shape on
the same encoder. Its epoch interleaves the tasks' planned batches by
``distill.task_sampling`` (``TaskMixture``); each batch trains the shared encoder and its
task's head, against its task's teacher. Each task's report gets the multi-task rows
beside its single-task students; ``<run>/report.md`` puts the tasks side by side.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import ExperimentConfig, StudentConfig, TaskSampling, is_config_file
from ..errors import ConfigError
from ..models import count_parameters, directory_bytes, save_model
from ..report import ModelResult, write_multitask_report, write_report
from ..runtime import Ranks, resolve_device
from ..tracking import open_trackers
from ..training import Checkpoint, Collator, Learner, evaluate, fit, predict
from .inputs import TeacherCache, named_location, teacher_roots
from .losses import ATTENTION_TERMS
from .objective import Objective, layer_pairs
from .streaming import CacheSource, StudentStream
from .students import build_student, check_student_fits

TASK = "task"  # the batch key of the task a batch trains (its position in distill.tasks)
MULTITASK = "multi-task"  # the role of a multi-task student's rows in the reports


def task_shares(steps: list[int], sampling: TaskSampling) -> list[int]:
    """How many of an epoch's ``sum(steps)`` batches each task gets (``steps``: its batches per own epoch)."""
    if sampling.rule == "proportional":
        return list(steps)
    weights = np.ones(len(steps)) if sampling.rule == "round_robin" else np.asarray(steps) ** (1 / sampling.temperature)
    exact = sum(steps) * weights / weights.sum()
    shares = np.floor(exact).astype(int)
    for k in np.argsort(-(exact - shares), kind="stable")[: sum(steps) - shares.sum()]:  # largest remainders
        shares[k] += 1
    return shares.tolist()


def task_order(shares: list[int], sampling: TaskSampling, *, seed: int, epoch: int) -> np.ndarray:
    """The task of each batch of ``epoch``: the tasks in turn (round robin, while each has share left), or
    every task's share in a random order drawn from ``(seed, epoch)``."""
    if sampling.rule == "round_robin":
        return np.array([k for r in range(max(shares)) for k, share in enumerate(shares) if r < share])
    return np.random.default_rng([seed, epoch]).permutation(np.repeat(np.arange(len(shares)), shares))


class TaskMixture:
    """The batches of a multi-task student's epochs: each task's planned stream, interleaved by ``task_order``.

    A task's batches follow each other in its own stream's order across the multi-task epochs
    (its share of epoch e starts where epoch e - 1 left it), so a resumed run starts at any
    batch without reading what came before.
    """

    def __init__(self, streams: list[StudentStream], sampling: TaskSampling, *, seed: int):
        self.streams, self.sampling, self.seed = streams, sampling, seed
        self.steps = [stream.steps(0) for stream in streams]
        self.shares = task_shares(self.steps, sampling)

    def __len__(self) -> int:
        return sum(self.shares)

    def batches(self, epoch: int, start: int = 0, **loader) -> Iterator[dict[str, torch.Tensor]]:
        """Epoch ``epoch`` from batch ``start``, each batch with its task (``TASK``); ``loader``: DataLoader options."""
        order = task_order(self.shares, self.sampling, seed=self.seed, epoch=epoch)
        sources = [self._from(k, epoch * share + int((order[:start] == k).sum()), loader)
                   for k, share in enumerate(self.shares)]  # fmt: skip
        for k in order[start:]:
            yield next(sources[k]) | {TASK: torch.tensor(int(k))}

    def _from(self, k: int, done: int, loader: dict) -> Iterator[dict[str, torch.Tensor]]:
        """Task ``k``'s batches after its first ``done``, on through its stream's epochs."""
        epoch, offset = divmod(done, self.steps[k])
        while True:
            yield from self.streams[k].loader(epoch, offset, **loader)
            epoch, offset = epoch + 1, 0


def shared_encoder_models(first: nn.Module, caches: list[TeacherCache], *, attention_maps: bool) -> list[nn.Module]:
    """``first`` (the first task's model) and, for each other task, a model of its shape and classes whose
    encoder is ``first``'s own (the same modules, so every task trains it); their heads start at random."""
    encoder = getattr(first, first.base_model_prefix)
    models = [first]
    for cache in caches[1:]:
        config = copy.deepcopy(first.config)
        names = cache.label_names
        config.num_labels = len(names)
        config.id2label, config.label2id = dict(enumerate(names)), {name: i for i, name in enumerate(names)}
        model = cache.task.model_from_config(config)
        setattr(model, model.base_model_prefix, encoder)
        model.set_attn_implementation("eager" if attention_maps else "sdpa")
        models.append(model)
    return models


def run_multitask(cfg: ExperimentConfig, ranks: Ranks, run_dir: Path, single_task) -> list[ModelResult]:
    """Every student alone on each task (``single_task(cfg, location, run_dir)``, the single-task run), then
    as a multi-task model per seed; each task's report with both, and the tasks side by side.

    Raises:
        ConfigError: torchrun, tasks whose tokenizers differ, a causal LM task, or a LoRA student.
    """
    if ranks.world > 1:
        raise ConfigError("multi-task students train in one process; run distill.tasks without torchrun")
    locations = [named_location(t.cache) for t in cfg.distill.tasks]
    caches = [TeacherCache(location) for location in locations]
    names = [t.name or (Path(t.cache).stem if is_config_file(t.cache) else c.key)
             for t, c in zip(cfg.distill.tasks, caches, strict=True)]  # fmt: skip
    _check_tasks(cfg, caches, names)
    single = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, tasks=()))
    results = {name: single_task(single, location, run_dir / name) for name, location in zip(names, locations,
                                                                                              strict=True)}  # fmt: skip
    device = resolve_device(cfg.device, ranks)
    first = caches[0]
    teacher_model = None
    if any(spec.teacher_layers is not None for spec in cfg.distill.students):
        teacher_model = first.task.load_model(first.teacher_dir(search=teacher_roots(cfg)))
    sources = [CacheSource(cache.cache, "train") for cache in caches]
    for seed in cfg.distill.seeds:
        record = run_dir / "passes" / f"seed{seed}-{MULTITASK}.json"
        if not record.exists():
            trained = train_multitask(cfg, caches, names, sources, run_dir, f"seed{seed}-{MULTITASK}", seed=seed,
                                      device=device, teacher_model=teacher_model)  # fmt: skip
            done = []
            for spec, (models, history) in zip(cfg.distill.students, trained, strict=True):
                best = max(history, key=lambda h: h.validation["mean_score"])
                for name, cache, model in zip(names, caches, models, strict=True):
                    directory = run_dir / "models" / f"{spec.name}-{MULTITASK}-{name}-seed{seed}"
                    save_model(model, cache.tokenizer, directory)
                    test = evaluate(model.to(device), cache.rows("test"), task=cache.task, label_names=cache.label_names,
                                    collate=Collator.for_model(cache.tokenizer, model.config))  # fmt: skip
                    result = ModelResult(
                        name=f"{spec.name}-{MULTITASK}", role=MULTITASK, seed=seed, metrics=test.metrics,
                        params=count_parameters(model), size_bytes=directory_bytes(directory),
                        examples_per_s=test.examples_per_s, tokens_per_s=test.tokens_per_s, path=str(directory),
                        steps=history[-1].steps, best_epoch=best.epoch)  # fmt: skip
                    done.append({"task": name, **dataclasses.asdict(result)})
            record.parent.mkdir(exist_ok=True)
            record.write_text(json.dumps(done, indent=1))
            for path in (run_dir / "checkpoints").glob(f"seed{seed}-{MULTITASK}*.pt"):
                path.unlink()
        for entry in json.loads(record.read_text()):
            results[entry.pop("task")].append(ModelResult(**entry))
    summaries = {}
    for name, cache in zip(names, caches, strict=True):
        summaries[name] = (cache.task, write_report(run_dir / name, results[name], task=cache.task,
                                                    config=dataclasses.asdict(cfg), cache_key=cache.key))  # fmt: skip
    write_multitask_report(run_dir, summaries)
    return [r for name in names for r in results[name]]


def _check_tasks(cfg: ExperimentConfig, caches: list[TeacherCache], names: list[str]) -> None:
    if len(set(names)) != len(names):
        raise ConfigError(f"distill.tasks: task names must differ; got {names} (give each a name:)")
    for name, cache in zip(names, caches, strict=True):
        if cache.meta.tokenizer_fingerprint != caches[0].meta.tokenizer_fingerprint:
            raise ConfigError(
                f"distill.tasks: the caches of {names[0]} ({caches[0].key}) and {name} ({cache.key}) use different "
                "tokenizers; one student encoder reads one vocabulary"
            )
        if cache.task.caches_distributions:
            raise ConfigError(f"distill.tasks: {name} is a {cache.task.name} cache; multi-task students take "
                              "classification and question-answering tasks")  # fmt: skip
    for spec in cfg.distill.students:
        if spec.lora is not None or spec.teachers is not None:
            raise ConfigError(f"student {spec.name!r}: a multi-task student takes no lora or teachers")
        for cache in caches:
            check_student_fits(spec, cfg.distill.loss, cache, cache.stored("train"))


def train_multitask(cfg: ExperimentConfig, caches: list[TeacherCache], names: list[str], sources: list[CacheSource],
                    run_dir: Path, name: str, *, seed: int, device: torch.device,
                    teacher_model: nn.Module | None) -> list[tuple[list[nn.Module], list]]:  # fmt: skip
    """One multi-task pass: every student, each as one model per task on a shared encoder, on the same
    interleaved batches. Returns per student its task models (best validation epoch by the mean of the
    tasks' scores) and its epochs."""
    students, wanted = [], [set() for _ in caches]  # per student: (spec, task models, task objectives)
    for spec in cfg.distill.students:
        torch.manual_seed(seed)
        terms = spec.loss or cfg.distill.loss
        attention = any(t.kind in ATTENTION_TERMS for t in terms)
        first = build_student(spec, caches[0], teacher_model, attention_maps=attention)
        models = [m.to(device) for m in shared_encoder_models(first, caches, attention_maps=attention)]
        objectives = []
        for k, (cache, model) in enumerate(zip(caches, models, strict=True)):
            pairs = layer_pairs(spec, model.config.num_hidden_layers, cache.teacher_config.num_hidden_layers)
            objective = Objective(model, cache.task, terms, pairs, teacher_width=cache.teacher_config.hidden_size,
                                  inputs=Collator.for_model(cache.tokenizer, model.config).inputs,
                                  attention_heads=cache.meta.stored_heads).to(device)  # fmt: skip
            wanted[k] |= set(objective.wanted)
            objectives.append(objective)
        students.append((spec, models, nn.ModuleList(objectives)))
    streams = [StudentStream(source, task=cache.task, collate=Collator.for_tokenizer(cache.tokenizer),
                             batch_size=cfg.distill.batch_size, seed=seed, wanted=sorted(wanted[k]),
                             block_rows=cfg.distill.block_rows, buffer_rows=cfg.distill.buffer_rows)
               for k, (cache, source) in enumerate(zip(caches, sources, strict=True))]  # fmt: skip
    mixture = TaskMixture(streams, cfg.distill.task_sampling, seed=seed)
    total = cfg.distill.epochs * len(mixture)
    learners = [_learner(cfg, spec, caches, names, models, objectives, seed=seed, total=total)
                for spec, models, objectives in students]  # fmt: skip
    fit(
        learners,
        epochs=cfg.distill.epochs,
        steps_per_epoch=len(mixture),
        epoch_batches=lambda epoch, start: mixture.batches(epoch, start, pin_memory=device.type == "cuda"),
        desc=f"{name} ({len(caches)} tasks)",
        device=device,
        checkpoint=Checkpoint(run_dir / "checkpoints" / f"{name}.pt"),
        checkpoint_steps=cfg.distill.checkpoint_steps,
        trackers=open_trackers(
            cfg.distill.trackers, run_dir, name, [learner.name for learner in learners], config=dataclasses.asdict(cfg)
        ),  # fmt: skip
    )
    return [(models, learner.history) for (_, models, _), learner in zip(students, learners, strict=True)]


def _learner(cfg: ExperimentConfig, spec: StudentConfig, caches: list[TeacherCache], names: list[str],
             models: list[nn.Module], objectives: nn.ModuleList, *, seed: int, total: int) -> Learner:  # fmt: skip
    """A multi-task student as one learner: a batch's loss is its task's objective; validation gives each
    task's metrics (``<task>/<metric>``) and their mean score, which picks the best epoch."""
    validation = [cache.rows("validation") for cache in caches]

    def validate() -> dict[str, float]:
        metrics, scores = {}, []
        for name, cache, model, rows in zip(names, caches, models, validation, strict=True):
            collate = Collator.for_model(cache.tokenizer, model.config)
            found = cache.task.metrics(predict(model, rows, task=cache.task, collate=collate), rows, cache.label_names)
            metrics |= {f"{name}/{metric}": value for metric, value in found.items()}
            scores.append(cache.task.score(found))
        return metrics | {"mean_score": float(np.mean(scores))}

    return Learner(name=f"{spec.name}-{MULTITASK}", model=nn.ModuleList(models), trainable=[objectives],
                   step_loss=lambda batch, step: objectives[int(batch[TASK])](batch, progress=step / max(total - 1, 1)),
                   validate=validate, lr=cfg.distill.learning_rate, weight_decay=cfg.distill.weight_decay,
                   warmup_ratio=cfg.distill.warmup_ratio, seed=seed, primary_metric="mean_score")  # fmt: skip

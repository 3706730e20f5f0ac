"""Stage 2: train the students from a teacher cache, plus their hard-label baselines.

Everything comes from the cache (``inputs.TeacherCache``): the training stream, the
validation and test rows, the tokenizer, the label names and the teacher's row of the
report. The teacher's weights are loaded only for students cut from its layers, or with
``--online``. A run is a sequence of passes, one per seed and kind (distilled, then
baselines). In a pass every student trains on the same streamed batches, so the cache is
read once for all of them; each student has its own optimizer and random state, so it
trains exactly as it would alone. A pass checkpoints as it goes; ``--resume`` continues
an interrupted run at the step it reached, and skips the passes it had finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from cache_store import Location

from ..config import ExperimentConfig, StudentConfig
from ..errors import ConfigError
from ..models import count_parameters, directory_bytes, save_model
from ..report import ModelResult, write_report
from ..runtime import ALONE, Ranks, barrier, process_group, resolve_device
from ..tasks.causal_lm import continuations
from ..tracking import open_trackers
from ..training import Checkpoint, Collator, EpochRecord, Learner, evaluate, fit, predict
from .inputs import TeacherCache, open_teachers, teacher_locations, teacher_roots
from .losses import ATTENTION_TERMS
from .multitask import run_multitask
from .objective import BASELINE_LOSS, Objective, layer_pairs
from .streaming import CacheSource, LiveTeacher, Select, StudentStream, TokenSource, row_selection
from .students import build_student, check_student_fits, feature_teacher, merged

CONFIG_RECORD = "config.json"


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    models: list[ModelResult]


def run_distill(cfg: ExperimentConfig, *, cache_location: str | Location | None = None, online: bool = False,
                resume: str | Path | None = None, select: Select | None = None,
                teacher: str | None = None) -> RunResult:  # fmt: skip
    """Distill every configured student (for each seed) from a teacher cache, evaluate them, write the report.

    Args:
        cache_location: the cache (a path or URL, e.g. a shared one); None: ``distill.teachers``, or
            the cache ``teacher-cache`` made for this config (``teacher_locations``).
        online: run the teacher live on every batch instead of reading its outputs from the
            cache (the batches are the same; for comparison).
        resume: a run directory to continue (its config must be this one).
        select: sample selection over the cached teacher statistics (rows to stream).
        teacher: a local copy of the cache's teacher, for cut students or ``online`` when the
            cache does not bundle it (checked against the cache's fingerprint).

    Raises:
        ConfigError: a student that does not fit the cache, a teacher that cannot be found,
            or a resumed run of another config.
        CacheError: no cache there, or a damaged one.
    """
    cfg.require("distill", stage="distill")
    ranks = Ranks.from_env()
    if cfg.distill.tasks:
        if cache_location is not None or online or select is not None:
            raise ConfigError("distill.tasks names every task's cache; --cache, --online and select do not apply")
        with process_group(ranks):
            run_dir = _run_dir(cfg, resume, ranks, tqdm.write)

            def single_task(task_cfg: ExperimentConfig, location, task_dir: Path) -> list[ModelResult]:
                return _distill(task_cfg, ranks, [location], online=False, resume=None, select=None, teacher=teacher,
                                run_dir=task_dir).models  # fmt: skip

            return RunResult(run_dir, run_multitask(cfg, ranks, run_dir, single_task))
    locations = teacher_locations(cfg, cache_location)
    with process_group(ranks):
        return _distill(cfg, ranks, locations, online=online, resume=resume, select=select, teacher=teacher)


def _distill(cfg: ExperimentConfig, ranks: Ranks, locations: list, *, online: bool, resume: str | Path | None,
             select: Select | None, teacher: str | None, run_dir: Path | None = None) -> RunResult:  # fmt: skip
    """One task's run from its teachers' caches (in ``run_dir``, made there when given; else a new or resumed one)."""
    say = tqdm.write if ranks.is_main else lambda message: None
    teachers = open_teachers(locations)
    cache = teachers[0]
    if cfg.task is not None and cfg.task != cache.meta.task:
        raise ConfigError(
            f"config {cfg.name!r} is for {cfg.task}, but cache {cache.key} holds a {cache.meta.task} teacher"
        )
    task, manifest = cache.task, cache.cache.manifest
    for k, each in enumerate(teachers):
        say(f"distill: reading cache {each.key} ({each.cache.manifest.rows} rows, {each.cache.manifest.bytes / 1e6:.1f} "
            f"MB) of teacher {f'{k} ' if len(teachers) > 1 else ''}{each.meta.teacher_name}")  # fmt: skip
    if select is None and (cfg.distill.select is not None or cfg.distill.curriculum is not None):
        select = row_selection(cfg.distill.select, cfg.distill.curriculum, epochs=cfg.distill.epochs)
    if online and select is not None:
        raise ConfigError("sample selection reads cached teacher statistics; it cannot run with --online")
    if online and len(teachers) > 1:
        raise ConfigError("--online runs one teacher live; distill.teachers names several")
    if select is not None and task.per_token:
        raise ConfigError(f"sample selection reads one logit vector per row; cache {cache.key} is {task.name}")
    for spec in cfg.distill.students:
        features = teachers[feature_teacher(spec, cfg.distill.loss)]
        check_student_fits(spec, cfg.distill.loss, features, None if online else features.stored("train"),
                           teachers=len(spec.teachers or teachers))  # fmt: skip
    teacher_model = None
    if online or any(spec.teacher_layers is not None for spec in cfg.distill.students):
        teacher_model = task.load_model(cache.teacher_dir(teacher, search=teacher_roots(cfg)))
    if online:
        source = TokenSource(cache.rows("train"), shard_rows=manifest.shard_rows)
        say("distill: the teacher runs live on every batch (--online)")
    else:
        source = CacheSource([each.cache for each in teachers], "train")
    if run_dir is None:
        run_dir = _run_dir(cfg, resume, ranks, say)
    run_dir.mkdir(parents=True, exist_ok=True)
    test = cache.rows("test")
    device = resolve_device(cfg.device, ranks)
    kinds = (True, False) if cfg.distill.baselines else (True,)
    streams = {}  # kind -> its stream (for the batch counts); a rank with no batch is refused before any training
    for kd in kinds:
        streams[kd] = student_stream(cfg, source, cache, seed=0, kd=kd, select=select, ranks=ranks)
        require_batches(streams[kd], "distilled" if kd else "baselines")
    epochs = {True: cfg.distill.epochs}
    student_steps = sum(map(streams[True].steps, range(cfg.distill.epochs)))
    selection = None  # what distill.select and distill.curriculum kept, for the report
    if select is not None:
        kept = [sum(map(len, streams[True].selected(epoch))) for epoch in range(cfg.distill.epochs)]
        given = {name: getattr(cfg.distill, name) for name in ("select", "curriculum")}
        selection = {name: value and dataclasses.asdict(value) for name, value in given.items()} | {
            "kept_per_epoch": kept, "of": sum(len(source.rows(k)) for k in range(len(source)))}  # fmt: skip
        say(f"distill: the selection keeps {', '.join(f'{n:,}' for n in kept)} of {selection['of']:,} training rows "
            "per epoch (the baselines: the labeled ones among them)")  # fmt: skip
    if cfg.distill.baselines:
        epochs[False] = baseline_epochs(cfg, student_steps=student_steps, steps_in=streams[False].steps)
        baseline_steps = sum(map(streams[False].steps, range(epochs[False])))
        say(f"distill: students train {epochs[True]} epochs ({student_steps} steps), baselines {epochs[False]} "
            f"({baseline_steps} steps: at least as many as their students)")  # fmt: skip

    def evaluated(model, name, role, seed, directory, history, baseline=None) -> ModelResult:
        result = evaluate(model.to(device), test, task=task, label_names=cache.label_names,
                          collate=Collator.for_model(cache.tokenizer, model.config))  # fmt: skip
        samples = cache.meta.samples
        written = continuations(model, cache.tokenizer, samples) if samples else None
        say(f"{name} ({role}, seed {seed}): test {task.primary_metric} {result.metrics[task.primary_metric]:.4f}")
        best = max(history, key=lambda h: task.score(h.validation)) if history else None
        return ModelResult(name=name, role=role, seed=seed, metrics=result.metrics,
                           params=count_parameters(model), size_bytes=directory_bytes(directory),
                           examples_per_s=result.examples_per_s, tokens_per_s=result.tokens_per_s, path=str(directory),
                           steps=history[-1].steps if history else None, best_epoch=best.epoch if best else None,
                           baseline=baseline, continuations=written)  # fmt: skip

    results = []
    live = None
    if online:
        live = LiveTeacher(teacher_model.to(device).eval(), task=task, tokenizer=cache.tokenizer, specs=manifest.tensors,
                           heads=cache.meta.stored_heads, precision=cache.precision, sparse=cache.distribution,
                           seed=cache.sampling_seed)  # fmt: skip
    for seed in cfg.distill.seeds:
        for kd in kinds:
            name = f"seed{seed}-{'distilled' if kd else 'baselines'}"
            record = run_dir / "passes" / f"{name}.json"
            if record.exists():  # finished before the run was interrupted
                results += [ModelResult(**r) for r in json.loads(record.read_text())]
                continue
            trained = train_pass(cfg, cache, source, run_dir, name, seed=seed, kd=kd, epochs=epochs[kd],
                                 device=device, teacher_model=teacher_model, live=live, select=select,
                                 ranks=ranks, teachers=teachers)  # fmt: skip
            barrier(ranks)
            if not ranks.is_main:  # rank 0 saves, evaluates and reports
                continue
            done = []
            for spec, (student, history) in zip(pass_students(cfg, kd), trained, strict=True):
                model_name = model_label(spec, kd)
                directory = run_dir / "models" / f"{model_name}-seed{seed}"
                save_model(student, cache.tokenizer, directory)
                baseline = (
                    model_label(baseline_of(spec, cfg.distill.students), False)
                    if kd and cfg.distill.baselines
                    else None
                )
                role = "student" if kd else "baseline"
                done.append(evaluated(student, model_name, role, seed, directory, history, baseline))
            record.parent.mkdir(exist_ok=True)
            record.write_text(json.dumps([dataclasses.asdict(r) for r in done], indent=1))
            for path in (run_dir / "checkpoints").glob(f"{name}*.pt"):
                path.unlink()
            results += done
    barrier(ranks)
    if ranks.is_main:  # the teacher's row last: timing its inference does not delay the first training step
        results[:0] = [teacher_result(each, teacher_model if k == 0 else None, test, device, seed=cfg.seed,
                                      name="teacher" if k == 0 else f"teacher-{k}")
                       for k, each in enumerate(teachers)]  # fmt: skip
        write_report(run_dir, results, task=task, config=dataclasses.asdict(cfg), cache_key=cache.key,
                     samples=cache.meta.samples, selection=selection)  # fmt: skip
    return RunResult(run_dir, results)


def teacher_result(cache: TeacherCache, model: nn.Module | None, test, device: torch.device, *, seed: int,
                   name: str = "teacher") -> ModelResult:  # fmt: skip
    """The teacher's row of the report, from the cache: its metrics on test from the cached logits,
    its size and steps; its inference speed only when its weights are loaded anyway."""
    card = cache.meta.teacher
    speed = None
    if model is not None:
        collate = Collator.for_model(cache.tokenizer, model.config)
        speed = evaluate(model.to(device), test, task=cache.task, label_names=cache.label_names, collate=collate)
    return ModelResult(name=name, role="teacher", seed=seed, metrics=card.metrics["test"],
                       params=card.params, size_bytes=card.size_bytes,
                       examples_per_s=speed and speed.examples_per_s, tokens_per_s=speed and speed.tokens_per_s,
                       path=cache.meta.teacher_name, steps=card.steps)  # fmt: skip


def student_stream(cfg: ExperimentConfig, source, cache: TeacherCache, *, seed: int, kd: bool,
                   wanted: list[tuple[str, int]] = (), select: Select | None = None, ranks: Ranks = ALONE,
                   distributions: bool = False) -> StudentStream:  # fmt: skip
    """The stream of one pass: every row for students (kd), labeled rows only for baselines.

    Its batches carry every input any model of the cache's tokenizer takes; each model picks its own;
    with ``distributions``, a causal LM cache's next-token distributions.
    """
    return StudentStream(source, task=cache.task, collate=Collator.for_tokenizer(cache.tokenizer),
                         batch_size=cfg.distill.batch_size,
                         seed=seed, wanted=wanted, labeled_only=not kd, select=select,
                         block_rows=cfg.distill.block_rows, buffer_rows=cfg.distill.buffer_rows, rank=ranks.rank,
                         world=ranks.world, distribution=cache.distribution if distributions else None)  # fmt: skip


def baseline_of(spec: StudentConfig, students: tuple[StudentConfig, ...]) -> StudentConfig:
    """The first of ``students`` whose hard-label baseline is ``spec``'s: the same model, built and frozen
    alike (their losses, teachers and layer mappings play no part in a baseline)."""

    def model(s: StudentConfig) -> StudentConfig:
        return dataclasses.replace(s, name="", loss=None, teachers=None, fusion=None, layer_map=None, mapping="auto")

    return next(s for s in students if model(s) == model(spec))


def pass_students(cfg: ExperimentConfig, kd: bool) -> list[StudentConfig]:
    """The models a pass trains: every student (kd), or one baseline per distinct student model."""
    students = cfg.distill.students
    return list(students) if kd else [s for s in students if baseline_of(s, students) is s]


def model_label(spec: StudentConfig, kd: bool) -> str:
    """A model's name in the report: the student's, or its baseline's (``minilm-l2-no-kd``)."""
    return spec.name if kd else f"{spec.name}-no-kd"


def baseline_epochs(cfg: ExperimentConfig, *, student_steps: int, steps_in: Callable[[int], int]) -> int:
    """Epochs for the baselines: ``distill.baseline_epochs``, or by default the fewest (and at least
    the students') that give a baseline at least its student's ``student_steps`` optimizer steps,
    ``steps_in(epoch)`` batches an epoch (it sees only the labeled rows, so its epochs are shorter).
    A baseline keeps its best validation epoch, as a student does.
    """
    if cfg.distill.baseline_epochs is not None:
        return cfg.distill.baseline_epochs
    epochs, steps = 0, 0
    while epochs < cfg.distill.epochs or steps < student_steps:
        steps, epochs = steps + steps_in(epochs), epochs + 1
    return epochs


def require_batches(stream: StudentStream, pass_name: str) -> None:
    """Refuse a pass in which some rank would take no optimizer step (its result would be an untrained model)."""
    counts = stream.batches_per_rank()
    empty = [rank for rank, n in enumerate(counts) if n == 0]
    if empty:
        where = f"rank {empty[0]} of {stream.world}" if stream.world > 1 else "this run"
        what = "labeled rows" if stream.labeled_only else "rows"
        raise ConfigError(
            f"pass {pass_name}: {where} gets no batch: its shards ({len(stream.source)} in all, every "
            f"{stream.world}-th per rank) hold no {what} to train on; use fewer ranks, smaller capture.shard_rows "
            "or more labeled rows"
        )


def train_pass(cfg: ExperimentConfig, teacher: TeacherCache, source, run_dir: Path, name: str, *, seed: int,
               kd: bool, epochs: int, device: torch.device, teacher_model: nn.Module | None = None,
               live: LiveTeacher | None = None, select: Select | None = None, ranks: Ranks = ALONE,
               teachers: list[TeacherCache] | None = None) -> list[tuple[nn.Module, list[EpochRecord]]]:  # fmt: skip
    """Train every student (kd) or every baseline (not kd) of one seed on one stream of batches.

    Under torchrun each rank streams its own part and DDP averages the gradients. Each
    model takes the inputs its own kind takes (segment ids or not), in training,
    validation and test alike.

    Args:
        teacher_model: the teacher, loaded when a student is cut from its layers.
        teachers: every teacher's cache when there are several (``teacher`` is the first; ``source`` reads them all).

    Returns:
        Per student: the model holding its best validation epoch's weights, and its epochs.
    """
    students, objectives, collators = [], [], []
    teachers = teachers or [teacher]
    for spec in pass_students(cfg, kd):
        torch.manual_seed(seed)
        terms = (spec.loss or cfg.distill.loss) if kd else BASELINE_LOSS
        wants_attention = any(t.kind in ATTENTION_TERMS for t in terms)
        student = build_student(spec, teacher, teacher_model, attention_maps=wants_attention).to(device)
        k = feature_teacher(spec, terms)
        features = teachers[k]
        pairs = layer_pairs(spec, student.config.num_hidden_layers, features.teacher_config.num_hidden_layers)
        collate = Collator.for_model(teacher.tokenizer, student.config)
        objective = Objective(student, teacher.task, terms, pairs, teacher_width=features.teacher_config.hidden_size,
                              inputs=collate.inputs, attention_heads=features.meta.stored_heads,
                              sparse=teacher.distribution, teachers=spec.teachers or tuple(range(len(teachers))),
                              fusion=spec.fusion or cfg.distill.fusion, feature_teacher=k)  # fmt: skip
        students.append(student)
        objectives.append(objective.to(device))
        collators.append(collate)
    wanted = sorted({w for objective in objectives for w in objective.wanted})
    stream = student_stream(
        cfg,
        source,
        teacher,
        seed=seed,
        kd=kd,
        select=select,
        ranks=ranks,
        wanted=wanted if live is None else [],
        distributions=kd and live is None,
    )  # the live teacher adds them to each batch
    require_batches(stream, name)
    steps = [stream.steps(epoch) for epoch in range(epochs)]
    total = sum(steps)
    validation, task = teacher.rows("validation"), teacher.task

    def learner(spec: StudentConfig, student: nn.Module, objective: Objective, collate: Collator) -> Learner:
        step_loss = objective if ranks.world == 1 else DistributedDataParallel(objective)  # gradients averaged
        return Learner(
            name=model_label(spec, kd),
            model=student,
            trainable=[objective],
            step_loss=lambda batch, step: step_loss(batch, progress=step / max(total - 1, 1)),
            validate=lambda: task.metrics(
                predict(student, validation, task=task, collate=collate), validation, teacher.label_names
            ),  # fmt: skip
            lr=cfg.distill.learning_rate,
            weight_decay=cfg.distill.weight_decay,
            warmup_ratio=cfg.distill.warmup_ratio,
            seed=seed,
            primary_metric=task.primary_metric,
            lower_is_better=task.lower_is_better,
        )

    def epoch_batches(epoch: int, start: int):
        loader = stream.loader(epoch, start, workers=cfg.distill.loader_workers, pin_memory=device.type == "cuda")
        return loader if live is None else (live.annotate(batch, [(n, t) for _, n, t in wanted]) for batch in loader)

    learners = [learner(*args) for args in zip(pass_students(cfg, kd), students, objectives, collators, strict=True)]
    trackers = None
    if ranks.is_main:
        trackers = open_trackers(cfg.distill.trackers, run_dir, name, [learner.name for learner in learners],
                                 config=dataclasses.asdict(cfg))  # fmt: skip
    fit(
        learners,
        epochs=epochs,
        steps_per_epoch=steps,
        epoch_batches=epoch_batches,
        desc=f"{name} ({len(students)} student{'s' if len(students) > 1 else ''})",
        device=device,
        checkpoint=Checkpoint(run_dir / "checkpoints" / f"{name}{f'.rank{ranks.rank}' if ranks.world > 1 else ''}.pt"),
        checkpoint_steps=cfg.distill.checkpoint_steps,
        trackers=trackers,
        epoch_scalars=lambda epoch: {"rows_kept": sum(map(len, stream.selected(epoch)))},
        quiet=not ranks.is_main,
    )
    return [(merged(student), learner.history) for student, learner in zip(students, learners, strict=True)]


def _run_dir(cfg: ExperimentConfig, resume: str | Path | None, ranks: Ranks, say) -> Path:
    """The run's directory: made (or, resuming, checked) by rank 0, then shared with the other ranks."""
    if ranks.is_main:
        run_dir = _resume_dir(cfg, resume, say) if resume else _new_run_dir(cfg)
        _point_latest(run_dir)
    if ranks.world == 1:
        return run_dir
    import torch.distributed as dist

    encoded = torch.zeros(4096, dtype=torch.uint8)  # the path's bytes, broadcast as a tensor
    if ranks.is_main:
        raw = str(run_dir).encode()
        encoded[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    dist.broadcast(encoded, src=0)
    return Path(bytes(encoded[encoded != 0].tolist()).decode())


def _new_run_dir(cfg: ExperimentConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(cfg.distill.run_root)
    root.mkdir(parents=True, exist_ok=True)
    for attempt in range(100):
        run_dir = root / f"{stamp}-{cfg.name}{f'-{attempt}' if attempt else ''}"
        try:
            run_dir.mkdir()
        except FileExistsError:
            continue
        (run_dir / CONFIG_RECORD).write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
        return run_dir
    raise ConfigError(f"cannot make a new run directory under {root}")


def _resume_dir(cfg: ExperimentConfig, resume: str | Path, say) -> Path:
    """The run directory to continue; refuses one that was started with another config."""
    run_dir = Path(resume)
    record = run_dir / CONFIG_RECORD
    if not record.exists():
        raise ConfigError(f"--resume {run_dir}: not a distill run directory (no {CONFIG_RECORD})")
    if json.loads(record.read_text()) != json.loads(json.dumps(dataclasses.asdict(cfg))):
        raise ConfigError(f"--resume {run_dir}: that run was started with another config; resume it with the same one")
    say(f"distill: resuming run {run_dir}")
    return run_dir.resolve()


def _point_latest(run_dir: Path) -> None:
    """Make <run_root>/latest a relative symlink to ``run_dir``, replaced atomically."""
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, link)

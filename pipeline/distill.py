"""Stage 2: train the students from the cached teacher outputs, plus their hard-label baselines.

A run is a sequence of passes, one per seed and kind (distilled, then baselines). In a
pass every student trains on the same streamed batches, so the cache is read once for
all of them; each student has its own optimizer and random state, so it trains exactly as
it would alone. A pass checkpoints as it goes; ``--resume`` continues an interrupted run
at the step it reached, and skips the passes it had finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification

from cache_store import CacheNotFoundError, Location, open_cache
from cache_store.shard import decode, encode

from .capture import ATTENTION, HIDDEN, CachePlan, plan_cache, tensor_specs, tokenizer_fingerprint
from .config import ConfigError, ExperimentConfig, StudentConfig
from .data import tokenize
from .losses import ATTENTION_TERMS, HIDDEN_TERMS
from .models import (
    count_parameters,
    cut_student,
    directory_bytes,
    encoder_layers,
    load_classifier,
    load_tokenizer,
    model_dir,
    save_model,
)
from .objective import BASELINE_LOSS, Objective, layer_pairs
from .report import ModelResult, write_report
from .runtime import ALONE, Ranks, barrier, process_group, resolve_device
from .streaming import CacheSource, Select, StudentStream, TokenSource
from .teacher import TEACHER_RECORD
from .training import (
    Checkpoint,
    Collator,
    EpochRecord,
    Learner,
    classification_metrics,
    evaluate,
    fit,
    predict_logits,
)

CONFIG_RECORD = "config.json"


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    models: list[ModelResult]


def run_distill(cfg: ExperimentConfig, *, cache_location: str | None = None, online: bool = False,
                resume: str | Path | None = None, select: Select | None = None) -> RunResult:  # fmt: skip
    """Distill every configured student (for each seed), evaluate all models, write the report.

    Args:
        cache_location: read this cache (a path or URL, e.g. a shared one) instead of the
            one the config's key names; it must hold the same data and tokenizer.
        online: run the teacher live on every batch instead of reading a cache (the
            batches are the same; for comparison, or when no cache can be made).
        resume: a run directory to continue (its config must be this one).
        select: sample selection over the cached teacher statistics (rows to stream).

    Raises:
        ConfigError: no cache for this config, a cache of other data or another tokenizer,
            a student that does not fit the cache, or a resumed run of another config.
    """
    ranks = Ranks.from_env()
    with process_group(ranks):
        return _distill(cfg, ranks, cache_location=cache_location, online=online, resume=resume, select=select)


def _distill(cfg: ExperimentConfig, ranks: Ranks, *, cache_location: str | None, online: bool,
             resume: str | Path | None, select: Select | None) -> RunResult:  # fmt: skip
    say = tqdm.write if ranks.is_main else lambda message: None
    plan = plan_cache(cfg)
    teacher_config = AutoConfig.from_pretrained(str(plan.teacher_path))
    if online:
        if select is not None:
            raise ConfigError("sample selection reads cached teacher statistics; it cannot run with --online")
        train = plan.splits["train"]
        source = TokenSource(plan.token_ids["train"], train.labels, train.example_id, shard_rows=cfg.capture.shard_rows)
        stored, stored_heads, cache_key = None, cfg.capture.attention_heads, None
        say("distill: the teacher runs live on every batch (--online)")
    else:
        cache = _open_checked(plan, cache_location, say)
        source, cache_key = CacheSource(cache, "train"), cache.key
        stored = {spec.name: spec.layers for spec in cache.manifest.tensors}
        heads = cache.manifest.metadata.get("capture", {}).get("attention_heads")
        stored_heads = tuple(heads) if heads is not None else None
    for spec in cfg.distill.students:
        check_student_fits(cfg, spec, teacher_config, stored, stored_heads, plan)
    run_dir = _run_dir(cfg, resume, ranks, say)
    tokenizer = load_tokenizer(plan.teacher_path)
    test_ids = tokenize(tokenizer, plan.splits["test"], max_length=cfg.data.max_length)
    test_labels = plan.splits["test"].labels
    device = resolve_device(cfg.device, ranks)
    epochs = {True: cfg.distill.epochs, False: baseline_epochs(cfg, source, tokenizer, select=select, ranks=ranks)}
    if cfg.distill.baselines:
        say(f"distill: students train {epochs[True]} epochs, baselines {epochs[False]} "
            "(at least as many optimizer steps as their students)")  # fmt: skip

    def evaluated(model, name, role, seed, directory, history, baseline=None) -> ModelResult:
        result = evaluate(model.to(device), test_ids, test_labels, collate=Collator.for_model(tokenizer, model.config))
        say(f"{name} ({role}, seed {seed}): test accuracy {result.accuracy:.4f}")
        best = max(history, key=lambda h: h.validation_accuracy) if history else None
        return ModelResult(name=name, role=role, seed=seed, accuracy=result.accuracy, macro_f1=result.macro_f1,
                           params=count_parameters(model), size_bytes=directory_bytes(directory),
                           examples_per_s=result.examples_per_s, path=str(directory),
                           steps=history[-1].steps if history else None, best_epoch=best.epoch if best else None,
                           baseline=baseline)  # fmt: skip

    teacher = load_classifier(plan.teacher_path)
    if ranks.is_main:
        results = [
            evaluated(teacher, "teacher", "teacher", cfg.seed, plan.teacher_path, teacher_history(plan.teacher_path))
        ]
    else:
        results = []
    live = LiveTeacher(teacher.to(device).eval(), cfg, tokenizer) if online else None
    if not online:
        del teacher
    for seed in cfg.distill.seeds:
        for kd in (True, False) if cfg.distill.baselines else (True,):
            name = f"seed{seed}-{'distilled' if kd else 'baselines'}"
            record = run_dir / "passes" / f"{name}.json"
            if record.exists():  # finished before the run was interrupted
                results += [ModelResult(**r) for r in json.loads(record.read_text())]
                continue
            trained = train_pass(cfg, plan, source, run_dir, name, seed=seed, kd=kd, epochs=epochs[kd],
                                 tokenizer=tokenizer, device=device, teacher_config=teacher_config,
                                 stored_heads=stored_heads, live=live, select=select, ranks=ranks)  # fmt: skip
            barrier(ranks)
            if not ranks.is_main:  # rank 0 saves, evaluates and reports
                continue
            done = []
            for spec, (student, history) in zip(cfg.distill.students, trained, strict=True):
                model_name = spec.name if kd else f"{spec.name}-no-kd"
                directory = run_dir / "models" / f"{model_name}-seed{seed}"
                save_model(student, tokenizer, directory)
                baseline = f"{spec.name}-no-kd" if kd and cfg.distill.baselines else None
                role = "student" if kd else "baseline"
                done.append(evaluated(student, model_name, role, seed, directory, history, baseline))
            record.parent.mkdir(exist_ok=True)
            record.write_text(json.dumps([dataclasses.asdict(r) for r in done], indent=1))
            for path in (run_dir / "checkpoints").glob(f"{name}*.pt"):
                path.unlink()
            results += done
    barrier(ranks)
    if ranks.is_main:
        write_report(run_dir, results, config=dataclasses.asdict(cfg), cache_key=cache_key)
    return RunResult(run_dir, results)


def teacher_history(teacher_path: Path) -> list[EpochRecord]:
    """The fine-tuned teacher's epochs (steps and validation), from its record; empty for a ready-made one."""
    record = teacher_path / TEACHER_RECORD
    if not record.exists():
        return []
    raw = json.loads(record.read_text())
    return [EpochRecord(**h) for h in raw.get("history", []) if "steps" in h]


def student_stream(cfg: ExperimentConfig, source, tokenizer, *, seed: int, kd: bool,
                   wanted: list[tuple[str, int]] = (), select: Select | None = None,
                   ranks: Ranks = ALONE) -> StudentStream:  # fmt: skip
    """The stream of one pass: every row for students (kd), labeled rows only for baselines.

    Its batches carry every input any model of the tokenizer takes; each model picks its own.
    """
    return StudentStream(source, collate=Collator.for_tokenizer(tokenizer), batch_size=cfg.distill.batch_size,
                         seed=seed, wanted=wanted, labeled_only=not kd, select=select,
                         block_rows=cfg.distill.block_rows, buffer_rows=cfg.distill.buffer_rows, rank=ranks.rank,
                         world=ranks.world)  # fmt: skip


def baseline_epochs(cfg: ExperimentConfig, source, tokenizer, *, select: Select | None = None,
                    ranks: Ranks = ALONE) -> int:  # fmt: skip
    """Epochs for the baselines: ``distill.baseline_epochs``, or by default the fewest that give a
    baseline at least as many optimizer steps as its student (it sees only the labeled rows, so
    each of its epochs is shorter). A baseline keeps its best validation epoch, as a student does.
    """
    if cfg.distill.baseline_epochs is not None:
        return cfg.distill.baseline_epochs
    student_steps = cfg.distill.epochs * len(student_stream(cfg, source, tokenizer, seed=0, kd=True, select=select,
                                                             ranks=ranks))  # fmt: skip
    per_epoch = len(student_stream(cfg, source, tokenizer, seed=0, kd=False, select=select, ranks=ranks))
    return max(cfg.distill.epochs, -(-student_steps // per_epoch)) if per_epoch else cfg.distill.epochs


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


def train_pass(cfg: ExperimentConfig, plan: CachePlan, source, run_dir: Path, name: str, *, seed: int, kd: bool,
               epochs: int, tokenizer, device: torch.device, teacher_config,
               stored_heads: tuple[int, ...] | None = None, live: LiveTeacher | None = None,
               select: Select | None = None, ranks: Ranks = ALONE) -> list[tuple[nn.Module, list[EpochRecord]]]:  # fmt: skip
    """Train every student (kd) or every baseline (not kd) of one seed on one stream of batches.

    Under torchrun each rank streams its own part and DDP averages the gradients. Each
    model takes the inputs its own kind takes (segment ids or not), in training,
    validation and test alike.

    Args:
        stored_heads: the teacher's attention heads the cache holds (None: all); students
            compare the same heads of their own maps.

    Returns:
        Per student: the model holding its best validation epoch's weights, and its epochs.

    Raises:
        ConfigError: some rank would get no batch.
    """
    students, objectives, collators = [], [], []
    for spec in cfg.distill.students:
        torch.manual_seed(seed)
        terms = (spec.loss or cfg.distill.loss) if kd else BASELINE_LOSS
        wants_attention = any(t.kind in ATTENTION_TERMS for t in terms)
        student = build_student(spec, plan, attention_maps=wants_attention).to(device)
        pairs = layer_pairs(spec, student.config.num_hidden_layers, teacher_config.num_hidden_layers)
        collate = Collator.for_model(tokenizer, student.config)
        objective = Objective(student, terms, pairs, teacher_width=teacher_config.hidden_size, inputs=collate.inputs,
                              attention_heads=stored_heads)  # fmt: skip
        students.append(student)
        objectives.append(objective.to(device))
        collators.append(collate)
    wanted = sorted({w for objective in objectives for w in objective.wanted})
    stream = student_stream(
        cfg, source, tokenizer, seed=seed, kd=kd, select=select, ranks=ranks, wanted=wanted if live is None else []
    )  # the live teacher adds them to each batch
    require_batches(stream, name)
    total = epochs * len(stream)
    val_ids, val_labels = plan.token_ids["validation"], plan.splits["validation"].labels

    def learner(spec: StudentConfig, student: nn.Module, objective: Objective, collate: Collator) -> Learner:
        step_loss = objective if ranks.world == 1 else DistributedDataParallel(objective)  # gradients averaged
        return Learner(
            name=spec.name if kd else f"{spec.name}-no-kd",
            model=student,
            trainable=[objective],
            step_loss=lambda batch, step: step_loss(batch, progress=step / max(total - 1, 1)),
            validate=lambda: classification_metrics(predict_logits(student, val_ids, collate=collate), val_labels),
            lr=cfg.distill.learning_rate,
            weight_decay=cfg.distill.weight_decay,
            warmup_ratio=cfg.distill.warmup_ratio,
            seed=seed,
        )

    def epoch_batches(epoch: int, start: int):
        loader = stream.loader(epoch, start, workers=cfg.distill.loader_workers, pin_memory=device.type == "cuda")
        return loader if live is None else (live.annotate(batch, wanted) for batch in loader)

    learners = [learner(*args) for args in zip(cfg.distill.students, students, objectives, collators, strict=True)]
    fit(
        learners,
        epochs=epochs,
        steps_per_epoch=len(stream),
        epoch_batches=epoch_batches,
        desc=f"{name} ({len(students)} student{'s' if len(students) > 1 else ''})",
        device=device,
        checkpoint=Checkpoint(run_dir / "checkpoints" / f"{name}{f'.rank{ranks.rank}' if ranks.world > 1 else ''}.pt"),
        checkpoint_steps=cfg.distill.checkpoint_steps,
        log_dir=run_dir / "tensorboard" / name if ranks.is_main else None,
        quiet=not ranks.is_main,
    )
    return [(_merged(student), learner.history) for student, learner in zip(students, learners, strict=True)]


class LiveTeacher:
    """The teacher in eval mode, adding to each batch exactly what its cache would hold: the
    configured attention heads, values rounded to their storage dtype (or quantization), padding zeroed."""

    def __init__(self, model: nn.Module, cfg: ExperimentConfig, tokenizer):
        self.model, self.device = model, next(model.parameters()).device
        self.inputs = Collator.for_model(tokenizer, model.config).inputs
        self.specs = {spec.name: spec for spec in tensor_specs(cfg, model.config)}
        heads = cfg.capture.attention_heads
        self.heads = list(heads) if heads is not None else None

    @torch.no_grad()
    def annotate(self, batch: dict[str, torch.Tensor], wanted: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        needs_attention = any(name == ATTENTION for name, _ in wanted)
        if needs_attention and self.model.config._attn_implementation != "eager":
            self.model.set_attn_implementation("eager")
        out = self.model(**{k: batch[k] for k in self.inputs}, output_hidden_states=True,
                         output_attentions=needs_attention)  # fmt: skip
        batch["teacher_logits"] = out.logits.float()
        for name, layer in wanted:
            if name == HIDDEN:
                value = out.hidden_states[layer]  # (B, T, H)
            else:
                value = out.attentions[layer - 1] if self.heads is None else out.attentions[layer - 1][:, self.heads]
            value = value.float() * _padding_zeroed(batch["attention_mask"], name)
            batch[f"{name}/{layer}"] = self._as_stored(value, self.specs[name])
        return batch

    def _as_stored(self, value: torch.Tensor, spec) -> torch.Tensor:
        """``value`` as the cache returns it: encoded to the stored dtype and decoded again."""
        if spec.dtype == "float32" and spec.quantization is None:
            return value
        stored = decode(encode(value.cpu().numpy(), spec), spec)
        return torch.from_numpy(np.asarray(stored, dtype=np.float32)).to(self.device)


def _padding_zeroed(mask: torch.Tensor, name: str) -> torch.Tensor:
    """A multiplier that zeroes padded positions, as the cache's zero padding does: (B, T, 1) or (B, 1, T, T)."""
    mask = mask.float()
    return mask[:, :, None] if name == HIDDEN else (mask[:, :, None] * mask[:, None, :])[:, None]


def build_student(spec: StudentConfig, plan: CachePlan, *, attention_maps: bool) -> nn.Module:
    """The student's initial model: cut from teacher layers, a pretrained checkpoint, or a new
    model of the teacher's type at the configured size; then frozen parts and LoRA applied."""
    num_labels = len(plan.splits["train"].label_names)
    if spec.teacher_layers is not None:
        student = cut_student(load_classifier(plan.teacher_path), spec.teacher_layers)
    elif spec.pretrained is not None:
        student = load_classifier(model_dir(spec.pretrained), num_labels=num_labels)
    else:
        arch = spec.architecture
        config = AutoConfig.from_pretrained(
            str(plan.teacher_path), num_hidden_layers=arch.layers, hidden_size=arch.hidden_size,
            num_attention_heads=arch.heads, intermediate_size=arch.intermediate_size or 4 * arch.hidden_size,
            num_labels=num_labels,
        )  # fmt: skip
        student = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
    student.set_attn_implementation("eager" if attention_maps else "sdpa")  # sdpa returns no attention maps
    if spec.freeze_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
    for layer in encoder_layers(student)[: spec.freeze_layers]:
        layer.requires_grad_(False)
    if spec.lora is not None:
        student = _with_lora(student, spec)
    return student


def _with_lora(student: nn.Module, spec: StudentConfig) -> nn.Module:
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError:
        raise ConfigError(f"student {spec.name!r} asks for LoRA: install peft (pip install 'kdcache[lora]')") from None
    lora = spec.lora
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules))  # fmt: skip
    return get_peft_model(student, config)


def _merged(student: nn.Module) -> nn.Module:
    """A LoRA student with its adapters merged into the weights (a plain model); others as they are."""
    return student.merge_and_unload() if hasattr(student, "merge_and_unload") else student


def _open_checked(plan: CachePlan, cache_location: str | None, say=tqdm.write):
    location = Location(cache_location) if cache_location else plan.location
    try:
        cache = open_cache(location)
    except CacheNotFoundError:
        raise ConfigError(
            f"no teacher cache {plan.key} for this config at {location}; run `kdcache teacher-cache --config ...` first"
        ) from None
    say(f"distill: reading cache {cache.key} ({cache.manifest.rows} rows, {cache.manifest.bytes / 1e6:.1f} MB)")
    check_cache_matches(plan, cache)
    return cache


def check_cache_matches(plan: CachePlan, cache) -> None:
    """Refuse a cache written by another teacher, made from other data, or whose token ids come from another tokenizer."""
    recorded = cache.manifest.metadata
    if recorded.get("teacher_fingerprint") != plan.teacher_fingerprint:
        raise ConfigError(
            f"cache {cache.key} was written by teacher {recorded.get('teacher', '?')} (fingerprint "
            f"{recorded.get('teacher_fingerprint')}), not by this config's teacher {plan.teacher_path} (fingerprint "
            f"{plan.teacher_fingerprint}); distill with that teacher's config, or capture a cache of this one"
        )
    if recorded.get("data_fingerprint") != plan.data_fingerprint:
        raise ConfigError(
            f"cache {cache.key} holds other data than this config's train and validation splits "
            f"(data fingerprint {recorded.get('data_fingerprint')} vs {plan.data_fingerprint})"
        )
    if recorded.get("tokenizer_fingerprint") != plan.tokenizer_fingerprint:
        raise ConfigError(
            f"cache {cache.key} was tokenized with another tokenizer than the teacher {plan.teacher_path} "
            f"(vocabulary fingerprint {recorded.get('tokenizer_fingerprint')} vs {plan.tokenizer_fingerprint})"
        )


def check_student_fits(cfg: ExperimentConfig, spec: StudentConfig, teacher_config,
                       stored: dict[str, tuple[int, ...]] | None, stored_heads: tuple[int, ...] | None,
                       plan: CachePlan) -> None:  # fmt: skip
    """Refuse a student whose tokenizer differs from the teacher's, whose layer mapping needs
    layers outside the student or teacher tensors the cache does not hold (``stored``: tensor
    name -> layers; None when the teacher runs live), or whose attention maps cannot be
    compared head for head with the stored subset of the teacher's heads (``stored_heads``)."""
    if spec.pretrained is not None:
        theirs = tokenizer_fingerprint(load_tokenizer(model_dir(spec.pretrained)))
        if theirs != plan.tokenizer_fingerprint:
            raise ConfigError(
                f"student {spec.name!r}: the tokenizer of {spec.pretrained} differs from the one the teacher's "
                f"token ids come from (vocabulary fingerprint {theirs} vs {plan.tokenizer_fingerprint}); "
                "the cached token ids would mean other tokens to it"
            )
    depth, heads = _student_shape(spec, teacher_config)
    kinds = {t.kind for t in spec.loss or cfg.distill.loss}
    pairs = layer_pairs(spec, depth, teacher_config.num_hidden_layers)
    for name, family, low in ((HIDDEN, HIDDEN_TERMS, 0), (ATTENTION, ATTENTION_TERMS, 1)):
        if not kinds & set(family):
            continue
        if not pairs:
            raise ConfigError(f"student {spec.name!r}: {name} loss needs a layer_map (student layer, teacher layer)")
        bad = sorted({s for s, _ in pairs if not low <= s <= depth})
        if bad:
            raise ConfigError(
                f"student {spec.name!r}: layer_map student layers {bad} outside {low}..{depth} for {name}"
            )
        if name == ATTENTION and stored_heads is not None and heads != teacher_config.num_attention_heads:
            raise ConfigError(
                f"student {spec.name!r} has {heads} attention heads; the cache holds heads {list(stored_heads)} of the "
                f"teacher's {teacher_config.num_attention_heads}, which only a student with "
                f"{teacher_config.num_attention_heads} heads can match head for head (capture all heads to compare "
                "head-averaged maps)"
            )
        if stored is None:
            continue
        missing = sorted({t for _, t in pairs} - set(stored.get(name, ())))
        if missing:
            what = "hidden_layers" if name == HIDDEN else "attention_layers"
            raise ConfigError(
                f"student {spec.name!r} maps to teacher layers {missing}, but the cache stores {name} "
                f"for {list(stored.get(name, ()))}; add them to capture.{what}"
            )


def _student_shape(spec: StudentConfig, teacher_config) -> tuple[int, int]:
    """(layers, attention heads) of the student ``spec`` describes."""
    if spec.teacher_layers is not None:
        return len(spec.teacher_layers), teacher_config.num_attention_heads
    if spec.architecture is not None:
        return spec.architecture.layers, spec.architecture.heads
    config = AutoConfig.from_pretrained(str(model_dir(spec.pretrained)))
    return config.num_hidden_layers, config.num_attention_heads


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

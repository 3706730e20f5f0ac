"""Stage 2: train each student from the cached teacher outputs, plus a hard-label baseline."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig

from cache_store import Cache, CacheNotFoundError, Location, open_cache

from .capture import ATTENTION, HIDDEN, CachePlan, plan_cache, tokenizer_fingerprint
from .config import ConfigError, ExperimentConfig, StudentConfig
from .data import tokenize
from .losses import ATTENTION_LOSSES, hard_label_ce, hidden_mse, logit_kl
from .models import (
    count_parameters,
    cut_student,
    directory_bytes,
    load_classifier,
    load_tokenizer,
    model_dir,
    save_model,
)
from .report import ModelResult, write_report
from .runtime import CPU, resolve_device
from .streaming import CacheBatches
from .training import Collator, classification_metrics, evaluate, fit, predict_logits


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    models: list[ModelResult]


class Objective(nn.Module):
    """The distillation loss of one student; owns the learned projections of hidden states.

    alpha * KL(teacher/T || student/T) * T^2 + (1 - alpha) * CE(labels)
      + hidden_weight * mean over mapped layers of MSE(proj(student_h), teacher_h)
      + attention_weight * mean over mapped layers of KL or MSE of attention maps.
    With ``kd=False`` it is the hard-label CE alone (the baseline).
    """

    def __init__(self, student: nn.Module, cfg: ExperimentConfig, spec: StudentConfig, *, teacher_width: int, kd: bool):
        super().__init__()
        self.student, self.loss, self.kd = student, cfg.distill.loss, kd
        self.hidden_map = spec.mapping if kd and self.loss.hidden_weight > 0 else ()
        self.attention_map = spec.mapping if kd and self.loss.attention_weight > 0 else ()
        width = student.config.hidden_size
        self.projections = nn.ModuleDict(
            {
                str(s): nn.Linear(width, teacher_width) if width != teacher_width else nn.Identity()
                for s, _ in self.hidden_map
            }
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"]  # (B, T)
        out = self.student(
            input_ids=batch["input_ids"],
            attention_mask=mask,
            output_hidden_states=bool(self.hidden_map),
            output_attentions=bool(self.attention_map),
        )
        ce = hard_label_ce(out.logits, batch["labels"])  # logits (B, C)
        if not self.kd:
            return ce
        kl = logit_kl(out.logits, batch["teacher_logits"], temperature=self.loss.temperature)
        total = self.loss.alpha * kl + (1 - self.loss.alpha) * ce
        for s, t in self.hidden_map:
            projected = self.projections[str(s)](out.hidden_states[s])  # (B, T, H_teacher)
            term = hidden_mse(projected, batch[f"{HIDDEN}/{t}"], mask)
            total = total + self.loss.hidden_weight * term / len(self.hidden_map)
        attention_loss = ATTENTION_LOSSES[self.loss.attention_loss]
        for s, t in self.attention_map:
            term = attention_loss(out.attentions[s - 1], batch[f"{ATTENTION}/{t}"], mask)  # (B, h, T, T)
            total = total + self.loss.attention_weight * term / len(self.attention_map)
        return total


def run_distill(cfg: ExperimentConfig, *, cache_location: str | None = None) -> RunResult:
    """Distill every configured student (for each seed) from the cache, evaluate all models, write the report.

    Args:
        cache_location: read this cache (a path or URL, e.g. a shared one) instead of the
            one the config's key names; it must hold the same data and tokenizer.

    Raises:
        ConfigError: no cache for this config, a cache of other data or another tokenizer,
            or a student that does not fit the cache.
    """
    plan = plan_cache(cfg)
    location = Location(cache_location) if cache_location else plan.location
    try:
        cache = open_cache(location)
    except CacheNotFoundError:
        raise ConfigError(
            f"no teacher cache {plan.key} for this config at {location}; run `kdcache teacher-cache --config ...` first"
        ) from None
    tqdm.write(f"distill: reading cache {cache.key} ({cache.manifest.rows} rows, {cache.manifest.bytes / 1e6:.1f} MB)")
    check_cache_matches(plan, cache)
    for spec in cfg.distill.students:
        check_student_fits(cfg, spec, cache)
    run_dir = _new_run_dir(cfg)
    tokenizer = load_tokenizer(plan.teacher_path)
    test_ids = tokenize(tokenizer, plan.splits["test"], max_length=cfg.data.max_length)
    test_labels = plan.splits["test"].labels
    device = resolve_device(cfg.device)

    def evaluated(model, name, role, seed, directory, baseline=None) -> ModelResult:
        collate = Collator.for_model(tokenizer, model.config)
        result = evaluate(model.to(device), test_ids, test_labels, collate=collate)
        tqdm.write(f"{name} ({role}, seed {seed}): test accuracy {result.accuracy:.4f}")
        return ModelResult(name=name, role=role, seed=seed, accuracy=result.accuracy, macro_f1=result.macro_f1,
                           params=count_parameters(model), size_bytes=directory_bytes(directory),
                           examples_per_s=result.examples_per_s, path=str(directory), baseline=baseline)  # fmt: skip

    teacher = load_classifier(plan.teacher_path)
    results = [evaluated(teacher, "teacher", "teacher", cfg.seed, plan.teacher_path)]
    del teacher
    for spec in cfg.distill.students:
        for seed in cfg.distill.seeds:
            baseline_name = f"{spec.name}-no-kd"
            for kd in (True, False) if cfg.distill.baselines else (True,):
                name = spec.name if kd else baseline_name
                directory = run_dir / "models" / f"{name}-seed{seed}"
                student = train_student(cfg, spec, cache, plan, seed=seed, kd=kd, tokenizer=tokenizer, device=device)
                save_model(student, tokenizer, directory)
                if kd:
                    results.append(evaluated(student, name, "student", seed, directory,
                                             baseline_name if cfg.distill.baselines else None))  # fmt: skip
                else:
                    results.append(evaluated(student, name, "baseline", seed, directory))
    write_report(run_dir, results, config=dataclasses.asdict(cfg), cache_key=cache.key)
    _point_latest(run_dir)
    return RunResult(run_dir, results)


def build_student(cfg: ExperimentConfig, spec: StudentConfig, plan: CachePlan, *, kd: bool) -> nn.Module:
    """The student's initial model: teacher layers cut out, or a pretrained checkpoint."""
    num_labels = len(plan.splits["train"].label_names)
    if spec.teacher_layers is not None:
        student = cut_student(load_classifier(plan.teacher_path), spec.teacher_layers)
    else:
        student = load_classifier(model_dir(spec.pretrained), num_labels=num_labels)
    wants_attention = kd and cfg.distill.loss.attention_weight > 0
    student.set_attn_implementation("eager" if wants_attention else "sdpa")  # sdpa returns no attention maps
    if spec.freeze_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
    return student


def train_student(
    cfg: ExperimentConfig,
    spec: StudentConfig,
    cache: Cache,
    plan: CachePlan,
    *,
    seed: int,
    kd: bool,
    tokenizer,
    device: torch.device = CPU,
) -> nn.Module:
    """Train one student (kd) or its hard-label baseline (not kd); returns the best-validation model."""
    torch.manual_seed(seed)
    student = build_student(cfg, spec, plan, kd=kd)
    collate = Collator.for_model(tokenizer, student.config)
    teacher_width = (
        cache.manifest.tensor(HIDDEN).example_shape[-1] if _has(cache, HIDDEN) else student.config.hidden_size
    )
    objective = Objective(student, cfg, spec, teacher_width=teacher_width, kd=kd).to(device)
    batches = CacheBatches(
        cache,
        "train",
        batch_size=cfg.distill.batch_size,
        seed=seed,
        collate=collate,
        hidden_layers=sorted({t for _, t in objective.hidden_map}),
        attention_layers=sorted({t for _, t in objective.attention_map}),
        labeled_only=not kd,
    )
    val_ids, val_labels = plan.token_ids["validation"], plan.splits["validation"].labels
    fit(
        student,
        trainable=[objective],
        epochs=cfg.distill.epochs,
        steps_per_epoch=len(batches),
        epoch_batches=batches.epoch,
        step_loss=objective,
        validate=lambda: classification_metrics(predict_logits(student, val_ids, collate=collate), val_labels),
        lr=cfg.distill.learning_rate,
        weight_decay=cfg.distill.weight_decay,
        warmup_ratio=cfg.distill.warmup_ratio,
        desc=f"{spec.name}{'' if kd else '-no-kd'} seed {seed}",
        device=device,
    )
    return student


def check_cache_matches(plan: CachePlan, cache: Cache) -> None:
    """Refuse a cache made from other data, or whose token ids come from another tokenizer."""
    recorded = cache.manifest.metadata
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


def check_student_fits(cfg: ExperimentConfig, spec: StudentConfig, cache: Cache) -> None:
    """Refuse a student whose tokenizer differs from the cache's, or whose layer mapping needs
    teacher layers the cache does not hold."""
    if spec.pretrained is not None:
        theirs = tokenizer_fingerprint(load_tokenizer(model_dir(spec.pretrained)))
        ours = cache.manifest.metadata.get("tokenizer_fingerprint")
        if theirs != ours:
            raise ConfigError(
                f"student {spec.name!r}: the tokenizer of {spec.pretrained} differs from the one cache "
                f"{cache.key} was made with (vocabulary fingerprint {theirs} vs {ours}); "
                "the cached token ids would mean other tokens to it"
            )
    loss = cfg.distill.loss
    if spec.teacher_layers is not None:
        depth = len(spec.teacher_layers)
    else:
        depth = AutoConfig.from_pretrained(str(model_dir(spec.pretrained))).num_hidden_layers
    for name, weight, low in ((HIDDEN, loss.hidden_weight, 0), (ATTENTION, loss.attention_weight, 1)):
        if weight <= 0:
            continue
        if not spec.mapping:
            raise ConfigError(f"student {spec.name!r}: {name} loss needs a layer_map (student layer, teacher layer)")
        bad = sorted({s for s, _ in spec.mapping if not low <= s <= depth})
        if bad:
            raise ConfigError(
                f"student {spec.name!r}: layer_map student layers {bad} outside {low}..{depth} for {name}"
            )
        stored = cache.manifest.tensor(name).layers if _has(cache, name) else ()
        missing = sorted({t for _, t in spec.mapping} - set(stored))
        if missing:
            what = "hidden_layers" if name == HIDDEN else "attention_layers"
            raise ConfigError(
                f"student {spec.name!r} maps to teacher layers {missing}, but the cache stores {name} "
                f"for {list(stored)}; add them to capture.{what}"
            )


def _has(cache: Cache, name: str) -> bool:
    return any(spec.name == name for spec in cache.manifest.tensors)


def _new_run_dir(cfg: ExperimentConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(cfg.distill.run_root)
    root.mkdir(parents=True, exist_ok=True)
    for attempt in range(100):
        run_dir = root / f"{stamp}-{cfg.name}{f'-{attempt}' if attempt else ''}"
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise ConfigError(f"cannot make a new run directory under {root}")


def _point_latest(run_dir: Path) -> None:
    """Make <run_root>/latest a relative symlink to ``run_dir``, replaced atomically."""
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, link)

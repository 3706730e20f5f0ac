"""Students: built from a config (cut, pretrained or new), checked against the cache first."""

from __future__ import annotations

from torch import nn
from transformers import AutoConfig

from ..config import FEATURE_KINDS, LossTerm, StudentConfig
from ..contract import ATTENTION, HIDDEN, tokenizer_fingerprint
from ..errors import ConfigError
from ..models import cut_student, encoder_layers, load_tokenizer, model_dir
from .inputs import TeacherCache
from .losses import ATTENTION_TERMS, DIVERGENCES, HIDDEN_TERMS
from .objective import layer_pairs


def build_student(spec: StudentConfig, teacher: TeacherCache, teacher_model: nn.Module | None, *,
                  attention_maps: bool) -> nn.Module:  # fmt: skip
    """The student's initial model: cut from the teacher's layers (``teacher_model``), a pretrained
    checkpoint, or a new model of the teacher's type at the configured size; then frozen parts and
    LoRA applied. Its classes are the cache's label names."""
    names = teacher.label_names
    if spec.teacher_layers is not None:
        student = cut_student(teacher_model, spec.teacher_layers)
    elif spec.pretrained is not None:
        student = teacher.task.load_model(model_dir(spec.pretrained), num_labels=len(names))
    else:
        arch = spec.architecture
        config = teacher.teacher_config.to_dict() | {
            "num_hidden_layers": arch.layers, "hidden_size": arch.hidden_size, "num_attention_heads": arch.heads,
            "intermediate_size": arch.intermediate_size or 4 * arch.hidden_size, "num_labels": len(names),
        }  # fmt: skip
        if "num_key_value_heads" in config:  # grouped-query attention (Llama): plain multi-head at the new width
            config |= {"num_key_value_heads": arch.heads, "head_dim": arch.hidden_size // arch.heads}
        model_type = config.pop("model_type")
        student = teacher.task.model_from_config(AutoConfig.for_model(model_type, **config))
    student.config.id2label = dict(enumerate(names))
    student.config.label2id = {name: i for i, name in enumerate(names)}
    student.set_attn_implementation("eager" if attention_maps else "sdpa")  # sdpa returns no attention maps
    if spec.freeze_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
    for layer in encoder_layers(student)[: spec.freeze_layers]:
        layer.requires_grad_(False)
    if spec.lora is not None:
        student = _with_lora(student, spec, teacher.task.peft_task)
    return student


def _with_lora(student: nn.Module, spec: StudentConfig, task_type: str) -> nn.Module:
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError:
        raise ConfigError(f"student {spec.name!r} asks for LoRA: install peft (pip install 'kdcache[lora]')") from None
    lora = spec.lora
    config = LoraConfig(task_type=TaskType[task_type], r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules))  # fmt: skip
    return get_peft_model(student, config)


def merged(student: nn.Module) -> nn.Module:
    """A LoRA student with its adapters merged into the weights (a plain model); others as they are."""
    return student.merge_and_unload() if hasattr(student, "merge_and_unload") else student


def feature_teacher(spec: StudentConfig, losses: tuple[LossTerm, ...]) -> int:
    """The position of the teacher whose hidden states and attention maps ``spec``'s feature terms compare:
    the one they name, or the student's first teacher.

    Raises:
        ConfigError: its feature terms name different teachers.
    """
    named = sorted({t.teacher for t in spec.loss or losses if t.kind in FEATURE_KINDS and t.teacher is not None})
    if len(named) > 1:
        raise ConfigError(f"student {spec.name!r}: its hidden and attention terms name teachers {named}; a student "
                          "compares its layers with one teacher's")  # fmt: skip
    return named[0] if named else (spec.teachers or (0,))[0]


def check_student_fits(spec: StudentConfig, losses: tuple[LossTerm, ...], teacher: TeacherCache,
                       stored: dict[str, tuple[int, ...]] | None, *, teachers: int = 1) -> None:  # fmt: skip
    """Refuse a student whose tokenizer differs from the cache's, whose layer mapping needs
    layers outside the student or teacher tensors the cache does not hold (``stored``: tensor
    name -> layers; None when the teacher runs live), whose attention maps cannot be
    compared head for head with the stored subset of the teacher's heads, or that fuses
    ``teachers`` (several) by raw-logit MSE. ``teacher`` is the one its feature terms compare with."""
    if teachers > 1 and any(t.kind == "logit_mse" for t in spec.loss or losses):
        raise ConfigError(f"student {spec.name!r}: logit_mse compares raw logits, which {teachers} teachers do not fuse "
                          "into; use kl, reverse_kl or jsd")  # fmt: skip
    teacher_config, stored_heads = teacher.teacher_config, teacher.meta.stored_heads
    if spec.pretrained is not None:
        theirs = tokenizer_fingerprint(load_tokenizer(model_dir(spec.pretrained)))
        if theirs != teacher.meta.tokenizer_fingerprint:
            raise ConfigError(
                f"student {spec.name!r}: the tokenizer of {spec.pretrained} differs from the one cache {teacher.key}'s "
                f"token ids come from (vocabulary fingerprint {theirs} vs {teacher.meta.tokenizer_fingerprint}); "
                "the cached token ids would mean other tokens to it"
            )
    _check_distribution_terms(spec, spec.loss or losses, teacher)
    depth, heads = _student_shape(spec, teacher_config)
    kinds = {t.kind for t in spec.loss or losses}
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


def _check_distribution_terms(spec: StudentConfig, terms: tuple[LossTerm, ...], teacher: TeacherCache) -> None:
    """Refuse logit terms a causal LM cache's distributions cannot serve: raw-logit MSE, a temperature
    other than the one the distributions were taken at, and reverse KL or JSD against draws."""
    sparse = teacher.distribution
    if sparse is None:
        return
    for term in terms:
        if term.kind == "logit_mse":
            raise ConfigError(f"student {spec.name!r}: cache {teacher.key} holds {sparse.scheme} distributions, not "
                              "logits; use kl, reverse_kl or jsd")  # fmt: skip
        if term.kind not in DIVERGENCES:
            continue
        if term.temperature not in (None, sparse.temperature) or term.temperature_end is not None:
            raise ConfigError(
                f"student {spec.name!r}: cache {teacher.key}'s distributions were taken at temperature "
                f"{sparse.temperature}; a {term.kind} term cannot use another (drop temperature and temperature_end, "
                "or capture again with capture.logits.temperature)"
            )
        if sparse.scheme == "sampled" and term.kind != "kl":
            raise ConfigError(
                f"student {spec.name!r}: {term.kind} needs the teacher's probabilities where the student puts mass; "
                f"cache {teacher.key} holds draws (sampled), which estimate only forward KL: use kind kl"
            )


def _student_shape(spec: StudentConfig, teacher_config) -> tuple[int, int]:
    """(layers, attention heads) of the student ``spec`` describes."""
    if spec.teacher_layers is not None:
        return len(spec.teacher_layers), teacher_config.num_attention_heads
    if spec.architecture is not None:
        return spec.architecture.layers, spec.architecture.heads
    config = AutoConfig.from_pretrained(str(model_dir(spec.pretrained)))
    return config.num_hidden_layers, config.num_attention_heads

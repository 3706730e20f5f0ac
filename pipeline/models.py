"""Loading teachers and building students: any Hugging Face encoder, local or by id."""

from __future__ import annotations

import copy
import os
from pathlib import Path

from torch import nn
from transformers import AutoTokenizer

from .config import resolve_location
from .errors import ConfigError

_MODEL_FILES = ("*.json", "*.txt", "*.model", "*.safetensors", "*.bin")


def model_dir(location: str) -> Path:
    """A local directory holding the model: a path, pkg://..., or a Hub id fetched into the HF cache.

    Raises:
        ConfigError: the location is neither a directory nor a reachable Hub model.
    """
    resolved = resolve_location(location)
    if Path(resolved).is_dir():
        return Path(resolved)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(resolved, allow_patterns=list(_MODEL_FILES)))
    except (HfHubHTTPError, LocalEntryNotFoundError, ValueError, OSError) as e:
        raise ConfigError(f"model {location!r} is neither a local directory nor a reachable Hub model ({e})") from None


def model_files(directory: Path) -> list[str]:
    """The files that define a model and its tokenizer (for fingerprints), relative to ``directory``."""
    names = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and name.lower() != "readme.md":
                names.append(str((Path(root) / name).relative_to(directory)))
    return sorted(names)


def load_tokenizer(directory: Path):
    return AutoTokenizer.from_pretrained(str(directory))


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks (the ModuleList as long as num_hidden_layers)."""
    depth = model.config.num_hidden_layers
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == depth]
    if len(stacks) != 1:
        raise ConfigError(f"cannot find the layer stack of {type(model).__name__} to cut a student from")
    return stacks[0]


def cut_student(teacher: nn.Module, layers: tuple[int, ...]) -> nn.Module:
    """A student made of the teacher's embeddings, the chosen layers (1..N) and its task head.

    Raises:
        ConfigError: a layer number outside 1..N.
    """
    depth = teacher.config.num_hidden_layers
    bad = [layer for layer in layers if not 1 <= layer <= depth]
    if bad:
        raise ConfigError(f"student teacher_layers {list(layers)}: {bad} outside 1..{depth}")
    student = copy.deepcopy(teacher)
    stack = encoder_layers(student)
    kept = nn.ModuleList([stack[layer - 1] for layer in layers])
    parent = next(m for m in student.modules() if any(child is stack for child in m.children()))
    name = next(n for n, child in parent.named_children() if child is stack)
    setattr(parent, name, kept)
    for i, block in enumerate(kept):  # keep per-layer indices consistent with the new depth
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = i
    student.config.num_hidden_layers = len(layers)
    return student


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def save_model(model: nn.Module, tokenizer, directory: Path) -> None:
    """save_pretrained model and tokenizer, so its task's auto class loads it with from_pretrained."""
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))

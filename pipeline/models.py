"""Loading teachers and building students: any Hugging Face encoder, local or by id."""

from __future__ import annotations

import copy
import os
import shutil
import uuid
from pathlib import Path

from torch import nn
from transformers import AutoTokenizer

from .config import resolve_location
from .errors import ConfigError

_MODEL_FILES = ("*.json", "*.txt", "*.model", "*.safetensors", "*.bin")


def model_dir(location: str) -> Path:
    """A local directory holding the model: a path, pkg://..., a Hub id fetched into the HF cache,
    or a GGUF file (converted once, see ``converted_gguf``).

    Raises:
        ConfigError: the location is neither a directory, a GGUF file nor a reachable Hub model.
    """
    resolved = resolve_location(location)
    if Path(resolved).is_dir():
        return Path(resolved)
    if resolved.endswith(".gguf") and Path(resolved).is_file():
        return converted_gguf(Path(resolved))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(resolved, allow_patterns=list(_MODEL_FILES)))
    except (HfHubHTTPError, LocalEntryNotFoundError, ValueError, OSError) as e:
        raise ConfigError(f"model {location!r} is neither a local directory nor a reachable Hub model ({e})") from None


def converted_gguf(path: Path) -> Path:
    """A GGUF causal LM as a safetensors checkpoint (weights dequantized to float32), converted once
    into ``$KDCACHE_HOME/models/<sha256 prefix>-<name>/`` and reused: loading GGUF takes about 25 s
    for a 135M model, the converted checkpoint under 2 s, with the same logits."""
    from cache_store import file_digest

    home = Path(os.environ.get("KDCACHE_HOME", "~/.cache/kdcache")).expanduser()
    target = home / "models" / f"{file_digest(path)[:16]}-{path.stem}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM

    print(f"converting {path.name} to safetensors once, into {target}")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    model.hf_quantizer = None  # the weights are dequantized: save them as a plain checkpoint, without
    del model.config.quantization_config  # the GGUF loading settings (a reload would read the GGUF file again)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        save_model(model, tokenizer, tmp)
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").exists():  # else converted meanwhile by another process
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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

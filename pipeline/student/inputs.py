"""What the student stage takes from a teacher cache, and nothing else: rows, tokenizer, teacher card.

A colleague with only a cache's path or URL distills from it: the cache carries every
split's rows, the tokenizer, the label names, the teacher's config and metrics, and
(when bundled) the teacher's checkpoint, which only students cut from the teacher's
layers and ``--online`` need.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig

from cache_store import Cache, CacheFormatError, CacheNotFoundError, Location, ShardRows, named_cache, open_cache
from cache_store.distribution import SparseSpec

from ..config import ExperimentConfig, is_config_file, load_config
from ..contract import TEACHER, TEACHER_RECORD, TOKENIZER, CacheMetadata, experiment_identity, teacher_fingerprint
from ..errors import ConfigError
from ..models import load_tokenizer, model_dir
from ..runtime import PRECISIONS
from ..tasks import TASKS, Task

TEACHER_ROOT = Path("models/teachers")  # where fine-tuned teachers live by default: searched for a cache's teacher


def teacher_roots(cfg: ExperimentConfig) -> tuple[Path, ...]:
    """Where to look for a local copy of a cache's teacher: the config's teacher.output_root, or the default."""
    return (Path(cfg.teacher.output_root),) if cfg.teacher is not None else (TEACHER_ROOT,)


class TeacherCache:
    """A teacher cache as the student stage reads it.

    Raises:
        CacheNotFoundError, CacheFormatError: no cache there, or not a teacher cache of this version.
    """

    def __init__(self, location):
        self.cache: Cache = open_cache(location)
        self.meta = CacheMetadata.from_manifest(self.cache.manifest)
        if self.meta.task not in TASKS:
            raise CacheFormatError(
                f"cache {self.cache.key} was captured for task {self.meta.task!r}; this kdcache knows {sorted(TASKS)}"
            )
        self.task: Task = TASKS[self.meta.task]
        self.tokenizer = load_tokenizer(self.cache.attachment(TOKENIZER))
        raw = dict(self.meta.teacher.config)
        self.teacher_config = AutoConfig.for_model(raw.pop("model_type"), **raw)

    @property
    def key(self) -> str:
        return self.cache.key

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.meta.label_names

    @property
    def distribution(self) -> SparseSpec | None:
        """How a causal LM cache stores the teacher's next-token distributions (None: it stores logits)."""
        return self.cache.manifest.distribution

    @property
    def sampling_seed(self) -> int:
        """The seed a sampled cache's draws were made with (``capture.logits.seed``)."""
        return (self.meta.capture.get("logits") or {}).get("seed", 0)

    def rows(self, split: str) -> ShardRows:
        """Every row of ``split`` in cache order, read and verified shard by shard."""
        return ShardRows.concat([data.rows for data in self.cache.iter_shards(split)])

    @property
    def precision(self) -> torch.dtype:
        """The autocast dtype the teacher's values were computed at (every shard records the same)."""
        return PRECISIONS[self.cache.shards("train")[0].producer.get("precision", "float32")]

    def stored(self, split: str = "train") -> dict[str, tuple[int, ...]]:
        """The tensors the split's shards hold: name -> layers."""
        held = set(self.cache.split(split).tensors)
        return {spec.name: spec.layers for spec in self.cache.manifest.tensors if spec.name in held}

    def teacher_dir(self, explicit: str | None = None, *, search: tuple[Path, ...] = ()) -> Path:
        """A local directory holding the cache's teacher: ``explicit`` (checked against the cache's
        fingerprint), the bundled checkpoint, a ready-made teacher where the capture found it, or a
        fine-tuned one under ``search`` whose record names the fingerprint.

        Raises:
            ConfigError: ``explicit`` is another teacher, or no copy of the teacher can be found.
        """
        card = self.meta.teacher
        if explicit is not None:
            return self._checked(model_dir(explicit), explicit)
        if card.bundled:
            return self.cache.attachment(TEACHER)
        if card.key is None:  # used as it was: the same location may serve here
            try:
                return self._checked(model_dir(card.source), card.source)
            except ConfigError:
                pass
        for root in search:
            for record in sorted(Path(root).glob(f"*/{TEACHER_RECORD}")):
                if json.loads(record.read_text()).get("fingerprint") == card.fingerprint:
                    return record.parent
        raise ConfigError(
            f"cache {self.key} does not bundle its teacher ({self.meta.teacher_name}, fingerprint {card.fingerprint}) "
            f"and no local teacher under {[str(r) for r in search]} has that fingerprint; pass --teacher DIR, or "
            "capture with capture.bundle_teacher: true"
        )

    def _checked(self, directory: Path, named: str) -> Path:
        theirs = teacher_fingerprint(directory)
        if theirs != self.meta.teacher.fingerprint:
            raise ConfigError(
                f"teacher {named} is another teacher (fingerprint {theirs}) than the one cache {self.key} was written "
                f"by ({self.meta.teacher_name}, fingerprint {self.meta.teacher.fingerprint}); pass --teacher with a "
                "copy of that one"
            )
        return directory


def teacher_locations(cfg: ExperimentConfig, cache: str | Location | None = None) -> list[str | Location]:
    """Where the run's teachers' caches are: ``distill.teachers`` (a config file names the cache its
    ``teacher-cache`` made), or else the one cache: ``cache`` (--cache) or the config's own.

    Raises:
        ConfigError: both --cache and distill.teachers, or a config among the teachers without its cache.
    """
    if not cfg.distill.teachers:
        return [cache if cache is not None else locate_cache(cfg)]
    if cache is not None:
        raise ConfigError(
            f"config {cfg.name!r} names its teachers' caches in distill.teachers; give them there "
            "(--set 'distill.teachers=[...]'), not with --cache"
        )
    return [named_location(t) for t in cfg.distill.teachers]


def named_location(entry: str) -> str | Location:
    """A cache's path or URL as given, or for a config file the cache its ``teacher-cache`` made."""
    return locate_cache(load_config(entry)) if is_config_file(entry) else entry


def open_teachers(locations: list[str | Location]) -> list[TeacherCache]:
    """The teachers' caches, which must hold the same examples: the same task, tokenizer, rows and labels.

    Raises:
        ConfigError: two caches that differ there (the message says in what), or a causal LM cache among
            several (fusion reads logits).
    """
    caches = [TeacherCache(location) for location in locations]
    first = caches[0]
    for other in caches[1:]:
        for what, field in (("task", "task"), ("tokenizer", "tokenizer_fingerprint"),
                            ("rows (data fingerprint)", "data_fingerprint"), ("label names", "label_names")):  # fmt: skip
            mine, theirs = getattr(first.meta, field), getattr(other.meta, field)
            if mine != theirs:
                raise ConfigError(
                    f"teacher caches {first.key} and {other.key} are not over the same examples: their {what} differ "
                    f"({mine} vs {theirs}); capture every teacher from the same data and tokenizer"
                )
    if len(caches) > 1 and first.distribution is not None:
        raise ConfigError(f"cache {first.key} holds a causal LM's sparse distributions; fusing teachers needs logits")
    return caches


def locate_cache(cfg: ExperimentConfig) -> Location:
    """The cache ``teacher-cache`` made for this experiment: the one it named after ``cfg.name``
    under ``capture.cache_root``, checked against the config and the data files' sizes and times
    (the data itself is not read).

    Raises:
        ConfigError: the config cannot name a cache, or names one made from other settings.
    """
    if cfg.data is None or cfg.teacher is None:
        raise ConfigError(f"config {cfg.name!r} has no data: and teacher: sections to find its cache by; pass --cache")
    found = named_cache(cfg.capture.cache_root, cfg.name)
    if found is None:
        raise CacheNotFoundError(
            f"no teacher cache named {cfg.name!r} under {cfg.capture.cache_root}; run `kdcache teacher-cache "
            "--config ...` first, or pass --cache"
        )
    location, recorded = found
    difference = _first_difference(recorded, json.loads(json.dumps(experiment_identity(cfg))))
    if difference:
        raise ConfigError(
            f"the cache named {cfg.name!r} ({location}) was made from other settings ({difference}); run "
            "`kdcache teacher-cache --config ...` again, or pass --cache to use it anyway"
        )
    return location


def _first_difference(recorded, current, where: str = "") -> str | None:
    """The first key whose values differ, as ``data.labeled_train_size: 2000 then, 1000 now``."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        for key in sorted(set(recorded) | set(current)):
            found = _first_difference(recorded.get(key), current.get(key), f"{where}.{key}" if where else key)
            if found:
                return found
        return None
    return None if recorded == current else f"{where}: {recorded!r} then, {current!r} now"

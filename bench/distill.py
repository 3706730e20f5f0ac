"""Student training from the cache vs from memory vs with the live teacher, and 1 to 4 students per pass.

One run on the demo (its fine-tuned MiniLM-L6 teacher and its cache: `make teacher-cache`
first), training the demo's 2-layer student (teacher layers 3 and 6, frozen embeddings,
KL + CE + hidden-state MSE) on the same planned batches in every mode:

- cached:    batches streamed from the cache (read, verify, decode, pad);
- in memory: the same cache shards decoded into memory beforehand: the limit for cached;
- online:    the teacher runs live on every batch (`distill --online`).

Then 1, 2 and 4 students (cut from other layer pairs) train in one pass over the cache.
Times include each epoch's validation; evaluation on test is not timed.

    python bench/distill.py [--epochs 1] [--max-students 4] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

from transformers import AutoConfig

from pipeline.capture import plan_cache
from pipeline.config import load_config
from pipeline.data import tokenize
from pipeline.distill import LiveTeacher, _open_checked, train_pass
from pipeline.models import load_classifier, load_tokenizer
from pipeline.runtime import resolve_device
from pipeline.streaming import CacheSource, TokenSource
from pipeline.training import Collator, evaluate

ROOT = Path(__file__).resolve().parents[1]
OTHER_CUTS = [(2, 6), (4, 6), (2, 4)]  # more 2-layer students (layers the demo cache holds)


class MemorySource:
    """A cache split's shards, decoded into memory before training starts."""

    def __init__(self, source: CacheSource, wanted: list[tuple[str, int]]):
        self.shards = [source.read(k, wanted) for k in range(len(source))]

    def __len__(self) -> int:
        return len(self.shards)

    def rows(self, shard: int):
        return self.shards[shard].rows

    def read(self, shard: int, wanted):
        return self.shards[shard]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-students", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args()

    base = load_config(args.config, [f"distill.epochs={args.epochs}", "distill.seeds=[0]"])
    student = base.distill.students[0]
    cfg = dataclasses.replace(base, distill=dataclasses.replace(base.distill, students=(student,)))
    plan = plan_cache(cfg)
    cache = _open_checked(plan, None)
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(plan.teacher_path)
    teacher_config = AutoConfig.from_pretrained(str(plan.teacher_path))
    test_ids = tokenize(tokenizer, plan.splits["test"], max_length=cfg.data.max_length)
    cached_source = CacheSource(cache, "train")
    wanted = [("hidden_states", t) for t in student.teacher_layers]
    train = plan.splits["train"]
    sources = {
        "cached": cached_source,
        "in memory": MemorySource(cached_source, wanted),
        "online": TokenSource(
            plan.token_ids["train"], train.labels, train.example_id, shard_rows=cfg.capture.shard_rows
        ),  # fmt: skip
    }
    live = LiveTeacher(load_classifier(plan.teacher_path).to(device).eval())
    work = Path(tempfile.mkdtemp(prefix="kdcache-bench-distill-"))
    figures, rows = {"train_rows": len(train), "epochs": args.epochs}, []
    try:

        def timed_pass(run_cfg, source, name, online=False):
            start = time.perf_counter()
            students = train_pass(run_cfg, plan, source, work, name, seed=0, kd=True, tokenizer=tokenizer,
                                  device=device, teacher_config=teacher_config,
                                  live=live if online else None)  # fmt: skip
            return time.perf_counter() - start, students

        steps = _steps(cfg, cached_source)  # the same planned batches in every mode
        for mode, source in sources.items():
            seconds, (model,) = timed_pass(cfg, source, mode.replace(" ", "-"), online=mode == "online")
            accuracy = evaluate(model, test_ids, plan.splits["test"].labels,
                                collate=Collator.for_model(tokenizer, model.config)).accuracy  # fmt: skip
            key = mode.replace(" ", "_").replace("in_memory", "memory")
            figures[f"{key}_seconds"] = round(seconds, 2)
            figures[f"{key}_steps_per_s"] = round(steps / seconds, 3)
            figures[f"accuracy_{key}"] = round(accuracy, 4)
            rows.append((mode, seconds, steps / seconds, len(train) * args.epochs / seconds, accuracy))
        figures["cache_vs_memory"] = round(figures["cached_steps_per_s"] / figures["memory_steps_per_s"], 3)
        figures["cached_vs_online"] = round(figures["online_seconds"] / figures["cached_seconds"], 3)
        figures["memory_vs_online"] = round(figures["online_seconds"] / figures["memory_seconds"], 3)

        many = []
        for count in (n for n in (1, 2, 4) if n <= args.max_students):
            students = (student,) + tuple(
                dataclasses.replace(student, name=f"{student.name}-{a}-{b}", teacher_layers=(a, b))
                for a, b in OTHER_CUTS[: count - 1]
            )
            run_cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, students=students))
            seconds = (
                figures["cached_seconds"] if count == 1 else timed_pass(run_cfg, cached_source, f"many-{count}")[0]
            )
            per_student = len(train) * args.epochs / seconds
            many.append((count, seconds, per_student, per_student * count))
            figures[f"students_{count}_examples_per_s_per_student"] = round(per_student, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_tables(rows, many, figures)
    if args.json:
        print(json.dumps(figures))


def _steps(cfg, source: CacheSource) -> int:
    from pipeline.streaming import StudentStream

    stream = StudentStream(source, collate=Collator(pad_id=0), batch_size=cfg.distill.batch_size, seed=0,
                           block_rows=cfg.distill.block_rows, buffer_rows=cfg.distill.buffer_rows)  # fmt: skip
    return len(stream) * cfg.distill.epochs


def print_tables(rows, many, figures) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"a 2-layer student, {figures['train_rows']} rows x {figures['epochs']} epoch(s)")
    for column in ("mode", "seconds", "steps/s", "examples/s", "test accuracy"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for mode, seconds, steps_s, examples_s, accuracy in rows:
        table.add_row(mode, f"{seconds:.1f}", f"{steps_s:.2f}", f"{examples_s:.0f}", f"{accuracy:.4f}")
    console.print(table)
    print(f"cached / in memory (steps/s): {figures['cache_vs_memory']:.3f}    "
          f"online / cached (time): {figures['cached_vs_online']:.3f}    "
          f"online / in memory (time): {figures['memory_vs_online']:.3f}")  # fmt: skip
    table = Table(title="students trained in one pass over the cache")
    for column in ("students", "seconds", "examples/s per student", "student-examples/s in all"):
        table.add_column(column, justify="right")
    for count, seconds, per_student, total in many:
        table.add_row(str(count), f"{seconds:.1f}", f"{per_student:.0f}", f"{total:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()

"""Student training from the cache vs from memory vs with the live teacher, and 1 to 4 students per pass.

On the demo (its fine-tuned MiniLM-L6 teacher and its cache: `make teacher-cache`
first), the demo's 2-layer student (teacher layers 3 and 6, frozen embeddings, KL + CE +
hidden-state MSE) trains one epoch over the first ``--shards`` train shards, on the same
planned batches in every mode:

- cached:    batches streamed from the cache (read, verify, decode, pad);
- in memory: the same cache shards decoded into memory beforehand: the limit for cached;
- online:    the teacher runs live on every batch (`distill --online`).

Then 1, 2 and 4 students (cut from other layer pairs) train in one pass over the cache.
Times include the epoch's validation; evaluation on test is not timed. After one warm-up
of each, the modes run in turn for ``--rounds`` rounds (see rounds.py); ratios are the
median over rounds of the per-round ratio, with their spread.

    python bench/distill.py [--shards 3] [--rounds 5] [--max-students 4] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from rounds import interleaved, ratio, spread

from pipeline.config import load_config
from pipeline.runtime import resolve_device
from pipeline.student.distill import student_stream, train_pass
from pipeline.student.inputs import TEACHER_ROOT, TeacherCache, locate_cache
from pipeline.student.streaming import CacheSource, LiveTeacher, TokenSource
from pipeline.training import Collator, evaluate

ROOT = Path(__file__).resolve().parents[1]
OTHER_CUTS = [(2, 6), (4, 6), (2, 4)]  # more 2-layer students (layers the demo cache holds)


class FirstShards:
    """The first ``count`` shards of a source (a round's worth of training)."""

    def __init__(self, source, count: int):
        self.source, self.count = source, min(count, len(source))

    def __len__(self) -> int:
        return self.count

    def rows(self, shard: int):
        return self.source.rows(shard)

    def read(self, shard: int, wanted, distribution: bool = False):
        return self.source.read(shard, wanted, distribution)


class MemorySource(FirstShards):
    """Shards decoded into memory before training starts."""

    def __init__(self, source, wanted: list[tuple[int, str, int]]):
        super().__init__(source, len(source))
        self.shards = [source.read(k, wanted) for k in range(len(source))]

    def rows(self, shard: int):
        return self.shards[shard][0].rows

    def read(self, shard: int, wanted, distribution: bool = False):
        return self.shards[shard]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--shards", type=int, default=3, help="train shards per round (1,024 rows each)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the modes")
    parser.add_argument("--max-students", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args()

    base = load_config(args.config, ["distill.epochs=1", "distill.seeds=[0]"])
    student = base.distill.students[0]
    cfg = dataclasses.replace(base, distill=dataclasses.replace(base.distill, students=(student,)))
    cache = TeacherCache(locate_cache(cfg))
    device = resolve_device(cfg.device)
    tokenizer = cache.tokenizer
    teacher = cache.task.load_model(cache.teacher_dir(search=(TEACHER_ROOT,))).to(device).eval()
    test = cache.rows("test")
    cached = FirstShards(CacheSource(cache.cache, "train"), args.shards)
    wanted = [(0, "hidden_states", t) for t in student.teacher_layers]
    online = TokenSource(cache.rows("train"), shard_rows=cache.cache.manifest.shard_rows)
    sources = {"cached": cached, "in memory": MemorySource(cached, wanted), "online": FirstShards(online, args.shards)}
    live = LiveTeacher(teacher, task=cache.task, tokenizer=tokenizer, specs=cache.cache.manifest.tensors, heads=cache.meta.stored_heads,
                       precision=cache.precision)  # fmt: skip
    rows = sum(len(cached.rows(k)) for k in range(len(cached)))
    steps = len(student_stream(cfg, cached, cache, seed=0, kd=True))  # the same planned batches in every mode
    work = Path(tempfile.mkdtemp(prefix="kdcache-bench-distill-"))
    trained = {}

    def one_pass(run_cfg, source, mode: str, *, with_teacher: bool = False):
        def run() -> float:
            run_dir = work / mode.replace(" ", "-")
            start = time.perf_counter()
            trained[mode] = train_pass(run_cfg, cache, source, run_dir, "bench", seed=0, kd=True, epochs=1,
                                       device=device, teacher_model=teacher,
                                       live=live if with_teacher else None)  # fmt: skip
            seconds = time.perf_counter() - start
            shutil.rmtree(run_dir, ignore_errors=True)
            return seconds

        return run

    try:
        modes = {mode: one_pass(cfg, source, mode, with_teacher=mode == "online") for mode, source in sources.items()}
        seconds = interleaved(modes, rounds=args.rounds)
        figures = {"train_rows": rows, "steps": steps, "rounds": args.rounds}
        for mode in sources:
            ((model, _),) = trained[mode]
            accuracy = evaluate(model, test, task=cache.task, label_names=cache.label_names,
                                collate=Collator.for_model(tokenizer, model.config)).metrics["accuracy"]  # fmt: skip
            key = mode.replace("in memory", "memory")
            figures[f"{key}_seconds"] = round(float(np.median(seconds[mode])), 2)
            figures[f"{key}_steps_per_s"] = round(steps / figures[f"{key}_seconds"], 3)
            figures[f"{key}_examples_per_s"] = round(rows / figures[f"{key}_seconds"], 1)
            figures[f"accuracy_{key}"] = round(accuracy, 4)
        figures |= ratio("cache_vs_memory", seconds["in memory"], seconds["cached"])
        figures |= ratio("cached_vs_online", seconds["online"], seconds["cached"])
        figures |= ratio("memory_vs_online", seconds["online"], seconds["in memory"])

        passes = {}
        for count in (n for n in (1, 2, 4) if n <= args.max_students):
            students = (student,) + tuple(
                dataclasses.replace(student, name=f"{student.name}-{a}-{b}", teacher_layers=(a, b))
                for a, b in OTHER_CUTS[: count - 1]
            )
            run_cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, students=students))
            passes[f"students_{count}"] = one_pass(run_cfg, cached, f"students-{count}")
        per_pass = interleaved(passes, rounds=max(1, args.rounds // 2), warmup=False)
        for name, times in per_pass.items():
            count = int(name.rsplit("_", 1)[1])
            figures[f"{name}_seconds"] = round(float(np.median(times)), 2)
            figures[f"{name}_examples_per_s_per_student"] = round(rows / figures[f"{name}_seconds"], 1)
        if "students_2" in per_pass:
            figures |= ratio("two_students_vs_one", [2 * t for t in per_pass["students_1"]], per_pass["students_2"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_tables(figures, list(per_pass))
    if args.json:
        print(json.dumps(figures))


def print_tables(figures: dict, passes: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    title = (f"a 2-layer student, {figures['train_rows']} rows, {figures['steps']} steps, median of "
             f"{figures['rounds']} interleaved rounds")  # fmt: skip
    table = Table(title=title)
    for column in ("mode", "seconds", "steps/s", "examples/s", "test accuracy"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for mode, key in (("cached", "cached"), ("in memory", "memory"), ("online", "online")):
        table.add_row(mode, f"{figures[f'{key}_seconds']:.1f}", f"{figures[f'{key}_steps_per_s']:.2f}",
                      f"{figures[f'{key}_examples_per_s']:.0f}", f"{figures[f'accuracy_{key}']:.4f}")  # fmt: skip
    console.print(table)
    print(f"cached / in memory (speed): {spread(figures, 'cache_vs_memory')}    "
          f"online / cached (time): {spread(figures, 'cached_vs_online')}    "
          f"online / in memory (time): {spread(figures, 'memory_vs_online')}  (median, min-max over rounds)")  # fmt: skip
    table = Table(title="students trained in one pass over the cache")
    for column in ("students", "seconds", "examples/s per student", "student-examples/s in all"):
        table.add_column(column, justify="right")
    for name in passes:
        count, per_student = int(name.rsplit("_", 1)[1]), figures[f"{name}_examples_per_s_per_student"]
        table.add_row(
            str(count), f"{figures[f'{name}_seconds']:.1f}", f"{per_student:.0f}", f"{per_student * count:.0f}"
        )
    console.print(table)


if __name__ == "__main__":
    main()

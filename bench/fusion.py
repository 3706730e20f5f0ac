"""A student learning from 1, 2 or 3 teachers' caches at once: does the stream keep up?

On the fusion demo's three caches (`kdcache teacher-cache --config configs/fusion.yaml`
first), the demo's 2-layer student (KL to the teachers' mean + CE) trains one epoch over
the first ``--shards`` train shards, fused over the first 1, 2 and 3 teachers, on the same
planned batches; the stream alone (the batches built and thrown away) is timed the same
way. After one warm-up of each, the modes run in turn for ``--rounds`` rounds (see
rounds.py); ratios are the median over rounds of the per-round ratio, with their spread.

    python bench/fusion.py [--shards 3] [--rounds 5] [--json]
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
from distill import FirstShards
from rounds import interleaved, ratio, spread

from pipeline.config import load_config
from pipeline.runtime import resolve_device
from pipeline.student.distill import student_stream, train_pass
from pipeline.student.inputs import TEACHER_ROOT, open_teachers, teacher_locations
from pipeline.student.streaming import CacheSource

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "fusion.yaml"))
    parser.add_argument("--shards", type=int, default=3, help="train shards per round (1,024 rows each)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the modes")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args()

    base = load_config(args.config, ["distill.epochs=1", "distill.seeds=[0]"])
    cfg = dataclasses.replace(base, distill=dataclasses.replace(base.distill, students=base.distill.students[:1]))
    teachers = open_teachers(teacher_locations(cfg))
    device = resolve_device(cfg.device)
    first = teachers[0]
    teacher_model = first.task.load_model(first.teacher_dir(search=(TEACHER_ROOT,))).to(device)
    counts = range(1, len(teachers) + 1)
    sources = {n: FirstShards(CacheSource([t.cache for t in teachers[:n]], "train"), args.shards) for n in counts}
    rows = sum(len(sources[1].rows(k)) for k in range(len(sources[1])))
    steps = len(student_stream(cfg, sources[1], first, seed=0, kd=True))
    work = Path(tempfile.mkdtemp(prefix="kdcache-bench-fusion-"))

    def training(n: int):
        def run() -> float:
            run_dir = work / f"teachers-{n}"
            start = time.perf_counter()
            train_pass(cfg, first, sources[n], run_dir, "bench", seed=0, kd=True, epochs=1, device=device,
                       teacher_model=teacher_model, teachers=teachers[:n])  # fmt: skip
            seconds = time.perf_counter() - start
            shutil.rmtree(run_dir, ignore_errors=True)
            return seconds

        return run

    def streaming(n: int):
        def run() -> float:
            start = time.perf_counter()
            for _ in student_stream(cfg, sources[n], first, seed=0, kd=True).loader(0):
                pass
            return time.perf_counter() - start

        return run

    try:
        modes = {f"train_{n}": training(n) for n in counts} | {f"stream_{n}": streaming(n) for n in counts}
        seconds = interleaved(modes, rounds=args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures = {"train_rows": rows, "steps": steps, "rounds": args.rounds}
    for name, times in seconds.items():
        figures[f"{name}_steps_per_s"] = round(steps / float(np.median(times)), 2)
    for n in counts:  # speed ratios: above 1, the first is faster
        figures |= ratio(f"stream_{n}_vs_train_{n}", seconds[f"train_{n}"], seconds[f"stream_{n}"])
        if n > 1:
            figures |= ratio(f"train_{n}_vs_1", seconds["train_1"], seconds[f"train_{n}"])
            figures |= ratio(f"stream_{n}_vs_1", seconds["stream_1"], seconds[f"stream_{n}"])
    print_table(figures, list(counts))
    if args.json:
        print(json.dumps(figures))


def print_table(figures: dict, counts: list[int]) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (f"a 2-layer student, {figures['train_rows']} rows, {figures['steps']} steps, median of "
             f"{figures['rounds']} interleaved rounds")  # fmt: skip
    table = Table(title=title)
    for column in ("teachers", "training steps/s", "vs 1 teacher", "stream alone batches/s", "stream / training"):
        table.add_column(column, justify="right")
    for n in counts:
        vs = "1" if n == 1 else spread(figures, f"train_{n}_vs_1")
        name = f"stream_{n}_vs_train_{n}"
        over = f"{figures[name]:.0f}x ({figures[f'{name}_min']:.0f}-{figures[f'{name}_max']:.0f})"
        table.add_row(str(n), f"{figures[f'train_{n}_steps_per_s']:.2f}", vs,
                      f"{figures[f'stream_{n}_steps_per_s']:.1f}", over)  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()

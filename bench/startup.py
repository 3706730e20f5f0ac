"""distill's startup: seconds from the command to the first training step, two checkouts side by side.

Each directory is a checkout with its own virtualenv, teacher and cache made (`make
teacher-cache`). In each, `.venv/bin/kdcache distill --config CONFIG --no-baselines` is
started and stopped as soon as its progress bar shows the first step; the two run in
turn for ``--rounds`` rounds (see rounds.py), after one warm-up each (the page cache).

    python bench/startup.py --before ../kdcache-old --after . [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
from rounds import interleaved, ratio, spread

FIRST_STEP = re.compile(rb"\|\s*1/\d+ \[")  # tqdm's bar after the first training step: "| 1/313 ["


def first_step(directory: Path, config: str) -> float:
    """Seconds until the distill command in ``directory`` has taken its first training step."""
    before = set((directory / "runs").glob("*-*")) if (directory / "runs").exists() else set()
    command = [str(directory / ".venv" / "bin" / "kdcache"), "distill", "--config", config, "--no-baselines"]
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    seen = b""
    try:
        while not FIRST_STEP.search(seen[-4096:]):
            chunk = os.read(child.stderr.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"{directory}: distill ended before its first step:\n{seen[-2000:].decode()}")
            seen += chunk
        return time.perf_counter() - start
    finally:
        child.kill()
        child.wait()
        for run in set((directory / "runs").glob("*-*")) - before:  # the interrupted run this made
            shutil.rmtree(run, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout of the earlier version")
    parser.add_argument("--after", type=Path, required=True, help="checkout of the later version")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args()
    before, after = args.before.resolve(), args.after.resolve()
    modes = {"before": lambda: first_step(before, args.config), "after": lambda: first_step(after, args.config)}
    seconds = interleaved(modes, rounds=args.rounds)
    figures = {"rounds": args.rounds, **{f"{n}_seconds": round(float(np.median(t)), 2) for n, t in seconds.items()}}
    figures |= ratio("speedup", seconds["before"], seconds["after"])  # before / after: > 1 when after starts sooner
    print(f"command to first training step, median of {args.rounds} interleaved rounds: before "
          f"{figures['before_seconds']:.1f} s, after {figures['after_seconds']:.1f} s; "
          f"speed-up {spread(figures, 'speedup')} (median, min-max)")  # fmt: skip
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()

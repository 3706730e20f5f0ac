"""Interleaved rounds, the timing discipline every benchmark here follows.

A ratio from one run of each mode swings with whatever else the machine does. So each
benchmark warms every mode up once, then runs the modes in turn (A B C, A B C, ...) for a
number of rounds: a slow spell hits all of them alike. A ratio is computed per round and
reported as its median with its spread (min, max and interquartile range).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(modes: dict[str, Callable[[], float]], *, rounds: int, warmup: bool = True) -> dict[str, list[float]]:
    """Seconds per round for each mode, the modes run in turn within every round.

    Args:
        modes: name -> a callable that runs the mode once and returns the seconds to count
            (it times itself, so that per-round setup such as a fresh directory is left out).
        warmup: run every mode once first, untimed (imports, allocations, page cache).
    """
    if warmup:
        for run in modes.values():
            run()
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(rounds):
        for name, run in modes.items():
            seconds[name].append(run())
    return seconds


def ratio(name: str, numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """``numerator[i] / denominator[i]`` per round: its median as ``name``, and its spread beside it."""
    values = np.asarray(numerator, dtype=float) / np.asarray(denominator, dtype=float)
    q1, q3 = np.percentile(values, [25, 75])
    return {
        name: round(float(np.median(values)), 3),
        f"{name}_min": round(float(values.min()), 3),
        f"{name}_max": round(float(values.max()), 3),
        f"{name}_iqr": round(float(q3 - q1), 3),
    }


def spread(figures: dict, name: str) -> str:
    """``0.88 (0.85-0.90)``: a ratio with its min-max over the rounds."""
    return f"{figures[name]:.3f} ({figures[f'{name}_min']:.3f}-{figures[f'{name}_max']:.3f})"

"""The run report: one table on the terminal, in report.md and report.json, and a plot in report.png."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table


@dataclass(frozen=True)
class ModelResult:
    """One trained (or the teacher) model's test results."""

    name: str
    role: str  # teacher, student or baseline
    seed: int
    accuracy: float
    macro_f1: float
    params: int
    size_bytes: int
    examples_per_s: float | None  # inference at batch 32 on the run's device (None: the teacher's weights not loaded)
    path: str
    steps: int | None = None  # optimizer steps taken over all its epochs (None: a ready-made teacher)
    best_epoch: int | None = None  # the epoch whose weights were kept (best validation accuracy)
    baseline: str | None = None  # for a student: the name of its no-KD baseline


def summarize(results: list[ModelResult]) -> list[dict]:
    """One entry per model name: metrics averaged over seeds, with their spread."""
    teacher_accuracy = next(r.accuracy for r in results if r.role == "teacher")
    summary = []
    for name in dict.fromkeys(r.name for r in results):
        runs = [r for r in results if r.name == name]
        accuracy = [r.accuracy for r in runs]
        summary.append({
            "name": name,
            "role": runs[0].role,
            "seeds": [r.seed for r in runs],
            "accuracy": float(np.mean(accuracy)),
            "accuracy_std": float(np.std(accuracy)),
            "macro_f1": float(np.mean([r.macro_f1 for r in runs])),
            "steps": runs[0].steps,
            "best_epochs": [r.best_epoch for r in runs],
            "params": runs[0].params,
            "size_bytes": runs[0].size_bytes,
            "examples_per_s": None if runs[0].examples_per_s is None else float(np.mean([r.examples_per_s for r in runs])),
            "pct_of_teacher": 100 * float(np.mean(accuracy)) / teacher_accuracy,
            "baseline": runs[0].baseline,
            "paths": [r.path for r in runs],
        })  # fmt: skip
    return summary


_COLUMNS = ("model", "role", "accuracy", "macro-F1", "% of teacher", "steps", "best epoch", "params", "size",
            "examples/s")  # fmt: skip


def _row(entry: dict) -> tuple[str, ...]:
    spread = f" ± {entry['accuracy_std']:.4f}" if len(entry["seeds"]) > 1 else ""
    return (
        entry["name"],
        entry["role"],
        f"{entry['accuracy']:.4f}{spread}",
        f"{entry['macro_f1']:.4f}",
        f"{entry['pct_of_teacher']:.1f}%",
        "-" if entry["steps"] is None else f"{entry['steps']:,}",
        ",".join("-" if e is None else str(e) for e in entry["best_epochs"]),
        f"{entry['params'] / 1e6:.1f}M",
        f"{entry['size_bytes'] / 1e6:.1f} MB",
        "-" if entry["examples_per_s"] is None else f"{entry['examples_per_s']:.0f}",
    )


def write_report(run_dir: Path, results: list[ModelResult], *, config: dict, cache_key: str) -> list[dict]:
    """Print the table and write report.md and report.json into ``run_dir``."""
    summary = summarize(results)
    rows = [_row(entry) for entry in summary]
    table = Table(title=f"kdcache run {run_dir.name} (test split)")
    for column in _COLUMNS:
        table.add_column(column, justify="left" if column in ("model", "role") else "right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # a log file or pipe: do not squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    seeds = sorted({r.seed for r in results if r.role != "teacher"})
    note = (
        f"Accuracy is the mean over seeds {seeds} (± standard deviation); steps are optimizer steps over all epochs, "
        "and the best epoch's weights (by validation accuracy) are the ones tested, one per seed; throughput is "
        "inference at batch 32 on this run's device (the teacher's only when its weights were loaded). The "
        "teacher's accuracy is that of its cached logits."
    )
    (run_dir / "report.md").write_text(f"# kdcache run {run_dir.name}\n\n{note}\n\n" + "\n".join(lines) + "\n")
    report = {
        "cache_key": cache_key,
        "models": summary,
        "runs": [dataclasses.asdict(r) for r in results],
        "config": config,
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=1))
    plot_summary(summary, run_dir / "report.png", title=f"kdcache run {run_dir.name}")
    return summary


_COLORS = {"teacher": "#444444", "student": "#1f77b4", "baseline": "#ff7f0e"}


def plot_summary(summary: list[dict], path: Path, *, title: str) -> None:
    """Test accuracy against CPU throughput, one point per model (error bars: std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for entry in (e for e in summary if e["examples_per_s"] is not None):
        ax.errorbar(entry["examples_per_s"], 100 * entry["accuracy"], yerr=100 * entry["accuracy_std"], fmt="o",
                    color=_COLORS[entry["role"]], capsize=3)  # fmt: skip
        ax.annotate(f"{entry['name']} ({entry['params'] / 1e6:.1f}M)", (entry["examples_per_s"], 100 * entry["accuracy"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)  # fmt: skip
    for role, color in _COLORS.items():
        ax.scatter([], [], color=color, label=role)
    ax.set_xlabel("inference on the run's device, examples/s (batch 32)")
    ax.set_ylabel("test accuracy, %")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

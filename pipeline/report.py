"""The run report: one table on the terminal, in report.md and report.json, and a plot in report.png."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from .tasks import Task


@dataclass(frozen=True)
class ModelResult:
    """One trained (or the teacher) model's test results."""

    name: str
    role: str  # teacher, student or baseline
    seed: int
    metrics: dict[str, float]  # the task's metrics on the test split
    params: int
    size_bytes: int
    examples_per_s: float | None  # inference at batch 32 on the run's device (None: the teacher's weights not loaded)
    path: str
    steps: int | None = None  # optimizer steps taken over all its epochs (None: a ready-made teacher)
    best_epoch: int | None = None  # the epoch whose weights were kept (best validation primary metric)
    baseline: str | None = None  # for a student: the name of its no-KD baseline
    tokens_per_s: float | None = None  # the same inference in tokens/s
    continuations: list[str] | None = None  # a causal LM's greedy continuations of the cache's prompts


def summarize(results: list[ModelResult], task: Task) -> list[dict]:
    """One entry per model name: each metric averaged over seeds, with its spread (standard deviation)."""
    primary = task.primary_metric
    teacher_score = next(r.metrics[primary] for r in results if r.role == "teacher")
    summary = []

    def mean(values) -> float | None:
        return None if any(v is None for v in values) else float(np.mean(values))

    for name in dict.fromkeys(r.name for r in results):
        runs = [r for r in results if r.name == name]
        values = {metric: [r.metrics[metric] for r in runs] for metric in task.metric_labels}
        summary.append({
            "name": name,
            "role": runs[0].role,
            "seeds": [r.seed for r in runs],
            "metrics": {metric: float(np.mean(v)) for metric, v in values.items()},
            "metrics_std": {metric: float(np.std(v)) for metric, v in values.items()},
            "steps": runs[0].steps,
            "best_epochs": [r.best_epoch for r in runs],
            "params": runs[0].params,
            "size_bytes": runs[0].size_bytes,
            "examples_per_s": mean([r.examples_per_s for r in runs]),
            "tokens_per_s": mean([r.tokens_per_s for r in runs]),
            "pct_of_teacher": _pct_of_teacher(float(np.mean(values[primary])), teacher_score, task),
            "baseline": runs[0].baseline,
            "paths": [r.path for r in runs],
        })  # fmt: skip
    return summary


def _pct_of_teacher(value: float, teacher: float, task: Task) -> float | None:
    """A model's primary metric as a percentage of the teacher's (for a lower-is-better one, teacher / model)."""
    if not teacher or not value:
        return None
    return 100 * (teacher / value if task.lower_is_better else value / teacher)


def _throughput_key(task: Task) -> str:
    return f"{task.throughput}_per_s"


def _columns(task: Task) -> tuple[str, ...]:
    return ("model", "role", *task.metric_labels.values(), "% of teacher", "steps", "best epoch", "params", "size",
            f"{task.throughput}/s")  # fmt: skip


def _row(entry: dict, task: Task) -> tuple[str, ...]:
    metrics = []
    for i, metric in enumerate(task.metric_labels):
        spread = f" ± {entry['metrics_std'][metric]:.4f}" if i == 0 and len(entry["seeds"]) > 1 else ""
        metrics.append(f"{entry['metrics'][metric]:.4f}{spread}")
    return (
        entry["name"],
        entry["role"],
        *metrics,
        "-" if entry["pct_of_teacher"] is None else f"{entry['pct_of_teacher']:.1f}%",
        "-" if entry["steps"] is None else f"{entry['steps']:,}",
        ",".join("-" if e is None else str(e) for e in entry["best_epochs"]),
        f"{entry['params'] / 1e6:.1f}M",
        f"{entry['size_bytes'] / 1e6:.1f} MB",
        "-" if entry[_throughput_key(task)] is None else f"{entry[_throughput_key(task)]:.0f}",
    )


def write_report(run_dir: Path, results: list[ModelResult], *, task: Task, config: dict, cache_key: str,
                 samples: tuple[dict, ...] = (), selection: dict | None = None) -> list[dict]:  # fmt: skip
    """Print the table and write report.md, report.json and report.png into ``run_dir``; with a causal
    LM's ``samples`` (the teacher's greedy continuations), each model's beside the teacher's; with
    ``selection`` ({select, curriculum, kept_per_epoch, of}: ``distill.select`` and ``distill.curriculum``), how many
    training rows each epoch kept."""
    summary = summarize(results, task)
    columns, rows = _columns(task), [_row(entry, task) for entry in summary]
    table = Table(title=f"kdcache run {run_dir.name} (test split)")
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "role") else "right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # a log file or pipe: do not squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    seeds = sorted({r.seed for r in results if r.role != "teacher"})
    primary = task.metric_labels[task.primary_metric]
    note = (
        f"{task.name}: each metric is the mean over seeds {seeds} ({primary} ± standard deviation); % of teacher is "
        f"of {primary}; steps are optimizer steps over all epochs, and the best epoch's weights (by validation "
        f"{primary}) are the ones tested, one per seed; throughput is inference at batch 32 on this run's device "
        "(the teacher's only when its weights were loaded). The teacher's metrics are those of its cached outputs."
    )
    if selection is not None:
        chosen = " and ".join(
            f"distill.{name} ({selection[name]})" for name in ("select", "curriculum") if selection[name]
        )
        kept = ", ".join(f"{n:,}" for n in selection["kept_per_epoch"])
        note += (f" {chosen or 'a row selection'} kept {kept} of {selection['of']:,} training rows in the students' "
                 "epochs; the baselines learn the labeled ones among them.")  # fmt: skip
    side_by_side = _continuations(results, samples)
    text = f"# kdcache run {run_dir.name}\n\n{note}\n\n" + "\n".join(lines) + "\n" + _continuations_md(side_by_side)
    (run_dir / "report.md").write_text(text)
    report = {
        "task": task.name,
        "primary_metric": task.primary_metric,
        "cache_key": cache_key,
        "models": summary,
        "continuations": side_by_side,
        "selection": selection,
        "runs": [dataclasses.asdict(r) for r in results],
        "config": config,
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=1))
    plot_summary(summary, task, run_dir / "report.png", title=f"kdcache run {run_dir.name}")
    return summary


def write_multitask_report(run_dir: Path, tasks: dict[str, tuple[Task, list[dict]]]) -> None:
    """report.md and report.json of a multi-task run: each model's primary test metric on every task (mean ±
    std over seeds), from each task's summary (``write_report`` wrote its own report in ``<run>/<task>/``)."""
    models = list(dict.fromkeys(entry["name"] for _, summary in tasks.values() for entry in summary))
    header = ["model"] + [f"{name}: {task.metric_labels[task.primary_metric]}" for name, (task, _) in tasks.items()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in models:
        cells = [model]
        for task, summary in tasks.values():
            entry = next((e for e in summary if e["name"] == model), None)
            primary = task.primary_metric
            cells.append("-" if entry is None else
                         f"{entry['metrics'][primary]:.4f} ± {entry['metrics_std'][primary]:.4f}")  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    note = ("Each task's teacher, its students and baselines trained on that task alone, and the multi-task students "
            "(one encoder, a head per task) on all of them; test metrics, mean ± standard deviation over seeds. "
            "Each task's full report is in its directory.")  # fmt: skip
    (run_dir / "report.md").write_text(
        f"# kdcache run {run_dir.name} (multi-task)\n\n{note}\n\n" + "\n".join(lines) + "\n"
    )
    report = {"tasks": {name: {"task": task.name, "primary_metric": task.primary_metric, "models": summary}
                        for name, (task, summary) in tasks.items()}}  # fmt: skip
    (run_dir / "report.json").write_text(json.dumps(report, indent=1))
    print("\n".join(lines))


def _continuations(results: list[ModelResult], samples: tuple[dict, ...]) -> list[dict]:
    """Per prompt: the teacher's greedy continuation and each model's (its first seed's)."""
    first = {}
    for r in results:
        if r.continuations is not None:
            first.setdefault(r.name, r.continuations)
    return [{"prompt": s["prompt"], "teacher": s["continuation"], **{name: c[i] for name, c in first.items()}}
            for i, s in enumerate(samples)]  # fmt: skip


def _continuations_md(side_by_side: list[dict]) -> str:
    if not side_by_side:
        return ""
    lines = ["", "## Greedy continuations", ""]
    for entry in side_by_side:
        lines += [f"**{entry['prompt']}** ...", ""]
        lines += [f"- {name}: {text.strip()!r}" for name, text in entry.items() if name != "prompt"]
        lines.append("")
    return "\n".join(lines)


_COLORS = {"teacher": "#444444", "student": "#1f77b4", "baseline": "#ff7f0e", "multi-task": "#2ca02c"}


def plot_summary(summary: list[dict], task: Task, path: Path, *, title: str) -> None:
    """The primary test metric against throughput, one point per model (error bars: std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    primary, speed = task.primary_metric, _throughput_key(task)
    scale = 1 if task.lower_is_better else 100  # fractions as percentages; a perplexity as it is
    for entry in (e for e in summary if e[speed] is not None):
        score = scale * entry["metrics"][primary]
        ax.errorbar(entry[speed], score, yerr=scale * entry["metrics_std"][primary], fmt="o",
                    color=_COLORS[entry["role"]], capsize=3)  # fmt: skip
        ax.annotate(f"{entry['name']} ({entry['params'] / 1e6:.1f}M)", (entry[speed], score),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)  # fmt: skip
    for role, color in _COLORS.items():
        ax.scatter([], [], color=color, label=role)
    ax.set_xlabel(f"inference on the run's device, {task.throughput}/s (batch 32)")
    ax.set_ylabel(f"test {task.metric_labels[primary]}" + ("" if task.lower_is_better else ", %"))
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""kdcache's command line: parses flags into a config and calls the stage's entry point."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer

from cache_store import CacheError
from pipeline.config import ConfigError, ExperimentConfig, load_config

DEFAULT_CONFIG = Path("configs/demo.yaml")

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Knowledge distillation with a cached teacher.")

ConfigOption = typer.Option(DEFAULT_CONFIG, "--config", "-c", help="experiment YAML")
MaxExamplesOption = typer.Option(None, "--max-examples", help="use only this many rows of the data set")


def _load(config: Path, *, max_examples: int | None = None, cache_root: str | None = None,
          seeds: str | None = None, baselines: bool | None = None) -> ExperimentConfig:  # fmt: skip
    cfg = load_config(config)
    if max_examples is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_examples=max_examples))
    if cache_root is not None:
        cfg = dataclasses.replace(cfg, capture=dataclasses.replace(cfg.capture, cache_root=cache_root))
    distill = cfg.distill
    if seeds is not None:
        distill = dataclasses.replace(distill, seeds=tuple(int(s) for s in seeds.split(",")))
    if baselines is not None:
        distill = dataclasses.replace(distill, baselines=baselines)
    return dataclasses.replace(cfg, distill=distill)


@app.callback()
def _quiet_libraries() -> None:
    """Keep the terminal for kdcache's own progress bars: no library load reports or bars."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _fail(error: Exception) -> typer.Exit:
    typer.echo(f"error: {error}", err=True)
    return typer.Exit(1)


@app.command("teacher-train")
def teacher_train(config: Path = ConfigOption, max_examples: int | None = MaxExamplesOption) -> None:
    """Fine-tune the teacher on the task (reused when already trained)."""
    from pipeline.teacher import run_teacher_train

    try:
        run_teacher_train(_load(config, max_examples=max_examples))
    except (ConfigError, CacheError) as e:
        raise _fail(e) from None


@app.command("teacher-cache")
def teacher_cache(
    config: Path = ConfigOption,
    max_examples: int | None = MaxExamplesOption,
    cache_root: str | None = typer.Option(None, "--cache-root", help="directory that holds caches"),
    as_json: bool = typer.Option(False, "--json", help="end with one JSON line: path, key, rows, bytes, reused"),
) -> None:
    """Run the teacher over the data once and write its outputs into a cache."""
    from pipeline.capture import run_capture

    try:
        result = run_capture(_load(config, max_examples=max_examples, cache_root=cache_root))
    except (ConfigError, CacheError) as e:
        raise _fail(e) from None
    if as_json:
        manifest = result.manifest
        summary = {"path": str(result.path), "key": manifest.key, "rows": manifest.rows,
                   "bytes": manifest.bytes, "reused": result.reused}  # fmt: skip
        typer.echo(json.dumps(summary))


@app.command("distill")
def distill(
    config: Path = ConfigOption,
    max_examples: int | None = MaxExamplesOption,
    seeds: str | None = typer.Option(None, "--seeds", help="comma-separated seeds, e.g. 0,1,2"),
    baselines: bool | None = typer.Option(None, "--baselines/--no-baselines", help="also train no-KD baselines"),
) -> None:
    """Train the students from the cache, evaluate them beside the teacher, write the report."""
    from pipeline.distill import run_distill

    try:
        result = run_distill(_load(config, max_examples=max_examples, seeds=seeds, baselines=baselines))
    except (ConfigError, CacheError) as e:
        raise _fail(e) from None
    typer.echo(f"report: {result.run_dir / 'report.md'}")


if __name__ == "__main__":
    app()

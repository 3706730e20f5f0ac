"""kdcache's command line: parses flags into a config and calls the stage's entry point."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer
import yaml

from cache_store import CacheError
from pipeline.config import ExperimentConfig, load_config
from pipeline.errors import KdcacheError

DEFAULT_CONFIG = Path("configs/demo.yaml")

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Knowledge distillation with a cached teacher.")

ConfigOption = typer.Option(DEFAULT_CONFIG, "--config", "-c", help="experiment YAML")
MaxExamplesOption = typer.Option(None, "--max-examples", help="use only this many rows of the data set")
SetOption = typer.Option([], "--set", help="override a config key: --set distill.epochs=5 (repeatable)")


def _load(config: Path, overrides: list[str], **shortcuts) -> ExperimentConfig:
    """The config file with the flag shortcuts and --set overrides applied (--set wins)."""
    keys = {"max_examples": "data.max_examples", "cache_root": "capture.cache_root",
            "seeds": "distill.seeds", "baselines": "distill.baselines"}  # fmt: skip
    implied = [f"{keys[name]}={json.dumps(value)}" for name, value in shortcuts.items() if value is not None]
    return load_config(config, [*implied, *overrides])


@app.callback()
def _quiet_libraries() -> None:
    """Keep the terminal for kdcache's own progress bars: no library load reports or bars."""
    import datasets
    import huggingface_hub.utils
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _fail(error: Exception) -> typer.Exit:
    typer.echo(f"error: {error}", err=True)
    return typer.Exit(1)


@app.command("teacher-train")
def teacher_train(
    config: Path = ConfigOption, max_examples: int | None = MaxExamplesOption, overrides: list[str] = SetOption
) -> None:
    """Fine-tune the teacher on the task (reused when already trained); every teacher distill.teachers names by config."""
    from pipeline.teacher import run_teacher_train

    try:
        for cfg in _load(config, overrides, max_examples=max_examples).teacher_stages():
            run_teacher_train(cfg)
    except (KdcacheError, CacheError) as e:
        raise _fail(e) from None


@app.command("teacher-cache")
def teacher_cache(
    config: Path = ConfigOption,
    max_examples: int | None = MaxExamplesOption,
    cache_root: str | None = typer.Option(None, "--cache-root", help="directory or URL (s3://...) holding caches"),
    num_shards: int = typer.Option(1, "--num-shards", help="split the capture among this many processes"),
    shard_index: int = typer.Option(0, "--shard-index", help="this process's part, 0 .. num-shards - 1"),
    as_json: bool = typer.Option(False, "--json", help="end with one JSON line: path, key, rows, bytes, reused"),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="estimate the cache's size and time from a sample; write nothing"
    ),
    overrides: list[str] = SetOption,
) -> None:
    """Run the teacher over the data once and write its outputs into a cache (resumes a partial one); every
    teacher distill.teachers names by config, one after the other."""
    from pipeline.teacher import estimate_capture, run_capture

    try:
        for cfg in _load(config, overrides, max_examples=max_examples, cache_root=cache_root).teacher_stages():
            if dry_run:
                _print_estimate(estimate_capture(cfg))
                continue
            result = run_capture(cfg, num_shards=num_shards, shard_index=shard_index)
            if as_json:
                manifest = result.manifest
                summary = {
                    "path": str(result.location), "key": result.key, "complete": manifest is not None,
                    "rows": manifest.rows if manifest else None, "bytes": manifest.bytes if manifest else None,
                    "reused": result.reused,
                }  # fmt: skip
                typer.echo(json.dumps(summary))
    except (KdcacheError, CacheError) as e:
        raise _fail(e) from None


def _print_estimate(estimate) -> None:
    typer.echo(f"estimate for {estimate.rows} rows (from a sample; nothing written):")
    for output, size in estimate.bytes_by_output.items():
        typer.echo(f"  {output:<16}{size / 1e6:10.1f} MB")
    typer.echo(f"  {'total':<16}{estimate.bytes / 1e6:10.1f} MB, about {estimate.seconds / 60:.1f} min on this machine")


@app.command("distill")
def distill(
    config: Path = ConfigOption,
    max_examples: int | None = typer.Option(
        None, "--max-examples", help="find the cache teacher-cache made with --max-examples N (no --cache)"
    ),
    seeds: str | None = typer.Option(None, "--seeds", help="comma-separated seeds, e.g. 0,1,2"),
    baselines: bool | None = typer.Option(None, "--baselines/--no-baselines", help="also train no-KD baselines"),
    cache: str | None = typer.Option(
        None, "--cache", help="the teacher cache (path or URL); default: the one teacher-cache made for the config"
    ),
    teacher: str | None = typer.Option(
        None, "--teacher", help="a local copy of the cache's teacher, when the cache does not bundle it"
    ),
    online: bool = typer.Option(False, "--online", help="run the teacher live on every batch instead of a cache"),
    resume: str | None = typer.Option(
        None, "--resume", help="continue an interrupted run: its directory, or 'latest'", show_default=False
    ),
    overrides: list[str] = SetOption,
) -> None:
    """Train the students from a teacher cache, evaluate them beside the teacher, write the report."""
    from pipeline.student import run_distill

    try:
        seed_list = yaml.safe_load(f"[{seeds}]") if seeds else None
        cfg = _load(config, overrides, max_examples=max_examples, seeds=seed_list, baselines=baselines)
        cfg.require("distill", stage="distill")
        if resume == "latest":
            resume = str(Path(cfg.distill.run_root) / "latest")
        result = run_distill(cfg, cache_location=cache, online=online, resume=resume, teacher=teacher)
    except (KdcacheError, CacheError) as e:
        raise _fail(e) from None
    typer.echo(f"report: {result.run_dir / 'report.md'}")


cache_app = typer.Typer(no_args_is_help=True, help="Inspect, check, copy and remove caches.")
app.add_typer(cache_app, name="cache")


@cache_app.command("verify")
def cache_verify(path: str = typer.Argument(..., help="cache directory or URL")) -> None:
    """Recompute every checksum; exit 1 naming each damaged shard."""
    from cache_store import verify_cache

    try:
        bad = verify_cache(path)
    except CacheError as e:
        raise _fail(e) from None
    for shard, problems in bad.items():
        typer.echo(f"bad shard {shard}: {'; '.join(problems)}", err=True)
    if bad:
        raise typer.Exit(1)
    typer.echo(f"ok: {path}")


@cache_app.command("ls")
def cache_ls(root: str = typer.Argument("caches", help="cache root directory or URL")) -> None:
    """List the caches under a root: key, teacher, dataset, rows, size, created, state."""
    from rich.console import Console
    from rich.table import Table

    from cache_store import list_caches

    table = Table()
    for column in ("key", "teacher", "dataset", "rows", "size", "created", "state"):
        table.add_column(column)
    try:
        listings = list_caches(root)
    except CacheError as e:
        raise _fail(e) from None
    for c in listings:
        created = c.created.strftime("%Y-%m-%d %H:%M") if c.created else "-"
        table.add_row(c.key, c.teacher, c.dataset, str(c.rows), f"{c.bytes / 1e6:.1f} MB", created,
                      "complete" if c.complete else "partial")  # fmt: skip
    Console(width=160).print(table)


@cache_app.command("info")
def cache_info(path: str = typer.Argument(..., help="cache directory or URL")) -> None:
    """Print a cache's manifest summary as JSON: task, splits, tensors, size, metadata."""
    from cache_store import open_cache

    try:
        manifest = open_cache(path).manifest
    except CacheError as e:
        raise _fail(e) from None
    info = {
        "key": manifest.key, "task": manifest.metadata.get("task"),
        "format_version": manifest.format_version, "rows": manifest.rows,
        "bytes": manifest.bytes, "columns": [dataclasses.asdict(c) for c in manifest.columns],
        "splits": {n: {"rows": s.rows, "tokens": s.tokens, "shards": len(s.shards), "bytes": s.bytes,
                       "tensors": list(s.tensors)}
                   for n, s in manifest.splits.items()},
        "tensors": [dataclasses.asdict(t) for t in manifest.tensors],
        "distribution": dataclasses.asdict(manifest.distribution) if manifest.distribution else None,
        "metadata": manifest.metadata,
        "attachments": {name: {"files": len(files), "bytes": sum(f.bytes for f in files.values())}
                        for name, files in manifest.attachments.items()},
    }  # fmt: skip
    typer.echo(json.dumps(info, indent=1))


@cache_app.command("inspect")
def cache_inspect(
    path: str = typer.Argument(..., help="cache directory or URL"),
    out: str | None = typer.Option(
        None, "--out", help="where summary.json, the plots and index.html go (default: inspect-<key>/)"
    ),  # fmt: skip
    workers: int | None = typer.Option(None, "--workers", min=1, help="run on a local dask cluster of N processes"),
    scheduler: str | None = typer.Option(None, "--scheduler", help="run on a running dask scheduler (tcp://host:port)"),
) -> None:
    """What a cache holds, computed with dask shard by shard: lengths, the teacher's confidence and
    calibration, hidden-state norms, attention entropy, covered mass; a table here, and a page to open."""
    from rich.console import Console
    from rich.table import Table

    from cache_store import open_cache
    from pipeline.inspection import inspect_cache, split_table

    if workers is not None and scheduler is not None:
        raise _fail(ValueError("--workers starts a local cluster, --scheduler uses a running one: give one of them"))
    try:
        folder = Path(out or f"inspect-{open_cache(path).manifest.key}")
        summary = inspect_cache(path, folder, workers=workers, scheduler=scheduler)
    except (KdcacheError, CacheError) as e:
        raise _fail(e) from None
    rows = split_table(summary)
    table = Table(title=f"cache {summary['key']} ({summary['task']})")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    for column in columns:
        table.add_column(column, justify="left" if column == "split" else "right")
    for row in rows:
        table.add_row(*(row.get(c, "") for c in columns))
    Console(width=160).print(table)
    typer.echo(f"wrote {folder / 'index.html'} (open it in a browser) and {folder / 'summary.json'}")


@cache_app.command("diff")
def cache_diff(
    a: str = typer.Argument(..., help="cache directory or URL"),
    b: str = typer.Argument(..., help="another teacher's cache of the same examples"),
    as_json: bool = typer.Option(False, "--json", help="print the comparison as JSON"),
) -> None:
    """Two teachers over the same examples: how often they agree, KL(A || B) per split, and where they
    disagree most."""
    from rich.console import Console
    from rich.table import Table

    from pipeline.inspection import diff_caches

    try:
        diff = diff_caches(a, b)
    except (KdcacheError, CacheError) as e:
        raise _fail(e) from None
    if as_json:
        typer.echo(json.dumps(diff, indent=1))
        return
    console = Console(width=160)
    table = Table(title=f"cache {diff['a']} ({diff['teachers'][0]}) against {diff['b']} ({diff['teachers'][1]})")
    for column in ("split", "outcomes", "agreement", "KL(A || B)"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, entry in diff["splits"].items():
        table.add_row(split, f"{entry['outcomes']:,}", f"{entry['agreement']:.4f}", f"{entry['kl']:.4f}")
    console.print(table)
    for split, entry in diff["splits"].items():
        console.print(f"[bold]{split}[/bold]: where they disagree most")
        for d in entry["disagreements"]:
            console.print(f"  KL {d['kl']:.3f}  A {d['a']['class']} ({d['a']['confidence']:.2f})  "
                          f"B {d['b']['class']} ({d['b']['confidence']:.2f})  label {d['label']}: {d['text'][:100]}",
                          markup=False, highlight=False)  # fmt: skip


@cache_app.command("rm")
def cache_rm(
    path: str = typer.Argument(..., help="cache directory or URL"),
    force: bool = typer.Option(False, "--force", help="also remove a partial cache whose writer may be running"),
) -> None:
    """Remove a cache (refuses a partial cache of a live writer unless forced)."""
    from cache_store import remove_cache

    try:
        remove_cache(path, force=force)
    except CacheError as e:
        raise _fail(e) from None
    typer.echo(f"removed {path}")


@cache_app.command("push")
def cache_push(
    source: str = typer.Argument(..., help="cache directory or URL to copy"),
    dest_root: str = typer.Argument(..., help="cache root (directory or URL) to copy it into"),
) -> None:
    """Copy a cache into another root and verify it on arrival."""
    from cache_store import push_cache

    try:
        copy, copied = push_cache(source, dest_root)
    except CacheError as e:
        raise _fail(e) from None
    typer.echo(f"{'copied' if copied else 'already there'}: {copy.location} (verified)")


if __name__ == "__main__":
    app()

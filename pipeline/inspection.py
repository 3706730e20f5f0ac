"""`kdcache cache inspect`: what a teacher cache holds, computed with dask shard by shard.

Each shard is one dask task that reads it (verified, like any read), reduces it to sums and
fixed-bin histograms (``shard_sums``) and returns only those; a split's sums are added up in
the caller as the tasks finish. Memory therefore stays at a few shards whatever the cache's
size, and the tasks run on dask's local threads, on a local cluster of worker processes
(``workers``) or on a running ``dask.distributed`` scheduler (``scheduler``): each task opens
the cache by its location, so any worker that reaches it can run it.

Per split: rows, tokens and a length histogram; for class tasks (sequence and token
classification), the teacher's confidence, margin and entropy per class (and for outcomes
without a label), its accuracy and expected calibration error on the labeled ones, with a
reliability diagram; the mean hidden-state norm per stored layer; the entropy of the stored
attention maps per layer and head; for a causal LM, the teacher's LM metrics and calibration
from its block sums, and the probability mass its stored distributions cover.
``inspect_cache`` writes ``summary.json``, PNG plots and an ``index.html`` showing them.
"""

from __future__ import annotations

import functools
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cache_store import Cache, ShardRows, open_cache
from cache_store.distribution import DISTRIBUTION_DIR

from .contract import ATTENTION, HIDDEN, SPLITS, CacheMetadata
from .tasks import TASKS
from .tasks.causal_lm import COVERED_MASS, ECE_BINS, LM_STATS, STATS_FIELDS, lm_metrics

BINS = 20  # bins of the confidence, margin, entropy and covered-mass histograms, over [0, 1]
LENGTH_BIN = 8  # tokens per bin of the length histogram
UNLABELED = "unlabeled"  # the class entry of outcomes without a label
MEASURES = ("confidence", "margin", "entropy")  # of the teacher's class distribution per outcome
PER_CLASS = ("outcomes", "confidence", "margin", "entropy", "correct")  # the per-class sums' fields


@functools.lru_cache(maxsize=4)
def _opened(location: str) -> Cache:
    """The cache at ``location``, opened once per process: every shard task of a run reads its manifest
    (which lists every shard) only once, whatever the number of shards."""
    return open_cache(location)


def shard_sums(location: str, split: str, index: int) -> dict[str, np.ndarray]:
    """One shard's additive statistics (see the module docstring): read and reduced in one task."""
    cache = _opened(location)
    manifest, entry = cache.manifest, cache.shards(split)[index]
    meta = CacheMetadata.from_manifest(manifest)
    stored = manifest.splits[split].tensors
    wanted = [(spec.name, layer) for spec in manifest.tensors if spec.name in stored for layer in spec.layers]
    data = cache.read_shard(entry, wanted)
    rows, lengths = data.rows, data.rows.lengths
    sums = {"rows": np.array([len(rows)]), "tokens": np.array([int(lengths.sum())]),
            "lengths": np.bincount(lengths // LENGTH_BIN)}  # fmt: skip
    outcomes = TASKS[meta.task].class_outcomes(rows)
    if outcomes is not None:
        sums |= class_sums(*outcomes[:2], classes=len(meta.label_names))
    if LM_STATS in rows.columns:
        sums[LM_STATS] = np.asarray(rows[LM_STATS], np.float64).reshape(-1, STATS_FIELDS).sum(0)
    if any(path.startswith(f"tensors.zarr/{DISTRIBUTION_DIR}/") for path in entry.arrays):
        tokens = manifest.distribution.stored_tokens(lengths, rows.columns)
        mass = np.clip(np.asarray(rows[COVERED_MASS], np.float64), 0, 1)
        sums["covered_mass"] = np.histogram(mass, BINS, (0, 1), weights=tokens)[0]
        sums["covered_mass_sums"] = np.array([(mass * tokens).sum(), tokens.sum()])
    for name, layer in wanted:
        if name == HIDDEN:
            norms = np.linalg.norm(data.tensors[(name, layer)].astype(np.float64), axis=-1)
            sums[f"{HIDDEN}/{layer}"] = np.array([norms.sum(), (norms**2).sum(), len(norms)])
        else:
            sums[f"{ATTENTION}/{layer}"] = sum(attention_entropy(data.example_tensor(name, layer, i))
                                               for i in range(len(rows)))  # fmt: skip
    return sums


@dataclass(frozen=True)
class TeacherStats:
    """The teacher's class distribution per outcome (a row, or a token), measured: what inspection
    sums and what sample selection keeps rows by."""

    labels: np.ndarray  # (N,) the class ids; -1 where there is none
    confidence: np.ndarray  # (N,) the top probability
    margin: np.ndarray  # (N,) top probability minus the second
    entropy: np.ndarray  # (N,) of the distribution, in nats
    correct: np.ndarray  # (N,) bool: the top class is the label (False without one)
    predicted: np.ndarray  # (N,) the top class

    @classmethod
    def from_logits(cls, logits: np.ndarray, labels: np.ndarray) -> TeacherStats:
        z = np.asarray(logits, np.float64)
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ranked = -np.sort(-p, axis=-1)
        second = ranked[:, 1] if p.shape[1] > 1 else np.zeros(len(p))
        entropy = -(p * np.log(np.clip(p, 1e-12, None))).sum(-1)
        labels = np.asarray(labels, np.int64)
        predicted = p.argmax(-1)
        return cls(labels, ranked[:, 0], ranked[:, 0] - second, entropy, (predicted == labels) & (labels >= 0),
                   predicted)  # fmt: skip


def class_sums(logits: np.ndarray, labels: np.ndarray, *, classes: int) -> dict[str, np.ndarray]:
    """Sums over outcomes of the teacher's class distributions, grouped by class (row ``classes``:
    the outcomes without a label, ``labels`` -1):

    - ``per_class`` (classes + 1, 5): outcomes, then the sums of confidence (top probability), margin
      (top minus second), entropy (nats) and correct predictions (labeled only);
    - ``histograms`` (classes + 1, 3, BINS): confidence, margin and entropy over log C, in [0, 1];
    - ``reliability`` (ECE_BINS, 3): per confidence bin over labeled outcomes: count, confidence sum, correct.
    """
    stats = TeacherStats.from_logits(logits, labels)
    confidence, margin, entropy, correct = stats.confidence, stats.margin, stats.entropy, stats.correct
    labeled = stats.labels >= 0
    group = np.where(labeled, labels, classes)
    per_class = np.zeros((classes + 1, len(PER_CLASS)))
    np.add.at(per_class, group, np.stack([np.ones(len(labels)), confidence, margin, entropy, correct], -1))
    histograms = np.zeros((classes + 1, len(MEASURES), BINS))
    for k, values in enumerate((confidence, margin, entropy / math.log(max(np.shape(logits)[1], 2)))):
        np.add.at(histograms, (group, k, _bin(values, BINS)), 1)
    reliability = np.zeros((ECE_BINS, 3))
    bins = _bin(confidence[labeled], ECE_BINS)
    np.add.at(reliability, bins, np.stack([np.ones(len(bins)), confidence[labeled], correct[labeled]], -1))
    return {"per_class": per_class, "histograms": histograms, "reliability": reliability}


def attention_entropy(maps: np.ndarray) -> np.ndarray:
    """(heads, 2): the summed entropy (nats) of each head's query rows of one example's maps (heads, L, L),
    and how many rows."""
    p = np.asarray(maps, np.float64)
    rows = -(p * np.log(np.clip(p, 1e-12, None))).sum(-1)  # (heads, L)
    return np.stack([rows.sum(-1), np.full(len(rows), rows.shape[1], np.float64)], -1)


def _bin(values: np.ndarray, bins: int) -> np.ndarray:
    return np.clip((values * bins).astype(np.int64), 0, bins - 1)


def add(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Two shards' sums added (a length histogram padded to the longer)."""
    out = dict(a)
    for key, value in b.items():
        if key not in out:
            out[key] = value
        elif out[key].shape != value.shape:  # histograms of lengths: as many bins as the longest row needs
            longer, shorter = (out[key], value) if len(out[key]) > len(value) else (value, out[key])
            out[key] = longer + np.pad(shorter, (0, len(longer) - len(shorter)))
        else:
            out[key] = out[key] + value
    return out


def compute_sums(location: str, shards: list[tuple[str, int]], *, workers: int | None = None,
                 scheduler: str | None = None, progress: bool = True) -> dict[str, dict[str, np.ndarray]]:  # fmt: skip
    """Each split's summed statistics over ``shards`` ((split, index) pairs), one dask task per shard:
    on local threads, on a local cluster of ``workers`` processes, or on the scheduler at ``scheduler``."""
    import dask
    from tqdm.auto import tqdm

    tasks = [dask.delayed(shard_sums, pure=True)(location, split, index) for split, index in shards]
    results: list[dict[str, np.ndarray] | None] = [None] * len(tasks)
    with tqdm(total=len(tasks), desc="inspect", unit="shard", disable=not progress) as bar:
        if workers is None and scheduler is None:
            from dask.callbacks import Callback

            class Tick(Callback):  # dask's own bar shows no rate: count the shards into tqdm's
                def _posttask(self, key, result, dsk, state, worker_id):
                    bar.update(1)

            with Tick():
                results = list(dask.compute(*tasks, scheduler="threads"))
        else:
            from distributed import Client, LocalCluster, as_completed

            cluster = None if scheduler else LocalCluster(n_workers=workers, threads_per_worker=1,
                                                          dashboard_address=None)  # fmt: skip
            try:
                with Client(scheduler or cluster) as client:
                    futures = client.compute(tasks)
                    order = {future.key: k for k, future in enumerate(futures)}
                    for future in as_completed(futures):
                        results[order[future.key]] = future.result()
                        bar.update(1)
            finally:
                if cluster is not None:
                    cluster.close()
    totals: dict[str, dict[str, np.ndarray]] = {}
    for (split, _), sums in zip(shards, results, strict=True):  # in shard order: the same sums on any scheduler
        totals[split] = add(totals.get(split, {}), sums)
    return totals


def summarize(manifest, totals: dict[str, dict[str, np.ndarray]]) -> dict:
    """The figures of ``summary.json`` from each split's sums (see ``shard_sums``)."""
    meta = CacheMetadata.from_manifest(manifest)
    names = [*meta.label_names, UNLABELED]
    out = {"key": manifest.key, "task": meta.task, "teacher": meta.teacher_name, "dataset": meta.dataset,
           "label_names": list(meta.label_names), "splits": {}}  # fmt: skip
    for split, sums in totals.items():
        entry = {"rows": int(sums["rows"][0]), "tokens": int(sums["tokens"][0]),
                 "lengths": {"bin_tokens": LENGTH_BIN, "counts": sums["lengths"].astype(int).tolist()}}  # fmt: skip
        entry["mean_length"] = entry["tokens"] / max(entry["rows"], 1)
        if "per_class" in sums:
            entry["teacher"] = _class_figures(sums, names)
        if LM_STATS in sums:
            entry["teacher"] = lm_metrics(sums[LM_STATS]) | {
                "reliability": _reliability(sums[LM_STATS][3:].reshape(ECE_BINS, 3))
            }
        if "covered_mass" in sums:
            mass, tokens = sums["covered_mass_sums"]
            entry["covered_mass"] = {"mean": mass / max(tokens, 1), "histogram": _fractions(sums["covered_mass"])}
        hidden = {k.split("/")[1]: v for k, v in sums.items() if k.startswith(f"{HIDDEN}/")}
        if hidden:
            entry["hidden_norm"] = {layer: {"mean": total / n, "std": math.sqrt(max(squares / n - (total / n) ** 2, 0))}
                                    for layer, (total, squares, n) in sorted(hidden.items(), key=lambda x: int(x[0]))}  # fmt: skip
        attention = {k.split("/")[1]: v for k, v in sums.items() if k.startswith(f"{ATTENTION}/")}
        if attention:
            entry["attention_entropy"] = {layer: (v[:, 0] / np.maximum(v[:, 1], 1)).tolist()
                                          for layer, v in sorted(attention.items(), key=lambda x: int(x[0]))}  # fmt: skip
        out["splits"][split] = entry
    return out


def _class_figures(sums: dict[str, np.ndarray], names: list[str]) -> dict:
    per_class, histograms, reliability = sums["per_class"], sums["histograms"], sums["reliability"]
    labeled = per_class[:-1].sum(0)
    figures = {"labeled_outcomes": int(labeled[0]), "accuracy": labeled[4] / labeled[0] if labeled[0] else None,
               "ece": _ece(reliability), "reliability": _reliability(reliability), "classes": {}}  # fmt: skip
    for name, sums_c, hist in zip(names, per_class, histograms, strict=True):
        n = sums_c[0]
        if not n:
            continue
        figures["classes"][name] = {
            "outcomes": int(n), **{m: sums_c[1 + i] / n for i, m in enumerate(MEASURES)},
            "accuracy": sums_c[4] / n if name != UNLABELED else None,
            "histograms": {m: _fractions(hist[i]) for i, m in enumerate(MEASURES)},
        }  # fmt: skip
    return figures


def _ece(bins: np.ndarray) -> float | None:
    """Expected calibration error of per-bin (count, confidence sum, correct) sums."""
    total = bins[:, 0].sum()
    return float(np.abs(bins[:, 2] - bins[:, 1]).sum() / total) if total else None


def _reliability(bins: np.ndarray) -> list[dict]:
    return [{"bin": [k / len(bins), (k + 1) / len(bins)], "count": int(c), "confidence": s / c, "accuracy": a / c}
            for k, (c, s, a) in enumerate(bins) if c]  # fmt: skip


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _fractions(counts: np.ndarray) -> list[float]:
    total = counts.sum()
    return (counts / total).tolist() if total else counts.tolist()


def plot(summary: dict, out: Path) -> list[tuple[str, str]]:
    """The summary's PNG plots in ``out``: (file name, caption) of each one drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    splits, drawn = summary["splits"], []

    def save(fig, name: str, caption: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        drawn.append((name, caption))

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for split, entry in splits.items():
        counts = np.asarray(entry["lengths"]["counts"], float)
        ax.step(np.arange(len(counts)) * LENGTH_BIN, counts / max(counts.sum(), 1), where="post", label=split)
    ax.set(xlabel="tokens per row", ylabel="fraction of rows")
    ax.legend()
    save(fig, "lengths.png", "Row lengths per split")
    train = splits.get("train", next(iter(splits.values())))
    classes = train.get("teacher", {}).get("classes")
    if classes:
        fig, axes = plt.subplots(1, len(MEASURES), figsize=(11, 3.3))
        centers = (np.arange(BINS) + 0.5) / BINS
        for ax, measure in zip(axes, MEASURES, strict=True):
            for name, figures in classes.items():
                ax.plot(centers, figures["histograms"][measure], label=f"{name} ({figures['outcomes']})")
            ax.set(xlabel=measure + (" / log C" if measure == "entropy" else ""), ylabel="fraction")
        axes[0].legend(fontsize=7)
        save(fig, "teacher.png", "The teacher's confidence, margin and entropy per class (train)")
    reliable = {
        split: e["teacher"]["reliability"] for split, e in splits.items() if e.get("teacher", {}).get("reliability")
    }
    if reliable:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        for split, bins in reliable.items():
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", label=split)
        ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
        ax.legend()
        save(fig, "reliability.png", "Reliability diagram of the teacher (labeled outcomes; LM: next tokens)")
    if "hidden_norm" in train:
        layers = list(train["hidden_norm"])
        fig, ax = plt.subplots(figsize=(6, 3.3))
        ax.bar(layers, [train["hidden_norm"][k]["mean"] for k in layers],
               yerr=[train["hidden_norm"][k]["std"] for k in layers], capsize=3)  # fmt: skip
        ax.set(xlabel="layer", ylabel="token hidden-state norm")
        save(fig, "hidden_norms.png", "Mean hidden-state norm per stored layer (train; bars: one std)")
    if "attention_entropy" in train:
        layers = list(train["attention_entropy"])
        grid = np.array([train["attention_entropy"][k] for k in layers])
        fig, ax = plt.subplots(figsize=(6, 1 + 0.5 * len(layers)))
        image = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set(xlabel="head", ylabel="layer", yticks=range(len(layers)), yticklabels=layers)
        fig.colorbar(image, ax=ax, label="nats")
        save(fig, "attention_entropy.png", "Mean entropy of each attention head's rows (train)")
    if "covered_mass" in train:
        fig, ax = plt.subplots(figsize=(6, 3.3))
        ax.bar((np.arange(BINS) + 0.5) / BINS, train["covered_mass"]["histogram"], width=1 / BINS)
        ax.set(xlabel="probability mass the stored ids cover (row mean)", ylabel="fraction of tokens")
        save(fig, "covered_mass.png", "Covered probability mass of the stored distributions (train)")
    return drawn


def split_table(summary: dict) -> list[dict[str, str]]:
    """One row of key figures per split, as text: what the terminal and the page show first."""
    table = []
    for split, entry in summary["splits"].items():
        teacher = entry.get("teacher", {})
        row = {"split": split, "rows": f"{entry['rows']:,}", "tokens": f"{entry['tokens']:,}",
               "mean length": f"{entry['mean_length']:.1f}"}  # fmt: skip
        if "perplexity" in teacher:
            row |= {"teacher perplexity": f"{teacher['perplexity']:.3f}", "ECE": f"{teacher['ece']:.4f}"}
        elif teacher:
            labeled = teacher["accuracy"] is not None
            row |= {"labeled": f"{teacher['labeled_outcomes']:,}",
                    "teacher accuracy": f"{teacher['accuracy']:.4f}" if labeled else "-",
                    "ECE": f"{teacher['ece']:.4f}" if teacher["ece"] is not None else "-"}  # fmt: skip
        if "covered_mass" in entry:
            row["covered mass"] = f"{entry['covered_mass']['mean']:.4f}"
        table.append(row)
    return table


def write_page(summary: dict, plots: list[tuple[str, str]], path: Path) -> None:
    """``index.html``: the split table, each class's mean confidence, and the plots."""
    table = split_table(summary)
    columns = list(dict.fromkeys(k for row in table for k in row))
    cell = lambda v: f"<td>{html.escape(str(v))}</td>"  # noqa: E731
    rows = "".join("<tr>" + "".join(cell(row.get(c, "")) for c in columns) + "</tr>" for row in table)
    classes = ""
    for split, entry in summary["splits"].items():
        for name, figures in entry.get("teacher", {}).get("classes", {}).items():
            accuracy = "-" if figures["accuracy"] is None else f"{figures['accuracy']:.4f}"
            values = (split, name, figures["outcomes"], *(f"{figures[m]:.4f}" for m in MEASURES), accuracy)
            classes += "<tr>" + "".join(cell(v) for v in values) + "</tr>"
    if classes:
        heads = "".join(f"<th>{h}</th>" for h in ("split", "class", "outcomes", "confidence", "margin", "entropy (nats)",
                                                   "accuracy"))  # fmt: skip
        classes = f"<h2>The teacher per class</h2><table><tr>{heads}</tr>{classes}</table>"
    figures = "".join(f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
                      f"<figcaption>{html.escape(caption)}</figcaption></figure>" for name, caption in plots)  # fmt: skip
    title = f"kdcache cache {summary['key']}"
    path.write_text(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}img{{max-width:100%}}figure{{margin:1.5em 0}}</style>
</head><body><h1>{html.escape(title)}</h1>
<p>Task {html.escape(summary["task"])}; teacher {html.escape(summary["teacher"])}; data {html.escape(summary["dataset"])}.
Every figure is computed from the cache alone (<code>summary.json</code> holds them all).</p>
<table><tr>{"".join(f"<th>{html.escape(c)}</th>" for c in columns)}</tr>{rows}</table>
{classes}{figures}</body></html>
""")


def inspect_cache(location: str, out: Path, *, workers: int | None = None, scheduler: str | None = None,
                  progress: bool = True) -> dict:  # fmt: skip
    """Compute the cache's figures (``compute_sums``), and write ``summary.json``, the plots and
    ``index.html`` into ``out``; returns the summary."""
    _opened.cache_clear()  # a cache removed and captured again since the last run is read afresh
    cache = _opened(str(location))
    shards = [(split, k) for split in SPLITS for k in range(len(cache.shards(split)))]
    totals = compute_sums(str(location), shards, workers=workers, scheduler=scheduler, progress=progress)
    summary = summarize(cache.manifest, {split: totals[split] for split in SPLITS if split in totals})
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_page(summary, plot(summary, out), out / "index.html")
    return summary


DISAGREEMENTS = 5  # outcomes per split that `diff_caches` shows, the largest KL first


def diff_caches(a: str, b: str, *, top: int = DISAGREEMENTS) -> dict:
    """Two class-task caches of the same examples compared per split: how often their teachers'
    top classes agree, the mean KL(A || B) over outcomes, and the ``top`` outcomes with the largest
    KL, with their rows' text (decoded by A's tokenizer) and both teachers' classes and confidence.

    Raises:
        DataError: the caches hold different examples (data or tokenizer fingerprints), tasks or
            classes, or a task whose outcomes are not classes.
    """
    from .contract import TOKENIZER
    from .errors import DataError
    from .models import load_tokenizer

    caches = open_cache(a), open_cache(b)
    metas = [CacheMetadata.from_manifest(c.manifest) for c in caches]
    for what in ("data_fingerprint", "tokenizer_fingerprint", "task", "label_names"):
        first, second = (getattr(m, what) for m in metas)
        if first != second:
            raise DataError(f"caches {caches[0].key} and {caches[1].key} differ in {what} ({first} vs {second}): "
                            "diff compares two teachers over the same examples")  # fmt: skip
    task = TASKS[metas[0].task]
    tokenizer = load_tokenizer(caches[0].attachment(TOKENIZER))
    out = {"a": caches[0].key, "b": caches[1].key, "teachers": [m.teacher_name for m in metas], "splits": {}}
    for split in SPLITS:
        rows = [ShardRows.concat([c.read_shard(e).rows for e in c.shards(split)]) for c in caches]
        outcomes = [task.class_outcomes(r) for r in rows]
        if outcomes[0] is None:
            raise DataError(f"cache diff compares class predictions; task {metas[0].task} has none")
        (logits_a, labels, owner), (logits_b, _, _) = outcomes
        log_p, log_q = (_log_softmax(np.asarray(x, np.float64)) for x in (logits_a, logits_b))
        kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
        agree = log_p.argmax(-1) == log_q.argmax(-1)
        worst = np.argsort(-kl, kind="stable")[:top]
        names = [*metas[0].label_names]
        out["splits"][split] = {
            "outcomes": len(kl), "agreement": float(agree.mean()), "kl": float(kl.mean()),
            "disagreements": [{"text": tokenizer.decode(rows[0].input_ids[owner[i]], skip_special_tokens=True),
                               "label": names[labels[i]] if labels[i] >= 0 else None, "kl": float(kl[i]),
                               "a": {"class": names[log_p[i].argmax()], "confidence": float(np.exp(log_p[i].max()))},
                               "b": {"class": names[log_q[i].argmax()], "confidence": float(np.exp(log_q[i].max()))}}
                              for i in worst],
        }  # fmt: skip
    return out
